"""Triton kernels of int4_gemm on the GPU mma layout (contract in bitpress.ops.int4_gemm).

``y[m, n] = sum_k x[m, perm[k]] * (q[k, n] - z[g(k), n]) * s[g(k), n] + bias[n]``, float32
accumulation, one rounding to x.dtype. The weight layout is described in
``csrc/include/bitpress/int4/int4_mma_layout.h``.

Decoding the layout without a gather
------------------------------------
A k16 x n64 tile is 128 contiguous words: word ``16 g + 4 t + w`` (lane 4g + t, word w) holds,
in nibble ``4 klo + 2 jlow + khi``, the value of row ``kk = 8 khi + 2 t + klo`` and column ``nn
= 16 w + 8 jlow + g``. The kernels load the words of BLOCK_K/16 k-tiles and BLOCK_N/64 n-tiles
as an array [kt, t, (nt, g, w)], each word once, in contiguous 16-byte runs (one lane's 4 words;
vectorized loads where a thread holds 2 or 4 of them), and expand it by broadcasting a shift
over the three nibble bits into [kt, khi, t, klo, (nt, g, w), jlow] -- a reshape away from a
[BLOCK_K, BLOCK_N] tile whose rows are in natural order (so x is read contiguously) and whose
columns are a fixed permutation of the block's (``_tile_cols``). The columns are never permuted
back: that only moves where scales / zero points are read and results are stored.

Every tile lies in one group: BLOCK_K divides ``group_rows`` (the launcher and the autotune
pruning guarantee it; 16 always does), so scales and zero points are [BLOCK_N] vectors per tile
and no masks are needed along K (Kp = G * group_rows is a multiple of BLOCK_K).

Two paths, chosen by M (``GEMV_MAX_M = 16``)
--------------------------------------------
* **Split-K GEMV** (M <= 16; ``int4_gemv_kernel``). Decode-time shapes read the weight once and
  do 2 M flops per weight: the work is bandwidth-bound and tensor cores would idle (mma's m is
  16). One program owns a slab of BLOCK_N columns, up to 16 rows of x (BLOCK_M = next power of
  two of M) and a range of K; it broadcast-multiplies x [BLOCK_M, BLOCK_K] by (q - z)
  [BLOCK_K, BLOCK_N], reduces over K in float32 and applies the tile's scale once per tile. A
  program reads BLOCK_K * BLOCK_N / 2 bytes of weight per step (4 KiB at 64 x 128). Without
  splitting K, a 4096 x 4096 layer has only 64 slabs of 64 columns for the 132 SMs of an H100:
  half the machine idles, and each SM can't keep enough loads in flight. The launcher splits K
  into S ranges so that there are about 4 programs per SM at BLOCK_N = 64 (``_split_k``), each
  writing its partial sums to an fp32 workspace [S, M, N]; ``int4_gemm_reduce_kernel`` adds the
  S partials in a fixed order (deterministic), adds the bias and rounds once. With S = 1 the GEMV
  kernel writes the output itself. No host syncs: the workspace size follows from shapes only.
  The threshold is the issue's, not a measured crossover: at M = 16 the GEMV does 64 fp32 flops
  per weight byte where an H100 balances at ~20 (67 TFLOP/s FMA / 3.35 TB/s), so the best
  crossover on a GPU is likely lower (M ~ 4-8); it needs a GPU measurement (bench/).
* **Tiled GEMM** (M > 16; ``int4_gemm_kernel``). One program per [BLOCK_M, BLOCK_N] output
  tile; per K step it dequantizes the [BLOCK_K, BLOCK_N] weight tile to x's dtype (float32
  product, one rounding) and runs tl.dot with a float32 accumulator: mma.sync m16n8k16 on sm_80,
  wgmma on sm_90. Per step it reads BLOCK_M * BLOCK_K x-elements and BLOCK_K * BLOCK_N / 2 bytes
  of weight: at 128 x 128 x 32, 8 KiB of bf16 x against 2 KiB of weight, i.e. the weight is
  reused by BLOCK_M rows and x by BLOCK_N columns. fp32 x uses ``input_precision="ieee"``.

Autotuning
----------
Both kernels are ``@triton.autotune``-d on CUDA tensors. The GEMV key is (BLOCK_M, N, KT,
tiles_per_group) -- BLOCK_M is the M bucket, S follows from N and K -- and the GEMM key is
(M_BUCKET, N, KT, tiles_per_group), M_BUCKET = next power of two of M (capped at 4096), so that
each new batch size does not trigger a new benchmark; the autotuner adds the dtypes of the
tensor arguments. Configs whose BLOCK_K does not divide group_rows are pruned (a BLOCK_K = 16
config is always valid), as are GEMV configs with more than 256 products per thread and, for
fp32 x, GEMM configs with more than 512 per thread (the FMA dot spills beyond). Autotuning
benchmarks on the first call of each key: warm a model up before capturing it in a CUDA graph.

Under the Triton interpreter (CPU tensors) nothing is benchmarked: the launcher runs the
undecorated kernels with a fixed config (``_interpreter_config``). There, ``DOT_F32`` makes the
GEMM kernel cast both tl.dot operands to float32 (the interpreter computes bf16 tl.dot wrongly,
Triton 3.8); the compiled kernels never set it.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._runtime import keep_compilable, launch, new_output

# Largest M that takes the split-K GEMV path; above it the tiled tl.dot kernel is used.
GEMV_MAX_M = 16
_M_BUCKET_CAP = 4096
# GEMV tiles hold BLOCK_M x BLOCK_K x BLOCK_N products in flight; up to 256 per thread compile to
# <= 96 registers without spills (sm_80 / sm_90, 16 x 32 x 64 at 4 warps, measured).
GEMV_PRODUCTS_PER_THREAD = 256


@triton.jit
def _tile_cols(BLOCK_N: tl.constexpr):
    # Column gamma is (nt, g, w, jlow) = gamma's digits (BLOCK_N/64, 8, 4, 2): column
    # 64 nt + 16 w + 8 jlow + g of the block.
    gam = tl.arange(0, BLOCK_N)
    return 64 * (gam // 64) + 16 * ((gam // 2) % 4) + 8 * (gam % 2) + (gam // 8) % 8


@triton.jit
def _decode_tile(
    qweight_ptr, stride_q, kt0, nt0, n_tiles, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    # q [BLOCK_K, BLOCK_N] int32 of k-tiles kt0.. and n-tiles nt0..: rows in natural order,
    # columns in _tile_cols order. Words [kt, t, (nt, g, w)] at kt*stride_q + 4t + 128nt + 16g + w.
    kt = tl.arange(0, BLOCK_K // 16)
    t = tl.arange(0, 4)
    c = tl.arange(0, BLOCK_N // 2)
    # Runs of 4 words (one lane's 16 bytes) are contiguous and 16-byte aligned.
    col_off = tl.max_contiguous(
        tl.multiple_of((nt0 + c // 32) * 128 + 16 * ((c // 4) % 8) + c % 4, 4), 4
    )
    row_off = (kt0 + kt).to(tl.int64) * stride_q
    words = tl.load(
        qweight_ptr + row_off[:, None, None] + 4 * t[None, :, None] + col_off[None, None, :],
        mask=(nt0 + c // 32 < n_tiles)[None, None, :],
        other=0,
    )
    khi = tl.arange(0, 2)[None, :, None, None, None, None]
    klo = tl.arange(0, 2)[None, None, None, :, None, None]
    jlow = tl.arange(0, 2)[None, None, None, None, None, :]
    # [kt, khi, t, klo, (nt, g, w), jlow]: row 16 kt + 8 khi + 2 t + klo; the value sits in
    # nibble 4 klo + 2 jlow + khi (int4_mma_nibble_of_value of v = 4 jlow + 2 khi + klo).
    shift = 16 * klo + 8 * jlow + 4 * khi
    q = (words[:, None, :, None, :, None] >> shift) & 0xF
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def _group_tile(
    qweight_ptr,
    stride_q,
    zeros_ptr,
    stride_z,
    scales_ptr,
    stride_s,
    kt0,
    nt0,
    n_tiles,
    grp,
    cols,
    cmask,
    HAS_ZEROS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # (q - z [BLOCK_K, BLOCK_N] int32, s [BLOCK_N] float32) of a tile that lies in group grp.
    q = _decode_tile(qweight_ptr, stride_q, kt0, nt0, n_tiles, BLOCK_K, BLOCK_N)
    if HAS_ZEROS:
        z = tl.load(zeros_ptr + grp * stride_z + cols, mask=cmask, other=8).to(tl.int32)
        q = q - z[None, :]
    else:
        q = q - 8
    s = tl.load(scales_ptr + grp * stride_s + cols, mask=cmask, other=0.0)
    return q, s


@triton.jit
def _load_x(x_ptr, perm_ptr, offs_m, mask_m, k, K, stride_xm, stride_xk, HAS_PERM: tl.constexpr):
    # x[m, perm[k]] for m in offs_m, k in k (packed rows); 0 for padding rows (perm = -1). A perm
    # value outside [-1, K) is never read (it would address past the row of x) and gives NaN:
    # the CUDA backend's contract (its gather writes NaN into x_perm), so every output row is
    # NaN. Checking the values would need a host sync.
    if HAS_PERM:
        src = tl.load(perm_ptr + k)
        inside = (src >= 0) & (src < K)
        mask = mask_m[:, None] & inside[None, :]
    else:
        src = k
        mask = mask_m[:, None]
    ptrs = x_ptr + offs_m[:, None] * stride_xm + src.to(tl.int64)[None, :] * stride_xk
    xv = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_PERM:
        bad = ~inside & (src != -1)
        # Selected in float32 (exact for every x dtype): the interpreter has no bf16 constants.
        xv = tl.where(bad[None, :], float("nan"), xv.to(tl.float32)).to(xv.dtype)
    return xv


@triton.jit
def int4_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    M,
    K,
    N,
    KT,
    tiles_per_group,
    S,
    stride_xm,
    stride_xk,
    stride_q,
    stride_s,
    stride_z,
    stride_os,
    stride_om,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    BKT: tl.constexpr = BLOCK_K // 16
    n_blocks = KT // BKT
    per_split = tl.cdiv(n_blocks, S)
    b_begin = pid_s * per_split
    b_end = tl.minimum(b_begin + per_split, n_blocks)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    cols = pid_n * BLOCK_N + _tile_cols(BLOCK_N)
    # A block may reach past Np = 64 * n_tiles (BLOCK_N > 64): those words / scales don't exist.
    cmask = cols < N
    n_tiles = tl.cdiv(N, 64)
    nt0 = pid_n * (BLOCK_N // 64)
    rows = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(b_begin, b_end):
        kt0 = b * BKT
        grp = (kt0 // tiles_per_group).to(tl.int64)
        q, s = _group_tile(
            qweight_ptr,
            stride_q,
            zeros_ptr,
            stride_z,
            scales_ptr,
            stride_s,
            kt0,
            nt0,
            n_tiles,
            grp,
            cols,
            cmask,
            HAS_ZEROS,
            BLOCK_K,
            BLOCK_N,
        )
        xt = _load_x(
            x_ptr, perm_ptr, offs_m, mask_m, kt0 * 16 + rows, K, stride_xm, stride_xk, HAS_PERM
        ).to(tl.float32)
        # The tile lies in one group: sum_k x (q - z) first, one scale multiply per column.
        part = tl.sum(xt[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)
        acc += part * s[None, :]

    mask = mask_m[:, None] & (cols < N)[None, :]
    ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + cols[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def int4_gemm_reduce_kernel(
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    S,
    stride_ws,
    stride_wm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # out = round(sum_s ws[s] + bias): the S partials added in a fixed order (deterministic).
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = ws_ptr + offs_m[:, None] * stride_wm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, S):
        # The pointers advance by stride_ws (64-bit address arithmetic) rather than adding an
        # int32 s * stride_ws: S * M * Np passes 2^31 long before the workspace runs out of
        # memory (S = 32 partials of M = 16 rows need only Np > 4M columns), and the 32-bit
        # product would wrap and read before the workspace.
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_ws
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def int4_gemm_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    M,
    K,
    N,
    KT,
    tiles_per_group,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_xk,
    stride_q,
    stride_s,
    stride_z,
    stride_om,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    BKT: tl.constexpr = BLOCK_K // 16
    x_ty = x_ptr.dtype.element_ty
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    cols = pid_n * BLOCK_N + _tile_cols(BLOCK_N)
    # A block may reach past Np = 64 * n_tiles (BLOCK_N > 64): those words / scales don't exist.
    cmask = cols < N
    n_tiles = tl.cdiv(N, 64)
    nt0 = pid_n * (BLOCK_N // 64)
    rows = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt0 in range(0, KT, BKT):
        grp = (kt0 // tiles_per_group).to(tl.int64)
        q, s = _group_tile(
            qweight_ptr,
            stride_q,
            zeros_ptr,
            stride_z,
            scales_ptr,
            stride_s,
            kt0,
            nt0,
            n_tiles,
            grp,
            cols,
            cmask,
            HAS_ZEROS,
            BLOCK_K,
            BLOCK_N,
        )
        w = (q.to(tl.float32) * s[None, :]).to(x_ty)
        xt = _load_x(
            x_ptr, perm_ptr, offs_m, mask_m, kt0 * 16 + rows, K, stride_xm, stride_xk, HAS_PERM
        )
        if DOT_F32:
            acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif x_ty == tl.float32:
            acc = tl.dot(xt, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & (cols < N)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + cols[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


keep_compilable(globals(), ("_tile_cols", "_decode_tile", "_load_x"))


# --------------------------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------------------------


def _divides_group(cfg: triton.Config, group_rows: int) -> bool:
    return group_rows % cfg.kwargs["BLOCK_K"] == 0


def _prune_gemv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    group_rows = 16 * args["tiles_per_group"]
    bm = args["BLOCK_M"]
    kept = [
        c
        for c in configs
        if _divides_group(c, group_rows)
        and bm * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"]
        <= GEMV_PRODUCTS_PER_THREAD * 32 * c.num_warps
    ]
    return kept or [triton.Config({"BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=2)]


def _prune_gemm(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    group_rows = 16 * args["tiles_per_group"]
    cap = max(args["M_BUCKET"], 32)
    # fp32 x: the "ieee" dot is an FMA loop holding operand slices of the whole product in
    # registers; above 512 products per thread per step ptxas spills (sm_80, measured).
    fp32 = args["x_ptr"].dtype == torch.float32
    kept = [
        c
        for c in configs
        if _divides_group(c, group_rows)
        and c.kwargs["BLOCK_M"] <= cap
        and (not fp32 or _products(c) <= 512 * 32 * c.num_warps)
    ]
    return kept or [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3)
    ]


def _products(cfg: triton.Config) -> int:
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"]


_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [
        (64, 16, 4, 2),
        (64, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (128, 32, 4, 3),
        (128, 64, 4, 3),
        (128, 128, 8, 3),
        (64, 256, 8, 3),
        (128, 16, 4, 3),
        (256, 32, 8, 3),
    ]
]

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (32, 64, 16, 4, 3),
        (32, 64, 32, 4, 3),
        (64, 64, 16, 4, 3),
        (64, 64, 32, 8, 3),
        (64, 128, 16, 8, 3),
        (64, 64, 32, 4, 4),
        (64, 128, 32, 4, 3),
        (128, 64, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 3),
    ]
]

int4_gemv_autotuned = triton.autotune(
    _GEMV_CONFIGS,
    key=["BLOCK_M", "N", "KT", "tiles_per_group"],
    prune_configs_by={"early_config_prune": _prune_gemv},
)(int4_gemv_kernel)

int4_gemm_autotuned = triton.autotune(
    _GEMM_CONFIGS,
    key=["M_BUCKET", "N", "KT", "tiles_per_group"],
    prune_configs_by={"early_config_prune": _prune_gemm},
)(int4_gemm_kernel)


def _largest_block_k(group_rows: int, limit: int) -> int:
    bk = 16
    while bk * 2 <= limit and group_rows % (bk * 2) == 0:
        bk *= 2
    return bk


def _interpreter_config(path: str, group_rows: int, Np: int) -> dict:
    """The fixed config of CPU (interpreter) launches: big blocks, as the interpreter's cost is
    per program; BLOCK_K the largest power of two up to 64 that divides group_rows."""
    bn = 128 if Np >= 128 else 64
    cfg = {"BLOCK_N": bn, "BLOCK_K": _largest_block_k(group_rows, 64)}
    if path == "gemm":
        cfg["BLOCK_M"] = 32
    return cfg


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(Np: int, KT: int, device: torch.device) -> int:
    """Number of K ranges S of the GEMV: about 4 programs per SM at BLOCK_N = 64, each K range at
    least 8 k-tiles (128 rows), at most 32 (the reduce reads S partials per output)."""
    sms = _sm_count(device.index if device.index is not None else 0) if device.type == "cuda" else 4
    slabs = max(Np // 64, 1)
    return max(1, min(triton.cdiv(4 * sms, slabs), KT // 8, 32))


def _strided_2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.shape[1] if t.shape[0] <= 1 else t.stride(0)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def int4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_starts: torch.Tensor,
    perm: torch.Tensor | None,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
    split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """INT4 weight-only GEMM on the mma layout; arguments already checked by bitpress.ops.

    Parameters
    ----------
    x : Tensor [..., K], float32 / float16 / bfloat16, any strides
    qweight : int32 [Kp/16, Nt*128];  scales : float32 [G, Np];  zeros : uint8 [G, Np] or None
    group_starts : int32 [G+1] (unused: groups are uniform, group_rows = Kp / G)
    perm : int32 [Kp] or None (None: K == Kp, identity; -1: padding row; a value outside
        [-1, K) makes every output row NaN, as on the CUDA backend)
    out_features : N;  bias : [N] any float dtype, or None
    path : "gemv" / "gemm" to force a kernel (tests); default: "gemv" iff M <= GEMV_MAX_M.
    split_k : the number of K ranges of the GEMV (tests); default :func:`_split_k`.
    config : fixed block sizes (``BLOCK_N``, ``BLOCK_K`` and for the GEMM ``BLOCK_M``, optional
        ``num_warps`` / ``num_stages``) instead of autotuning (CUDA) / the interpreter default.

    Returns
    -------
    Tensor [..., N] in x.dtype.
    """
    del group_starts
    lead = x.shape[:-1]
    K, N = x.shape[-1], out_features
    M = math.prod(lead)
    x2 = x.reshape(M, K)  # not reshape(-1, K): M cannot be inferred when K = 0
    out = new_output((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    KT, Np, G = qweight.shape[0], scales.shape[1], scales.shape[0]
    if KT == 0:
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
        out.copy_(y if bias is None else y + bias.float())
        return out.reshape(*lead, N)
    group_rows = 16 * KT // G
    qweight, scales = _strided_2d(qweight), _strided_2d(scales)
    zeros = _strided_2d(zeros) if zeros is not None else None
    perm = perm.contiguous() if perm is not None else None
    bias = bias.contiguous() if bias is not None else None
    if path is None:
        path = "gemv" if M <= GEMV_MAX_M else "gemm"
    if path not in ("gemv", "gemm"):
        raise ValueError(f"path must be 'gemv' or 'gemm', got {path!r}")
    on_cpu = x.device.type == "cpu"
    if config is None and on_cpu:
        config = _interpreter_config(path, group_rows, Np)
    if config is not None:
        config = dict(config)
        meta = {"num_warps": config.pop("num_warps", 4), "num_stages": config.pop("num_stages", 3)}
        if group_rows % config["BLOCK_K"]:
            raise ValueError(f"BLOCK_K={config['BLOCK_K']} must divide group_rows={group_rows}")
    common = dict(HAS_ZEROS=zeros is not None, HAS_PERM=perm is not None, HAS_BIAS=bias is not None)
    tensors = (
        x2,
        qweight,
        scales,
        zeros if zeros is not None else scales,
        perm if perm is not None else qweight,
        bias if bias is not None else scales,
    )
    strides_w = (
        _row_stride(qweight),
        _row_stride(scales),
        _row_stride(zeros) if zeros is not None else 0,
    )

    def run(tuned, plain, grid, *args, **kw):
        # Through launch(): compiled kernels and autotuners on CUDA even when this module was
        # imported under TRITON_INTERPRET=1, the interpreter on the CPU.
        if config is None:
            return launch(tuned, grid, x.device, *args, **kw)
        if on_cpu:
            return launch(plain, grid, x.device, *args, **kw, **config)
        return launch(plain, grid, x.device, *args, **kw, **config, **meta)

    if path == "gemm":
        m_bucket = min(triton.next_power_of_2(M), _M_BUCKET_CAP)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(Np, meta["BLOCK_N"]))

        run(
            int4_gemm_autotuned,
            int4_gemm_kernel,
            grid,
            *tensors,
            out,
            M,
            K,
            N,
            KT,
            group_rows // 16,
            m_bucket,
            x2.stride(0),
            x2.stride(1),
            *strides_w,
            out.stride(0),
            DOT_F32=on_cpu,
            **common,
        )
        return out.reshape(*lead, N)

    block_m = min(triton.next_power_of_2(M), GEMV_MAX_M)
    S = split_k if split_k is not None else _split_k(Np, KT, x.device)
    if S < 1:
        raise ValueError(f"split_k must be >= 1, got {S}")
    direct = S == 1
    ws = out if direct else torch.empty((S, M, Np), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(Np, meta["BLOCK_N"]), S, triton.cdiv(M, block_m))

    run(
        int4_gemv_autotuned,
        int4_gemv_kernel,
        grid,
        *tensors,
        ws,
        M,
        K,
        N,
        KT,
        group_rows // 16,
        S,
        x2.stride(0),
        x2.stride(1),
        *strides_w,
        0 if direct else ws.stride(0),
        out.stride(0) if direct else ws.stride(1),
        DIRECT=direct,
        BLOCK_M=block_m,
        **common,
    )
    if not direct:
        rm, rn = 16, 128
        launch(
            int4_gemm_reduce_kernel,
            (triton.cdiv(M, rm), triton.cdiv(N, rn)),
            x.device,
            ws,
            tensors[5],
            out,
            M,
            N,
            S,
            ws.stride(0),
            ws.stride(1),
            out.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_M=rm,
            BLOCK_N=rn,
        )
    return out.reshape(*lead, N)
