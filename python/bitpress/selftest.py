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
    per_backend: bool = False  # make takes (device, gen, backend): the weight layout differs
    gpu_only: bool = False  # run on CUDA devices only (Llama-sized shapes)


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


def _int4_gemm_case(M, K, N, dtype, sym, act_order, bias):
    def make(device, gen, backend="cpu"):
        from bitpress.formats import int4_layout
        from bitpress.quantize.common import QuantizedWeight

        # The CUDA and Triton kernels read the GPU mma layout, the CPU kernel the CPU tiles.
        layout = "mma" if backend in ("cuda", "triton") else "cpu"
        gs = 128
        G = K // gs
        q = torch.randint(0, 16, (K, N), generator=gen).to(torch.uint8)
        zeros = (
            torch.full((G, N), 8, dtype=torch.uint8)
            if sym
            else torch.randint(0, 16, (G, N), generator=gen).to(torch.uint8)
        )
        scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.002).to(torch.float16)
        g_idx = (torch.randperm(K, generator=gen) if act_order else torch.arange(K)) // gs
        packed = int4_layout.pack(
            QuantizedWeight(q, scales, zeros, g_idx.int(), gs, sym), layout=layout
        )
        x = torch.randn(M, K, generator=gen).to(dtype)
        b = torch.randn(N, generator=gen).to(dtype) if bias else None
        args = (x, *packed.tensors(), b)
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    tag = f"M={M} K={K} N={N} g=128 {str(dtype).removeprefix('torch.')}"
    tag += (" sym" if sym else " asym") + (" act-order" if act_order else "")
    tag += " bias" if bias else ""
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    return Case("int4_gemm", tag, make, reference.int4_gemm, tol, M * K * N // 64, True)


def _int4_gemm_repack_case(K, N, act_order):
    def make(device, gen):
        from bitpress.formats import int4_layout

        G = -(-K // 128)
        q = torch.randint(0, 16, (K, N), generator=gen)
        g_idx = (torch.randperm(K, generator=gen) if act_order else torch.arange(K)) * G // K
        perm, _ = int4_layout.mma_row_order(g_idx, G)
        args = (pack_int4_along_k(q), perm.int() if act_order else None)
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    tag = f"K={K} N={N}" + (" act-order" if act_order else "")
    return Case("int4_gemm_repack", tag, make, reference.int4_gemm_repack, 0.0, K * N // 8)


def _spec_verify_case(B, K, V, dtype, draft_probs, filters):
    def make(device, gen):
        logits = (torch.randn(B, K + 1, V, generator=gen) * 3).to(dtype)
        q = torch.softmax(logits[:, :K].float() + torch.randn(B, K, V, generator=gen), -1)
        d = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
        num_draft = torch.randint(0, K + 1, (B,), generator=gen)
        temp = torch.where(torch.rand(B, generator=gen) < 0.25, 0.0, 0.5 + torch.rand(B))
        top_k = torch.randint(0, V, (B,), generator=gen) if filters else None
        top_p = torch.rand(B, generator=gen) * 0.5 + 0.5 if filters else None
        seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen)
        offsets = torch.arange(B)
        args = (logits, d, num_draft, q.to(dtype) if draft_probs else None, temp, top_k, top_p)
        args += (seeds, offsets)
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    tag = f"B={B} K={K} V={V} {str(dtype).removeprefix('torch.')}"
    tag += (" draft_probs" if draft_probs else " one-hot q") + (" top_k/top_p" if filters else "")
    # Tokens compared exactly with the reference (same Philox stream and float formulas).
    return Case("spec_verify", tag, make, reference.spec_verify, 0.0, B * (K + 1) * V)


def gpu_cases() -> list[Case]:
    """Added on a CUDA machine: every M regime of the CUDA int4_gemm dispatch (split-K GEMV,
    tiled kernel, dequantize + cuBLAS above the threshold) at Llama-sized shapes."""
    cases = []
    for M in (1, 16, 64, 65, 300):
        for dtype in (torch.float16, torch.bfloat16):
            cases.append(_int4_gemm_case(M, 4096, 4096, dtype, True, False, False))
    cases.append(_int4_gemm_case(16, 4096, 14336, torch.float16, False, True, True))
    cases.append(_int4_gemm_case(5, 14336, 4096, torch.bfloat16, False, True, False))
    return [dataclasses.replace(c, gpu_only=True) for c in cases]


def default_cases() -> list[Case]:
    return [
        _int4_case(4096, 4096, 128, torch.float16, False, False),
        _int4_case(256, 33, 32, torch.bfloat16, True, False),
        _int4_case(136, 129, -1, torch.float32, True, False),
        _int4_case(128, 96, 64, torch.float16, True, True),
        _int4_gemm_case(1, 4096, 4096, torch.bfloat16, True, False, False),
        _int4_gemm_case(7, 1024, 300, torch.float16, False, True, True),
        _int4_gemm_case(33, 512, 129, torch.float32, False, False, True),
        _int4_gemm_repack_case(4096, 4096, False),
        _int4_gemm_repack_case(1000, 129, True),
        _spec_verify_case(16, 4, 32000, torch.bfloat16, False, False),
        _spec_verify_case(32, 3, 1000, torch.float32, True, True),
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
                if not backends.backend_available(backend, device):
                    continue
                if case.gpu_only and device.type != "cuda":
                    continue
                if backend == "triton" and device.type == "cpu" and case.size > 2**18:
                    continue  # the interpreter takes tens of seconds per million elements
                gen = torch.Generator().manual_seed(seed)
                args = (
                    case.make(device, gen, backend) if case.per_backend else case.make(device, gen)
                )
                try:
                    want = case.ref(*args)
                    t0 = time.perf_counter()
                    # The backend's implementation takes the op's flat tensor arguments.
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
