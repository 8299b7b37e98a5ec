"""Triton kernel of sparse24_gemm on the interchange layout (contract in
bitpress.ops.sparse24_gemm).

``y[m, n] = sum_k x[m, k] W[n, k] + bias[n]`` where W [N, K] is the 2:4-sparse weight given by
its compressed form (``Sparse24Layout.ROW``, the interchange format):

* values [N, K/2] in x's dtype: the two kept weights of each group of 4 along K, in K order;
* meta uint8 [N, K/8]: one nibble per group of 4 (low nibble = the group with the lower K),
  nibble = idx0 | idx1 << 2 with idx0 < idx1 the positions of the kept values in the group.

float32 accumulation, one rounding to x's dtype; K % 8 == 0.

Expansion in registers (no sparse tensor cores)
-----------------------------------------------
Each K step reads a [BLOCK_N, BLOCK_K/2] tile of values and a [BLOCK_N, BLOCK_K/8] tile of meta
bytes -- 9/16 of the bytes of the dense bf16 tile -- and expands them in registers
(:func:`expand24`) into the dense [BLOCK_N, BLOCK_K] tile: a group's nibble gives idx0 and idx1,
and dense position p of the group holds v0 if p == idx0, v1 if p == idx1, else 0. The dense tile
then goes to ``tl.dot`` (mma.sync m16n8k16 on sm_80, wgmma on sm_90). The saving is in memory
traffic, which is what bounds decode-sized M; the tensor cores do the dense work (mma.sp, which
skips the zeros, is the CUDA backend's). A nibble with idx0 == idx1 (never produced by
sparse24_compress) gives v0 there.

Autotuning: ``@triton.autotune`` on CUDA tensors, key (M_BUCKET, N, K). Under the Triton
interpreter (CPU tensors) a fixed config is used and ``DOT_F32`` makes the dot take fp32 operands
(the interpreter computes bf16 ``tl.dot`` wrongly, Triton 3.8); the expanded weights are the
stored values, exact in fp32, so that changes only the summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import keep_compilable, launch, new_output

_M_BUCKET_CAP = 4096


@triton.jit
def meta_nibbles(
    meta_ptr, stride_meta, offs_n, mask_n, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """The [BLOCK_N, BLOCK_K/4] int32 nibbles of the groups of 4 in K range [k0, k0 + BLOCK_K)
    (0 for groups past K)."""
    offs_b = tl.arange(0, BLOCK_K // 8)
    ptrs = meta_ptr + offs_n[:, None] * stride_meta + (k0 // 8 + offs_b)[None, :]
    mask = mask_n[:, None] & (offs_b < (K - k0) // 8)[None, :]
    byte = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    shift = 4 * tl.arange(0, 2)
    nib = (byte[:, :, None] >> shift[None, None, :]) & 0xF
    return tl.reshape(nib, (BLOCK_N, BLOCK_K // 4))


@triton.jit
def expand24(v0, v1, nib, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile from the kept values v0, v1 [BLOCK_N, BLOCK_K/4] (first and
    second of each group) and the groups' nibbles [BLOCK_N, BLOCK_K/4]."""
    idx0 = nib & 3
    idx1 = nib >> 2
    p = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros_like(v0)[:, :, None]
    dense = tl.where(
        p == idx0[:, :, None],
        v0[:, :, None],
        tl.where(p == idx1[:, :, None], v1[:, :, None], zero),
    )
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.jit
def sparse24_gemm_kernel(
    x_ptr,
    values_ptr,
    meta_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_vn,
    stride_meta,
    stride_om,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    x_ty = x_ptr.dtype.element_ty
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
            mask=mask_m[:, None] & (offs_k < K - k0)[None, :],
            other=0.0,
        )
        vals = tl.load(
            values_ptr + offs_n[:, None] * stride_vn + (k0 // 2 + offs_v)[None, :],
            mask=mask_n[:, None] & (offs_v < (K - k0) // 2)[None, :],
            other=0.0,
        )
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
        nib = meta_nibbles(meta_ptr, stride_meta, offs_n, mask_n, k0, K, BLOCK_N, BLOCK_K)
        w = tl.trans(expand24(v0, v1, nib, BLOCK_N, BLOCK_K)).to(x_ty)  # [BLOCK_K, BLOCK_N]
        if DOT_F32:
            acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif x_ty == tl.float32:
            acc = tl.dot(xt, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


keep_compilable(globals(), ("meta_nibbles", "expand24"))


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    cap = max(args["M_BUCKET"], 16)
    fp32 = args["x_ptr"].dtype == torch.float32
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= cap
        and (
            not fp32
            or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]
            <= 512 * 32 * c.num_warps
        )
    ]
    return kept or [
        triton.Config(
            {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=3
        )
    ]


_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    for bm, bn, bk, w, s in [
        (16, 64, 128, 4, 4),
        (16, 128, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 64, 16, 4, 3),
    ]
]

sparse24_gemm_autotuned = triton.autotune(
    _CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune},
)(sparse24_gemm_kernel)


def k_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def row_stride(t: torch.Tensor) -> int:
    return t.shape[1] if t.shape[0] <= 1 else t.stride(0)


def sparse24_gemm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """2:4-sparse GEMM on the interchange layout; arguments already checked by bitpress.ops.

    Parameters
    ----------
    x : Tensor [..., K], float32 / float16 / bfloat16, any strides; K % 8 == 0
    values : [N, K/2] (x's dtype);  meta : uint8 [N, K/8]
    bias : [N] any float dtype, or None
    config : fixed ``BLOCK_M`` / ``BLOCK_N`` / ``BLOCK_K`` (a multiple of 16), optional
        ``GROUP_M``, ``num_warps``, ``num_stages``, instead of autotuning (CUDA) or the
        interpreter default.

    Returns
    -------
    Tensor [..., N] in x.dtype.
    """
    lead = x.shape[:-1]
    K, N = x.shape[-1], values.shape[0]
    M = 1
    for d in lead:
        M *= d
    out = new_output((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    if K == 0:
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
        out.copy_(y if bias is None else y + bias.float())
        return out.reshape(*lead, N)
    x2 = k_contiguous(x.reshape(M, K))
    values, meta = k_contiguous(values), k_contiguous(meta)
    bias = bias.contiguous() if bias is not None else None
    on_cpu = x.device.type == "cpu"
    if config is None and on_cpu:
        config = {"BLOCK_M": 16 if M <= 16 else 32, "BLOCK_N": 64, "BLOCK_K": 64}
    meta_cfg = {}
    if config is not None:
        config = dict(config)
        config.setdefault("GROUP_M", 8)
        meta_cfg = {
            "num_warps": config.pop("num_warps", 4),
            "num_stages": config.pop("num_stages", 3),
        }
        if config["BLOCK_K"] % 16:
            raise ValueError(f"BLOCK_K={config['BLOCK_K']} must be a multiple of 16")
    args = (
        x2,
        values,
        meta,
        bias if bias is not None else values,
        out,
        M,
        N,
        K,
        min(triton.next_power_of_2(M), _M_BUCKET_CAP),
        row_stride(x2),
        row_stride(values),
        row_stride(meta),
        out.stride(0),
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    flags = {"HAS_BIAS": bias is not None, "DOT_F32": on_cpu}
    if config is None:
        launch(sparse24_gemm_autotuned, grid, x.device, *args, **flags)
    elif on_cpu:
        launch(sparse24_gemm_kernel, grid, x.device, *args, **flags, **config)
    else:
        launch(sparse24_gemm_kernel, grid, x.device, *args, **flags, **config, **meta_cfg)
    return out.reshape(*lead, N)


__all__ = ["expand24", "meta_nibbles", "sparse24_gemm"]
