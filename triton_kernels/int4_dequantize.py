"""Triton kernel of int4_dequantize (contract in bitpress.ops.int4_dequantize).

One program per [BLOCK_K, BLOCK_N] tile of the output. Each element loads its packed word (the
8 rows that share a word hit the same cache line) and shifts out its nibble; scales and zero
points are gathered per row's group, so act-order g_idx needs no special path. The math is the
op's definition: float32 product, one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import launch, new_output


@triton.jit
def int4_dequantize_kernel(
    qweight_ptr,
    scales_ptr,
    qzeros_ptr,
    g_idx_ptr,
    out_ptr,
    K,
    N,
    group_size,
    num_groups,
    stride_q,
    stride_s,
    stride_z,
    stride_o,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n < N)[None, :]

    words = tl.load(
        qweight_ptr + (offs_k // 8)[:, None] * stride_q + offs_n[None, :], mask=mask, other=0
    )
    q = (words >> ((offs_k % 8) * 4).to(tl.int32)[:, None]) & 0xF

    if HAS_G_IDX:
        g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    else:
        g = offs_k // group_size
    g_ok = (g >= 0) & (g < num_groups)
    g = tl.where(g_ok, g, 0)
    s = tl.load(scales_ptr + g[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0)
    if HAS_ZEROS:
        zw = tl.load(
            qzeros_ptr + g[:, None] * stride_z + (offs_n // 8)[None, :], mask=mask, other=0
        )
        z = (zw >> ((offs_n % 8) * 4).to(tl.int32)[None, :]) & 0xF
    else:
        z = 8
    w = (q - z).to(tl.float32) * s.to(tl.float32)
    # A g_idx outside [0, G) cannot be raised without a host sync: NaN marks it.
    w = tl.where(g_ok[:, None], w, float("nan"))
    tl.store(
        out_ptr + offs_k[:, None] * stride_o + offs_n[None, :],
        w.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    ok = (t.shape[-1] <= 1 or t.stride(-1) == 1) and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])
    return t if ok else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return max(t.shape[1], 1) if t.shape[0] <= 1 else t.stride(0)


def int4_dequantize(
    qweight,
    scales,
    qzeros,
    g_idx,
    group_size: int,
    dtype: torch.dtype,
    block_k: int = 32,
    block_n: int = 64,
):
    """Launch the kernel; arguments already checked by bitpress.ops."""
    K, N, G = qweight.shape[0] * 8, qweight.shape[1], scales.shape[0]
    out = new_output((K, N), dtype, qweight.device)
    if K == 0 or N == 0:
        return out
    qweight, scales = _rows(qweight), _rows(scales)
    qzeros = _rows(qzeros) if qzeros is not None else None
    g_idx = g_idx.contiguous() if g_idx is not None else None
    gs = K if group_size == -1 else group_size
    grid = (triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    launch(
        int4_dequantize_kernel,
        grid,
        qweight.device,
        qweight,
        scales,
        qzeros if qzeros is not None else qweight,
        g_idx if g_idx is not None else qweight,
        out,
        K,
        N,
        gs,
        G,
        _row_stride(qweight),
        _row_stride(scales),
        _row_stride(qzeros) if qzeros is not None else 0,
        _row_stride(out),
        HAS_ZEROS=qzeros is not None,
        HAS_G_IDX=g_idx is not None,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
    )
    return out
