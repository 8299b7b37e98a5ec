"""Triton kernel of fp8_weight_gemm (contract in bitpress.ops.fp8_weight_gemm).

``y[m, n] = sum_k x[m, k] w[n, k] s(n, k) + bias[n]``: x [M, K] in bf16 / fp16 / fp32, w [N, K]
in E4M3 (``torch.float8_e4m3fn``, a Linear's weight), float32 accumulation, one rounding to x's
dtype. Weight scales (fp32):

* ``TENSOR``: one value, applied once to the fp32 sum;
* ``CHANNEL``: w_scale [N, 1], applied once per output column to the fp32 sum;
* ``BLOCK``: w_scale [ceil(N/128), ceil(K/128)] (128 x 128 blocks), applied to the partial sum
  of each BLOCK_K step (BLOCK_K divides 128, so a step lies in one block).

The path for GPUs without FP8 tensor cores (sm_80 / sm_86)
----------------------------------------------------------
The weight is read as bytes and decoded to x's dtype in registers with integer operations
(:func:`e4m3_to_f32`), then fed to ``tl.dot`` in bf16 / fp16: mma.sync m16n8k16 (HMMA.16816) on
sm_80, wgmma on sm_90. E4M3 is a subset of bf16 and of fp16 (3 mantissa bits, exponents
2^-9 .. 2^8), so the decode is exact, and scaling the fp32 sums instead of the weights keeps the
products exact as well: the only roundings are fp32 accumulation and the output. The decode
builds the fp32 bit pattern directly (no multiply by 2^120, so no float denormals anywhere):
exponent + (127 - 7) and mantissa << 20 for normals; for subnormals (m 2^-9) the normal 2^-6 (1 +
m/8) minus 2^-6, both exact; S.1111.111 is NaN. fp32 x runs the dot with ``input_precision="ieee"``.

Autotuning: ``@triton.autotune`` on CUDA tensors, key (M_BUCKET, N, K, SCALE). Under the Triton
interpreter (CPU tensors) a fixed config is used and ``DOT_F32`` makes the dot take fp32 operands
(the interpreter computes bf16 ``tl.dot`` wrongly, Triton 3.8); the decoded weights are exact in
fp32, so that changes only the summation order. Compiled kernels never set it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import keep_compilable, launch, new_output

TENSOR, CHANNEL, BLOCK = 0, 1, 2
SCALE_BLOCK = 128
_M_BUCKET_CAP = 4096


@triton.jit
def e4m3_to_f32(bits):
    """E4M3 (float8_e4m3fn) bit patterns (any integer type, low 8 bits) -> exact float32."""
    b = bits.to(tl.int32) & 0xFF
    e = (b >> 3) & 0xF
    sub = e == 0
    # Exponent rebiased from 7 to 127; a subnormal (e = 0, value m 2^-9) is built as the normal
    # 2^-6 (1 + m/8) and 2^-6 subtracted: exact, and no int -> float conversion.
    t = ((tl.where(sub, 121, e + 120) << 23) | ((b & 0x7) << 20)).to(tl.float32, bitcast=True)
    t = tl.where(sub, t - 0.015625, t)
    v = tl.where((b & 0x80) != 0, -t, t)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def fp8_weight_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sk,
    stride_om,
    SCALE: tl.constexpr,
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
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        wb = tl.load(w_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0)
        w = e4m3_to_f32(wb).to(x_ty)
        if SCALE == 2:
            if DOT_F32:
                part = tl.dot(xt.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif x_ty == tl.float32:
                part = tl.dot(xt, w, input_precision="ieee")
            else:
                part = tl.dot(xt, w)
            s = tl.load(
                s_ptr + (offs_n // 128) * stride_sn + (k0 // 128) * stride_sk,
                mask=mask_n,
                other=0.0,
            )
            acc += part * s[None, :]
        else:
            if DOT_F32:
                acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            elif x_ty == tl.float32:
                acc = tl.dot(xt, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SCALE == 0:
        acc *= tl.load(s_ptr)
    elif SCALE == 1:
        acc *= tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


keep_compilable(globals(), ("e4m3_to_f32",))


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    cap = max(args["M_BUCKET"], 16)
    fp32 = args["x_ptr"].dtype == torch.float32
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= cap
        # fp32 x: the "ieee" dot is an FMA loop; keep the per-thread product count where ptxas
        # does not spill (as int4_gemm's pruning).
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
        (64, 64, 16, 4, 3),
    ]
]

fp8_weight_gemm_autotuned = triton.autotune(
    _CONFIGS,
    key=["M_BUCKET", "N", "K", "SCALE"],
    prune_configs_by={"early_config_prune": _prune},
)(fp8_weight_gemm_kernel)


def scale_layout(N: int, K: int, w_scale: torch.Tensor) -> int:
    """TENSOR (one value), CHANNEL ([N, 1]) or BLOCK ([ceil(N/128), ceil(K/128)]); shapes already
    checked by the op. Where two layouts coincide in shape (N = 1, or N, K <= 128) they coincide
    in value."""
    if w_scale.numel() == 1:
        return TENSOR
    if tuple(w_scale.shape) == (N, 1):
        return CHANNEL
    return BLOCK


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.shape[1] if t.shape[0] <= 1 else t.stride(0)


def fp8_weight_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """W8A16 GEMM; arguments already checked by bitpress.ops.

    Parameters
    ----------
    x : Tensor [..., K], float32 / float16 / bfloat16, any strides
    w : float8_e4m3fn [N, K] (uint8 holding E4M3 bits is accepted too)
    w_scale : float32 [] / [1] (TENSOR), [N, 1] (CHANNEL) or [ceil(N/128), ceil(K/128)] (BLOCK)
    bias : [N] any float dtype, or None
    config : fixed ``BLOCK_M`` / ``BLOCK_N`` / ``BLOCK_K`` (dividing 128 in the BLOCK layout),
        optional ``GROUP_M``, ``num_warps``, ``num_stages``, instead of autotuning (CUDA) or the
        interpreter default.

    Returns
    -------
    Tensor [..., N] in x.dtype.
    """
    lead = x.shape[:-1]
    K, N = x.shape[-1], w.shape[0]
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
    mode = scale_layout(N, K, w_scale)
    x2 = _k_contiguous(x.reshape(M, K))
    wb = _k_contiguous(w).view(torch.uint8)
    s = w_scale.reshape(1, 1) if mode == TENSOR else w_scale
    bias = bias.contiguous() if bias is not None else None
    on_cpu = x.device.type == "cpu"
    if config is None and on_cpu:
        config = {"BLOCK_M": 16 if M <= 16 else 32, "BLOCK_N": 64, "BLOCK_K": 64}
    meta = {}
    if config is not None:
        config = dict(config)
        config.setdefault("GROUP_M", 8)
        meta = {"num_warps": config.pop("num_warps", 4), "num_stages": config.pop("num_stages", 3)}
        if mode == BLOCK and SCALE_BLOCK % config["BLOCK_K"]:
            raise ValueError(f"BLOCK_K={config['BLOCK_K']} must divide {SCALE_BLOCK}")
    args = (
        x2,
        wb,
        s,
        bias if bias is not None else s,
        out,
        M,
        N,
        K,
        min(triton.next_power_of_2(M), _M_BUCKET_CAP),
        _row_stride(x2),
        _row_stride(wb),
        s.stride(0),
        s.stride(1),
        out.stride(0),
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    flags = {"SCALE": mode, "HAS_BIAS": bias is not None, "DOT_F32": on_cpu}
    if config is None:
        launch(fp8_weight_gemm_autotuned, grid, x.device, *args, **flags)
    elif on_cpu:
        launch(fp8_weight_gemm_kernel, grid, x.device, *args, **flags, **config)
    else:
        launch(fp8_weight_gemm_kernel, grid, x.device, *args, **flags, **config, **meta)
    return out.reshape(*lead, N)


__all__ = ["BLOCK", "CHANNEL", "TENSOR", "e4m3_to_f32", "fp8_weight_gemm", "scale_layout"]
