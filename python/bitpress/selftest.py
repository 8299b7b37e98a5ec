"""``python -m bitpress selftest``: every registered op on every backend this machine has,
against its plain-PyTorch reference, as a table. Exit status 1 if anything fails.

On a GPU machine this exercises the CUDA and Triton kernels; on a CPU-only machine the C++ CPU
kernels (and the Triton kernels under the interpreter when TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import time
import traceback

import torch

from bitpress import ops as _ops  # noqa: F401  (every op registers itself)
from bitpress._core import backends, registry
from bitpress._core.registry import Case
from bitpress.testing import rel_err


def default_cases() -> list[Case]:
    """The cases of every registered op."""
    return [c for spec in registry.ops().values() for c in spec.cases()]


def gpu_cases() -> list[Case]:
    """Added on a CUDA machine: each op's GPU-sized cases."""
    return [c for spec in registry.ops().values() for c in spec.gpu_cases()]


@dataclasses.dataclass
class Result:
    op: str
    backend: str
    device: str
    case: str
    err: float
    ms: float
    ok: bool
    note: str = ""


def run(cases: list[Case] | None = None, seed: int = 0) -> list[Result]:

    if cases is None:
        cases = default_cases() + (gpu_cases() if torch.cuda.is_available() else [])
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    results = []
    for case in cases:
        for backend in backends.implementations(case.op):
            if backend == "reference":
                continue
            for device in devices:
                if backends.refusal(case.op, backend, device) is not None:
                    continue
                if case.gpu_only and device.type != "cuda":
                    continue
                if backend == "triton" and device.type == "cpu" and case.size > 2**18:
                    continue  # the interpreter takes tens of seconds per million elements
                gen = torch.Generator().manual_seed(seed)
                args = case.make(device, gen, backend)
                try:
                    want = case.ref(*args)
                    t0 = time.perf_counter()
                    # The backend's implementation takes the public function's arguments.
                    got = backends.select(case.op, device, backend)[1](*args)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    ms = (time.perf_counter() - t0) * 1e3
                    # bfloat16 under the Triton interpreter: its fp32->bf16 cast truncates (the
                    # compiled kernel rounds to nearest even), so allow one bf16 ulp there.
                    tol = case.tol
                    if isinstance(want, tuple):  # several outputs (spec_verify): all exact
                        ok = all(
                            torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want, strict=True)
                        )
                        err = 0.0 if ok else float("nan")
                        results.append(
                            Result(case.op, backend, device.type, case.name, err, ms, ok)
                        )
                        continue
                    if backend == "triton" and device.type == "cpu" and got.dtype == torch.bfloat16:
                        tol = max(tol, 2.0**-8)
                    err = rel_err(got, want)
                    ok = (
                        got.shape == want.shape
                        and got.dtype == want.dtype
                        and (torch.equal(got, want) if tol == 0 else err <= tol)
                    )
                    results.append(Result(case.op, backend, device.type, case.name, err, ms, ok))
                except Exception as e:  # report, keep going
                    note = f"{type(e).__name__}: {e}".splitlines()[0][:120]
                    results.append(
                        Result(
                            case.op, backend, device.type, case.name, float("nan"), 0.0, False, note
                        )
                    )
                    traceback.print_exc()
    return results


def format_table(results: list[Result]) -> str:
    rows = [("op", "backend", "device", "case", "rel err", "ms", "result")]
    for r in results:
        status = "ok" if r.ok else "FAIL" + (f" ({r.note})" if r.note else "")
        rows.append((r.op, r.backend, r.device, r.case, f"{r.err:.2e}", f"{r.ms:.2f}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(cases: list[Case] | None = None) -> int:
    results = run(cases)
    print(format_table(results))
    failed = sum(not r.ok for r in results)
    tested = sorted({r.backend for r in results})
    skipped = [b for b in backends.BACKENDS if b not in tested and b != "reference"]
    print(f"\n{len(results) - failed} passed, {failed} failed")
    if skipped:
        print(f"backends not available on this machine (not run): {', '.join(skipped)}")
    if not results:
        print("nothing ran")
        return 1
    return 1 if failed else 0
