"""``python -m bitpress selftest``: every op on every backend this machine has, against the
plain-PyTorch reference, as a table. Exit status 1 if anything fails.

On a GPU machine this exercises the CUDA and Triton kernels; on a CPU-only machine the C++ CPU
kernels (and the Triton kernels under the interpreter when TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable

import torch

from bitpress import backends, reference
from bitpress.formats.packing import pack_int4_along_k, pack_int4_along_n
from bitpress.testing import rel_err


@dataclasses.dataclass
class Case:
    op: str
    name: str
    make: Callable[[torch.device, torch.Generator], tuple]  # -> positional args of the op
    ref: Callable[..., torch.Tensor]
    tol: float  # relative error bound against the reference (0: exact)
    size: int = 0  # elements of the output: the Triton interpreter skips cases over 2^18


def _int4_case(K, N, group_size, dtype, zeros, act_order):
    def make(device, gen):
        G = 5 if act_order else -(-K // (K if group_size == -1 else group_size))
        q = torch.randint(0, 16, (K, N), generator=gen)
        scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).to(dtype)
        qzeros = pack_int4_along_n(torch.randint(0, 16, (G, N), generator=gen)) if zeros else None
        g_idx = torch.randint(0, G, (K,), generator=gen, dtype=torch.int32) if act_order else None
        args = (pack_int4_along_k(q), scales, qzeros, g_idx, group_size, dtype)
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    tag = f"K={K} N={N} g={group_size} {str(dtype).removeprefix('torch.')}"
    tag += " asym" if zeros else " sym"
    tag += " act-order" if act_order else ""
    return Case("int4_dequantize", tag, make, reference.int4_dequantize, 0.0, K * N)


def default_cases() -> list[Case]:
    return [
        _int4_case(4096, 4096, 128, torch.float16, False, False),
        _int4_case(256, 33, 32, torch.bfloat16, True, False),
        _int4_case(136, 129, -1, torch.float32, True, False),
        _int4_case(128, 96, 64, torch.float16, True, True),
    ]


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
    from bitpress import ops

    cases = default_cases() if cases is None else cases
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    results = []
    for case in cases:
        fn = getattr(ops, case.op)
        for backend in backends.implementations(case.op):
            if backend == "reference":
                continue
            for device in devices:
                if not backends.backend_available(backend, device):
                    continue
                if backend == "triton" and device.type == "cpu" and case.size > 2**18:
                    continue  # the interpreter takes tens of seconds per million elements
                gen = torch.Generator().manual_seed(seed)
                args = case.make(device, gen)
                try:
                    want = case.ref(*args)
                    t0 = time.perf_counter()
                    got = fn(*args, backend=backend)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    ms = (time.perf_counter() - t0) * 1e3
                    # bfloat16 under the Triton interpreter: its fp32->bf16 cast truncates (the
                    # compiled kernel rounds to nearest even), so allow one bf16 ulp there.
                    tol = case.tol
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
