"""Triton kernel of sparse24_int4_gemm on the interchange layout (contract in
bitpress.ops.sparse24_int4_gemm).

``y[m, n] = sum_k x[m, k] W[n, k] + bias[n]`` where W [N, K] is 2:4-sparse with INT4 kept values:

* qvalues int32 [N, K/16]: the kept values of sparse24_gemm's ``values`` [N, K/2] as 4-bit codes
  0..15, 8 per int32, lowest nibble = lowest index;
* meta uint8 [N, K/8]: the positions, as in sparse24_gemm (one nibble idx0 | idx1 << 2 per group
  of 4 along K, low nibble = lower K);
* groups of ``group_size`` DENSE K positions (group_size % 8 == 0, or -1 for all of K): scales
  [ceil(K/group), N] (x's dtype or fp32), zeros None (w = (q - 8) s) or [ceil(K/group), N]
  float (w = (q - z) s).

The dequantized weight (q - z) s is computed in fp32 and rounded once to x's dtype, then the
tile is expanded in registers exactly as in :mod:`sparse24_gemm` (:func:`expand24`) and fed to
``tl.dot`` with an fp32 accumulator. Per K step a program reads BLOCK_N * BLOCK_K / 4 bytes of
codes and BLOCK_N * BLOCK_K / 8 bytes of meta: 0.375 bytes per dense weight against 2 for bf16.

A group of 4 never straddles a scale group (group_size % 8 == 0), so scales are read per group
of 4. When BLOCK_K divides group_size every tile lies in one group (``TILE_IN_GROUP``) and the
scales and zeros are [BLOCK_N] vectors per tile; otherwise they are read per group of 4.

Autotuning: ``@triton.autotune`` on CUDA tensors, key (M_BUCKET, N, K, group_size). When
group_size is a multiple of 16 the configs whose BLOCK_K does not divide it are pruned (BLOCK_K =
16 always does) and every tile lies in one group; otherwise (group_size = 8, 24, 40, ...) every
config reads the scales per group of 4. Under the Triton interpreter (CPU tensors) a fixed
config is used and ``DOT_F32`` casts both dot operands to fp32 after the weight was rounded to
x's dtype (the interpreter computes bf16 ``tl.dot`` wrongly, Triton 3.8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import keep_compilable, launch, new_output
from .sparse24_gemm import expand24, k_contiguous, meta_nibbles, row_stride

_M_BUCKET_CAP = 4096


@triton.jit
def sparse24_int4_gemm_kernel(
    x_ptr,
    q_ptr,
    meta_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    group_size,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_qn,
    stride_meta,
    stride_s,
    stride_z,
    stride_om,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
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
    offs_w = tl.arange(0, BLOCK_K // 16)
    offs_g = tl.arange(0, BLOCK_K // 4)
    shift = 4 * tl.arange(0, 8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
            mask=mask_m[:, None] & (offs_k < K - k0)[None, :],
            other=0.0,
        )
        words = tl.load(
            q_ptr + offs_n[:, None] * stride_qn + (k0 // 16 + offs_w)[None, :],
            mask=mask_n[:, None] & (offs_w < tl.cdiv(K - k0, 16))[None, :],
            other=0,
        )
        codes = (words[:, :, None] >> shift[None, None, :]) & 0xF  # [BLOCK_N, BLOCK_K/16, 8]
        c0, c1 = tl.split(tl.reshape(codes, (BLOCK_N, BLOCK_K // 4, 2)))
        if TILE_IN_GROUP:
            grp = k0 // group_size
            s = tl.load(scales_ptr + grp * stride_s + offs_n, mask=mask_n, other=0.0)
            s = s.to(tl.float32)[:, None]
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + grp * stride_z + offs_n, mask=mask_n, other=0.0)
                z = z.to(tl.float32)[:, None]
        else:
            # Groups of 4 past K read no scale (0): their x is 0 as well.
            grp = ((k0 + 4 * offs_g) // group_size).to(tl.int64)
            gmask = mask_n[:, None] & (offs_g < (K - k0) // 4)[None, :]
            s = tl.load(
                scales_ptr + grp[None, :] * stride_s + offs_n[:, None], mask=gmask, other=0.0
            ).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(
                    zeros_ptr + grp[None, :] * stride_z + offs_n[:, None], mask=gmask, other=0.0
                ).to(tl.float32)
        if HAS_ZEROS:
            w0 = ((c0.to(tl.float32) - z) * s).to(x_ty)
            w1 = ((c1.to(tl.float32) - z) * s).to(x_ty)
        else:
            w0 = ((c0 - 8).to(tl.float32) * s).to(x_ty)
            w1 = ((c1 - 8).to(tl.float32) * s).to(x_ty)
        nib = meta_nibbles(meta_ptr, stride_meta, offs_n, mask_n, k0, K, BLOCK_N, BLOCK_K)
        w = tl.trans(expand24(w0, w1, nib, BLOCK_N, BLOCK_K))  # [BLOCK_K, BLOCK_N]
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
    in_group = args["TILE_IN_GROUP"]
    gs = args["group_size"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= cap
        # TILE_IN_GROUP was decided by the launcher for every config: keep those it holds for.
        and (not in_group or gs % c.kwargs["BLOCK_K"] == 0)
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


# The INT4 decode holds more per weight than sparse24_gemm's (codes, scales, zeros): smaller
# K x N tiles than there (all compile without spills on sm_80 and sm_90, bf16, zeros on).
_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    for bm, bn, bk, w, s in [
        (16, 64, 64, 4, 4),
        (16, 128, 32, 4, 4),
        (16, 128, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (32, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (128, 128, 32, 8, 3),
        (64, 64, 16, 4, 3),
    ]
]

sparse24_int4_gemm_autotuned = triton.autotune(
    _CONFIGS,
    key=["M_BUCKET", "N", "K", "group_size"],
    prune_configs_by={"early_config_prune": _prune},
)(sparse24_int4_gemm_kernel)


def sparse24_int4_gemm(
    x: torch.Tensor,
    qvalues: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """2:4-sparse INT4 GEMM on the interchange layout; arguments already checked by bitpress.ops.

    Parameters
    ----------
    x : Tensor [..., K], float32 / float16 / bfloat16, any strides; K % 8 == 0
    qvalues : int32 [N, ceil(K/16)];  meta : uint8 [N, K/8]
    scales : [ceil(K/group), N] (x's dtype or fp32);  zeros : [ceil(K/group), N] float or None
    group_size : dense K positions per group, a multiple of 8, or -1 (all of K)
    bias : [N] any float dtype, or None
    config : fixed ``BLOCK_M`` / ``BLOCK_N`` / ``BLOCK_K`` (a multiple of 16), optional
        ``GROUP_M``, ``num_warps``, ``num_stages``, instead of autotuning (CUDA) or the
        interpreter default.

    Returns
    -------
    Tensor [..., N] in x.dtype.
    """
    lead = x.shape[:-1]
    K, N = x.shape[-1], meta.shape[0]
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
    gs = K if group_size == -1 else group_size
    x2 = k_contiguous(x.reshape(M, K))
    qvalues, meta = k_contiguous(qvalues), k_contiguous(meta)
    scales = k_contiguous(scales)
    zeros = k_contiguous(zeros) if zeros is not None else None
    bias = bias.contiguous() if bias is not None else None
    on_cpu = x.device.type == "cpu"
    if config is None and on_cpu:
        bk = 64 if gs % 64 == 0 else (32 if gs % 32 == 0 else 16)
        config = {"BLOCK_M": 16 if M <= 16 else 32, "BLOCK_N": 64, "BLOCK_K": bk}
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
        in_group = gs % config["BLOCK_K"] == 0
    else:
        # Then the pruning keeps the configs whose BLOCK_K divides the group (16 always does).
        in_group = gs % 16 == 0
    args = (
        x2,
        qvalues,
        meta,
        scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else scales,
        out,
        M,
        N,
        K,
        gs,
        min(triton.next_power_of_2(M), _M_BUCKET_CAP),
        row_stride(x2),
        row_stride(qvalues),
        row_stride(meta),
        row_stride(scales),
        row_stride(zeros) if zeros is not None else 0,
        out.stride(0),
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    flags = {
        "HAS_ZEROS": zeros is not None,
        "HAS_BIAS": bias is not None,
        "TILE_IN_GROUP": in_group,
        "DOT_F32": on_cpu,
    }
    if config is None:
        launch(sparse24_int4_gemm_autotuned, grid, x.device, *args, **flags)
    elif on_cpu:
        launch(sparse24_int4_gemm_kernel, grid, x.device, *args, **flags, **config)
    else:
        launch(sparse24_int4_gemm_kernel, grid, x.device, *args, **flags, **config, **meta_cfg)
    return out.reshape(*lead, N)


__all__ = ["sparse24_int4_gemm"]
