"""Triton kernel of fp8_gemm (contract in bitpress.ops.fp8_gemm).

``y[m, n] = sum_k (a[m, k] sa(m, k)) (b[n, k] sb(n, k)) + bias[n]`` with a [M, K] and b [N, K]
(a Linear's weight) in E4M3 (``torch.float8_e4m3fn``), float32 accumulation and one rounding to
``out_dtype`` (bf16, fp16 or fp32). Scale layouts (fp32):

* ``TENSOR``: scale_a and scale_b hold one value each; applied once to the fp32 sum.
* ``ROW``: scale_a [M, 1], scale_b [N, 1] (torch._scaled_mm's rowwise recipe), either of them
  possibly one value; applied once per output element to the fp32 sum.
* ``BLOCK``: scale_a [M, ceil(K/128)] (1 x 128 activation blocks), scale_b [ceil(N/128),
  ceil(K/128)] (128 x 128 weight blocks, the DeepSeek-V3 recipe); applied per 128-K step.

Tensor cores and promotion
--------------------------
Both operands go to ``tl.dot`` as E4M3: ``wgmma.mma_async ... .e4m3.e4m3`` on sm_90 (QGMMA), and
``mma.sync.aligned.m16n8k32 ... .e4m3.e4m3`` on sm_89. Hopper's FP8 wgmma needs both operands
K-major in shared memory: a [M, K] and b [N, K] are K-contiguous (the launcher copies an operand
whose last dimension is strided), and the B tile is read as the [BLOCK_K, BLOCK_N] view of b's
K-contiguous rows, which is K-major for the MMA without a transpose.

Hopper's FP8 MMA accumulates with reduced precision (about 14 bits of mantissa; DeepSeek-V3
§3.3.2), so long-K sums lose accuracy when the tensor-core accumulator is carried over the whole
of K. Every BLOCK_K (<= 128) step therefore runs ``tl.dot`` into a fresh accumulator and adds the
partial sum into an fp32 register accumulator: the promotion interval is BLOCK_K <= 128. In the
BLOCK layout the step's two scales multiply the partial sum at that promotion (BLOCK_K divides 128,
so a step lies in one 128-K block). On sm_89 (mma.sync accumulates in fp32) Triton fuses the add
back into the MMA's accumulator, which is exact there.

Autotuning: on CUDA tensors the kernel is ``@triton.autotune``-d over tile shapes with key
(M_BUCKET, N, K, SCALE): M_BUCKET = next power of two of M (capped), so every new batch size
does not trigger a new benchmark. Under the Triton interpreter (CPU tensors) a fixed config is
used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import launch, new_output

# Scale layouts (the SCALE constexpr).
TENSOR, ROW, BLOCK = 0, 1, 2
# K and N extent of one scale block in the BLOCK layout (the DeepSeek-V3 recipe).
SCALE_BLOCK = 128
_M_BUCKET_CAP = 4096


@triton.jit
def fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    sa_ptr,
    sb_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_am,
    stride_bn,
    stride_sam,
    stride_sak,
    stride_sbn,
    stride_sbk,
    stride_om,
    SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row blocks share each column block of b while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    # [BLOCK_K, BLOCK_N] view of b's K-contiguous rows: the K-major B operand.
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
        # A fresh accumulator per step: the fp32 promotion of the tensor-core sum.
        part = tl.dot(a, b)
        if SCALE == 2:
            kb = k0 // 128
            sa = tl.load(sa_ptr + offs_m * stride_sam + kb * stride_sak, mask=mask_m, other=0.0)
            sb = tl.load(
                sb_ptr + (offs_n // 128) * stride_sbn + kb * stride_sbk, mask=mask_n, other=0.0
            )
            acc += part * (sa[:, None] * sb[None, :])
        else:
            acc += part
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SCALE == 0:
        acc *= tl.load(sa_ptr) * tl.load(sb_ptr)
    elif SCALE == 1:
        sa = tl.load(sa_ptr + offs_m * stride_sam, mask=mask_m, other=0.0)
        sb = tl.load(sb_ptr + offs_n * stride_sbn, mask=mask_n, other=0.0)
        acc *= sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    # A row block taller than the (bucketed) M only multiplies zeros.
    cap = max(args["M_BUCKET"], 16)
    return [c for c in configs if c.kwargs["BLOCK_M"] <= cap] or configs[:1]


# Every BLOCK_K is 128: the BLOCK layout needs BLOCK_K | 128, and 128 is the promotion interval
# the issue asks for (and DeepGEMM's). Small BLOCK_M configs serve decode-sized M.
_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    for bm, bn, w, s in [
        (16, 64, 4, 4),
        (16, 128, 4, 4),
        (32, 64, 4, 4),
        (32, 128, 4, 4),
        (64, 64, 4, 4),
        (64, 128, 4, 4),
        (128, 64, 4, 4),
        (128, 128, 8, 3),
    ]
]

fp8_gemm_autotuned = triton.autotune(
    _CONFIGS,
    key=["M_BUCKET", "N", "K", "SCALE"],
    prune_configs_by={"early_config_prune": _prune},
)(fp8_gemm_kernel)


def scale_layout(M: int, N: int, K: int, scale_a: torch.Tensor, scale_b: torch.Tensor) -> int:
    """BLOCK if scale_a is [M, ceil(K/128)] and scale_b [ceil(N/128), ceil(K/128)]; else TENSOR
    if both hold one value; else ROW (scale_a [M, 1] or one value, scale_b [N, 1] or one value:
    torch._scaled_mm's rowwise recipe and the mixed ones). Shapes already checked by the op;
    where two layouts coincide in shape they coincide in value."""
    kb = triton.cdiv(K, SCALE_BLOCK)
    if tuple(scale_a.shape) == (M, kb) and tuple(scale_b.shape) == (triton.cdiv(N, 128), kb):
        return BLOCK
    if scale_a.numel() == 1 and scale_b.numel() == 1:
        return TENSOR
    return ROW


def _row_scale(s: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A ROW-layout scale as (tensor, stride per row): one value broadcasts with stride 0."""
    return (s.reshape(1), 0) if s.numel() == 1 else (s, s.stride(0))


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.shape[1] if t.shape[0] <= 1 else t.stride(0)


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """W8A8 FP8 GEMM; arguments already checked by bitpress.ops.

    Parameters
    ----------
    a : float8_e4m3fn [M, K];  b : float8_e4m3fn [N, K]
    scale_a, scale_b : float32, TENSOR ([] / [1] each), ROW ([M, 1] or one value and [N, 1] or
        one value) or BLOCK ([M, ceil(K/128)] and [ceil(N/128), ceil(K/128)])
    bias : [N] any float dtype, or None;  out_dtype : bf16 (default), fp16 or fp32
    config : fixed ``BLOCK_M`` / ``BLOCK_N`` / ``BLOCK_K`` (dividing 128 in the BLOCK layout),
        optional ``GROUP_M``, ``num_warps``, ``num_stages``, instead of autotuning (CUDA) or the
        interpreter default.

    Returns
    -------
    Tensor [M, N] in out_dtype.
    """
    out_dtype = out_dtype or torch.bfloat16
    M, K = a.shape
    N = b.shape[0]
    out = new_output((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        y = torch.zeros((M, N), dtype=torch.float32, device=a.device)
        out.copy_(y if bias is None else y + bias.float())
        return out
    mode = scale_layout(M, N, K, scale_a, scale_b)
    a, b = _k_contiguous(a), _k_contiguous(b)
    if mode == BLOCK:
        sa, sb = scale_a, scale_b
        strides = (sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1))
    else:
        (sa, sam), (sb, sbn) = _row_scale(scale_a), _row_scale(scale_b)
        strides = (sam, 0, sbn, 0)
    bias = bias.contiguous() if bias is not None else None
    on_cpu = a.device.type == "cpu"
    if config is None and on_cpu:
        config = {"BLOCK_M": 16 if M <= 16 else 32, "BLOCK_N": 64, "BLOCK_K": 128}
    meta = {}
    if config is not None:
        config = dict(config)
        config.setdefault("GROUP_M", 8)
        meta = {"num_warps": config.pop("num_warps", 4), "num_stages": config.pop("num_stages", 3)}
        if mode == BLOCK and SCALE_BLOCK % config["BLOCK_K"]:
            raise ValueError(f"BLOCK_K={config['BLOCK_K']} must divide {SCALE_BLOCK}")
    args = (
        a,
        b,
        sa,
        sb,
        bias if bias is not None else sa,
        out,
        M,
        N,
        K,
        min(triton.next_power_of_2(M), _M_BUCKET_CAP),
        _row_stride(a),
        _row_stride(b),
        *strides,
        out.stride(0),
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    flags = {"SCALE": mode, "HAS_BIAS": bias is not None}
    if config is None:
        launch(fp8_gemm_autotuned, grid, a.device, *args, **flags)
    elif on_cpu:
        launch(fp8_gemm_kernel, grid, a.device, *args, **flags, **config)
    else:
        launch(fp8_gemm_kernel, grid, a.device, *args, **flags, **config, **meta)
    return out


__all__ = ["BLOCK", "ROW", "TENSOR", "fp8_gemm", "scale_layout"]
