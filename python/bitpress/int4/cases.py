"""The selftest cases of the INT4 ops (``python -m bitpress selftest``): shapes that cover every
kernel path, built from fresh random data, compared against :mod:`bitpress.int4.reference`."""

from __future__ import annotations

import dataclasses

import torch

from bitpress._core.registry import Case
from bitpress.int4 import reference
from bitpress.int4.layout import Int4CpuTiles, Int4MmaTiles, mma_row_order, pack
from bitpress.int4.packing import pack_int4_along_k, pack_int4_along_n
from bitpress.int4.quantized import QuantizedWeight


def _to(device, args: tuple) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _dequantize_case(K, N, group_size, dtype, zeros, act_order):
    def make(device, gen, backend):
        G = 5 if act_order else -(-K // (K if group_size == -1 else group_size))
        q = torch.randint(0, 16, (K, N), generator=gen)
        scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).to(dtype)
        qzeros = pack_int4_along_n(torch.randint(0, 16, (G, N), generator=gen)) if zeros else None
        g_idx = torch.randint(0, G, (K,), generator=gen, dtype=torch.int32) if act_order else None
        return _to(device, (pack_int4_along_k(q), scales, qzeros, g_idx, group_size, dtype))

    tag = f"K={K} N={N} g={group_size} {str(dtype).removeprefix('torch.')}"
    tag += " asym" if zeros else " sym"
    tag += " act-order" if act_order else ""
    return Case("int4_dequantize", tag, make, reference.int4_dequantize, 0.0, K * N)


def _gemm_case(M, K, N, dtype, sym, act_order, bias):
    def make(device, gen, backend):
        # The CUDA and Triton kernels read the GPU mma layout, the CPU kernel the CPU tiles.
        layout = Int4MmaTiles if backend in ("cuda", "triton") else Int4CpuTiles
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
        weight = pack(QuantizedWeight(q, scales, zeros, g_idx.int(), gs, sym), layout=layout)
        x = torch.randn(M, K, generator=gen).to(dtype)
        b = torch.randn(N, generator=gen).to(dtype) if bias else None
        return (x.to(device), weight.to(device), None if b is None else b.to(device))

    tag = f"M={M} K={K} N={N} g=128 {str(dtype).removeprefix('torch.')}"
    tag += (" sym" if sym else " asym") + (" act-order" if act_order else "")
    tag += " bias" if bias else ""
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    return Case("int4_gemm", tag, make, reference.int4_gemm, tol, M * K * N // 64)


def _repack_case(K, N, act_order):
    def make(device, gen, backend):
        G = -(-K // 128)
        q = torch.randint(0, 16, (K, N), generator=gen)
        g_idx = (torch.randperm(K, generator=gen) if act_order else torch.arange(K)) * G // K
        perm, _ = mma_row_order(g_idx, G)
        return _to(device, (pack_int4_along_k(q), perm.int() if act_order else None))

    tag = f"K={K} N={N}" + (" act-order" if act_order else "")
    return Case("int4_gemm_repack", tag, make, reference.int4_gemm_repack, 0.0, K * N // 8)


def int4_dequantize_cases() -> list[Case]:
    return [
        _dequantize_case(4096, 4096, 128, torch.float16, False, False),
        _dequantize_case(256, 33, 32, torch.bfloat16, True, False),
        _dequantize_case(136, 129, -1, torch.float32, True, False),
        _dequantize_case(128, 96, 64, torch.float16, True, True),
    ]


def int4_gemm_cases() -> list[Case]:
    return [
        _gemm_case(1, 4096, 4096, torch.bfloat16, True, False, False),
        _gemm_case(7, 1024, 300, torch.float16, False, True, True),
        _gemm_case(33, 512, 129, torch.float32, False, False, True),
    ]


def int4_gemm_gpu_cases() -> list[Case]:
    """Every M regime of the CUDA int4_gemm dispatch (split-K GEMV, tiled kernel, dequantize +
    cuBLAS above the threshold) at Llama-sized shapes."""
    cases = []
    for M in (1, 16, 64, 65, 300):
        for dtype in (torch.float16, torch.bfloat16):
            cases.append(_gemm_case(M, 4096, 4096, dtype, True, False, False))
    cases.append(_gemm_case(16, 4096, 14336, torch.float16, False, True, True))
    cases.append(_gemm_case(5, 14336, 4096, torch.bfloat16, False, True, False))
    return [dataclasses.replace(c, gpu_only=True) for c in cases]


def int4_gemm_repack_cases() -> list[Case]:
    return [_repack_case(4096, 4096, False), _repack_case(1000, 129, True)]
