"""Triton kernels of fp8_quantize (contract in bitpress.ops.fp8_quantize).

``q = e4m3(x / scale)`` per scale block, with ``scale = max(amax / 448, 2^-126)`` over the block
(dynamic; the rule of bitpress.fp8.reference: an all-zero block gets the smallest normal float32,
and a NaN in the block makes its scale NaN) or a given scale (static); e4m3 rounds to nearest
even and saturates at +-448; NaN stays NaN.
Granularities map onto one kernel over a 2-D view x [R, C] split into blocks of [BR, BC]
elements, one scale each:

* "token" (x [..., K] -> R = prod(...), C = K) and "channel" (w [N, K]): blocks [1, C];
* "block" with block_size [br, bc]: blocks [br, bc] (ragged at the edges);
* "tensor": one block, dynamic amax over the whole tensor (below).

Fused, one read of x per scale block: a block of at most 4096 elements (padded to powers of
two) is quantized by ``fp8_quantize_blocks_kernel``, which holds GR x GC such blocks per program
in registers (e.g. 8 rows of 300 for "token", a 2 x 32 grid of 1 x 16 blocks), reduces each
block's amax, writes its scale and quantizes. A larger block (a long row, 128 x 128) gets one
program of ``fp8_quantize_kernel``, which reduces the amax over TILE_R x TILE_C tiles and then
quantizes in a second pass over the block, read from cache (L1/L2). "tensor" with a dynamic
scale needs the amax of every element before any can be quantized, which one launch cannot do
without a grid-wide sync: ``fp8_amax_kernel`` writes one partial amax per block of [16, 1024]
elements, ``fp8_tensor_scale_kernel`` (one program) reduces them in a fixed order
(deterministic) and writes the scale, and the static path quantizes with it.

Bit-exact encoding: :func:`f32_to_e4m3` builds the E4M3 code with integer operations (round to
nearest even by the carry trick on the fp32 bits for normals, the 2^23 trick for subnormals), so
the result does not depend on the hardware's fp8 conversion (sm_80 has none) or on the
interpreter's; it equals ``torch.Tensor.to(torch.float8_e4m3fn)`` of the saturated quotient bit
for bit, including -0 and the sign of NaN. Division is ``div_rn`` (IEEE), not the approximate
``div.full.f32`` of ``/`` in compiled Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import keep_compilable, launch, new_output

E4M3_MAX = 448.0
# The smallest computed scale (bitpress.fp8.reference.FP8_MIN_SCALE, the smallest normal
# float32): an all-zero block gets it, and x / scale never divides by 0.
MIN_SCALE = float(torch.finfo(torch.float32).tiny)
DYNAMIC, STATIC = 0, 1
# Elements per tile (per program step): 4096 x fp32 = 32 registers per thread at 4 warps.
_TILE_ELEMS = 4096
# Partial-amax blocks of the "tensor" granularity.
_AMAX_BLOCK = (16, 1024)


@triton.jit
def f32_to_e4m3(v):
    """float32 -> E4M3 (float8_e4m3fn) code in an int32 (0..255): round to nearest even,
    saturate at +-448, NaN -> 0x7F with v's sign bit (as torch's conversion)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(v), 448.0)
    abits = a.to(tl.int32, bitcast=True)
    # Normal (a >= 2^-6): drop 20 of 23 mantissa bits, rounding to nearest even by the carry;
    # rebias the exponent from 127 to 7. a <= 448 never rounds up into the NaN code 0x7F.
    code_n = ((abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal (a < 2^-6): the code is round(a * 2^9) (a code of 8 is 2^-6, the first normal);
    # adding and subtracting 2^23 rounds to an integer, to nearest even.
    y = a * 512.0
    code_s = ((y + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0.015625, code_s, code_n) | sign
    return tl.where(v != v, 0x7F | sign, code)


@triton.jit
def _scale_of(amax_bits, MIN: tl.constexpr):
    # max(amax / 448, MIN), NaN if amax is NaN (the comparison is false).
    s = tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), 448.0)
    return tl.where(s < MIN, MIN, s)


@triton.jit
def _abs_bits(x):
    # |x| as int32 bits: ordered as the values for non-negative floats, and every NaN above +inf,
    # so an integer max is amax with NaN propagated -- the same compiled and interpreted (a float
    # max's NaN handling differs between the two).
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _quantize_tile(x_ptr, q_ptr, rows, cols, mask, stride_xr, stride_qr, scale):
    xv = tl.load(x_ptr + rows * stride_xr + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.math.div_rn(xv, scale + tl.zeros_like(xv))
    tl.store(q_ptr + rows * stride_qr + cols, f32_to_e4m3(v).to(tl.uint8), mask=mask)


@triton.jit
def fp8_quantize_blocks_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    R,
    C,
    BR,
    BC,
    NBR,
    NBC,
    stride_xr,
    stride_qr,
    stride_sr,
    stride_sc,
    MODE: tl.constexpr,
    MIN: tl.constexpr,
    GR: tl.constexpr,
    PBR: tl.constexpr,
    GC: tl.constexpr,
    PBC: tl.constexpr,
):
    # GR x GC scale blocks of [BR, BC] elements per program, held as a [GR, PBR, GC, PBC] tile
    # (PBR, PBC = BR, BC rounded up to powers of two; the padding is masked): one read of x,
    # the amax of each block a reduction over axes 3 and 1.
    gr = tl.arange(0, GR)[:, None, None, None]
    i = tl.arange(0, PBR)[None, :, None, None]
    gc = tl.arange(0, GC)[None, None, :, None]
    j = tl.arange(0, PBC)[None, None, None, :]
    brow = tl.program_id(0).to(tl.int64) * GR + gr
    bcol = tl.program_id(1).to(tl.int64) * GC + gc
    rows = brow * BR + i
    cols = bcol * BC + j
    mask = (i < BR) & (j < BC) & (rows < R) & (cols < C)
    xv = tl.load(x_ptr + rows * stride_xr + cols, mask=mask, other=0.0)
    s_off = tl.reshape(brow, (GR, 1)) * stride_sr + tl.reshape(bcol, (1, GC)) * stride_sc
    s_mask = (tl.reshape(brow, (GR, 1)) < NBR) & (tl.reshape(bcol, (1, GC)) < NBC)
    if MODE == 0:
        scale = _scale_of(tl.max(tl.max(_abs_bits(xv), axis=3), axis=1), MIN)  # [GR, GC]
        tl.store(scale_ptr + s_off, scale, mask=s_mask)
    else:
        scale = tl.load(scale_ptr + s_off, mask=s_mask, other=1.0)
    sb = tl.reshape(scale, (GR, 1, GC, 1))
    v = tl.math.div_rn(xv.to(tl.float32), sb + tl.zeros(xv.shape, tl.float32))
    tl.store(q_ptr + rows * stride_qr + cols, f32_to_e4m3(v).to(tl.uint8), mask=mask)


@triton.jit
def fp8_quantize_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    R,
    C,
    BR,
    BC,
    stride_xr,
    stride_qr,
    stride_sr,
    stride_sc,
    MODE: tl.constexpr,
    MIN: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    # One scale block larger than a tile per program: amax over TILE_R x TILE_C tiles, then a
    # second pass (from cache) that quantizes.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r0 = pid_r.to(tl.int64) * BR
    c0 = pid_c.to(tl.int64) * BC
    r_end = tl.minimum(r0 + BR, R)
    c_end = tl.minimum(c0 + BC, C)
    tr = tl.arange(0, TILE_R)[:, None]
    tc = tl.arange(0, TILE_C)[None, :]
    s_ptr = scale_ptr + pid_r * stride_sr + pid_c * stride_sc
    if MODE == 0:
        amax = tl.zeros((TILE_R, TILE_C), dtype=tl.int32)
        for rr in range(r0, r_end, TILE_R):
            for cc in range(c0, c_end, TILE_C):
                rows = rr + tr
                cols = cc + tc
                mask = (rows < r_end) & (cols < c_end)
                xv = tl.load(x_ptr + rows * stride_xr + cols, mask=mask, other=0.0)
                amax = tl.maximum(amax, _abs_bits(xv))
        scale = _scale_of(tl.max(tl.max(amax, axis=1), axis=0), MIN)
        tl.store(s_ptr, scale)
    else:
        scale = tl.load(s_ptr)
    for rr in range(r0, r_end, TILE_R):
        for cc in range(c0, c_end, TILE_C):
            rows = rr + tr
            cols = cc + tc
            mask = (rows < r_end) & (cols < c_end)
            _quantize_tile(x_ptr, q_ptr, rows, cols, mask, stride_xr, stride_qr, scale)


@triton.jit
def fp8_amax_kernel(
    x_ptr,
    partial_ptr,
    R,
    C,
    stride_xr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One partial amax (int32 bits, _abs_bits) per [BLOCK_R, BLOCK_C] block, at
    # partial_ptr[pid_r * n_cb + pid_c].
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < R) & (cols < C)
    xv = tl.load(x_ptr + rows * stride_xr + cols, mask=mask, other=0.0)
    amax = tl.max(tl.max(_abs_bits(xv), axis=1), axis=0)
    tl.store(partial_ptr + pid_r * tl.num_programs(1) + pid_c, amax)


@triton.jit
def fp8_tensor_scale_kernel(partial_ptr, scale_ptr, P, MIN: tl.constexpr, BLOCK: tl.constexpr):
    # An integer max is exact and order-independent: the scale is deterministic.
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.int32)
    for p0 in range(0, P, BLOCK):
        amax = tl.maximum(amax, tl.load(partial_ptr + p0 + offs, mask=p0 + offs < P, other=0))
    tl.store(scale_ptr, _scale_of(tl.max(amax, axis=0), MIN))


keep_compilable(globals(), ("f32_to_e4m3", "_scale_of", "_abs_bits", "_quantize_tile"))


def _tile(br: int, bc: int) -> tuple[int, int]:
    tc = min(triton.next_power_of_2(bc), _TILE_ELEMS)
    tr = min(triton.next_power_of_2(br), max(_TILE_ELEMS // tc, 1))
    return tr, tc


def _blocks_per_program(pbr: int, pbc: int, nbr: int, nbc: int, elems: int) -> tuple[int, int]:
    """(GR, GC): as many blocks per program as fit ``elems`` padded elements, along the columns
    of the scale grid first."""
    gc = min(triton.next_power_of_2(nbc), max(elems // (pbr * pbc), 1))
    gr = min(triton.next_power_of_2(nbr), max(elems // (pbr * pbc * gc), 1))
    return gr, gc


def _rows_2d(t: torch.Tensor, R: int, C: int) -> torch.Tensor:
    t = t.reshape(R, C)
    return t if C <= 1 or t.stride(1) == 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.shape[1] if t.shape[0] <= 1 else t.stride(0)


def _launch_blocks(x2, q2, scale2, br, bc, mode):
    R, C = x2.shape
    nbr, nbc = triton.cdiv(R, br), triton.cdiv(C, bc)
    # A [1]-shaped static scale is read by every block (strides 0).
    ssr = scale2.stride(0) if scale2.shape[0] > 1 else 0
    ssc = scale2.stride(1) if scale2.shape[1] > 1 else 0
    pbr, pbc = triton.next_power_of_2(br), triton.next_power_of_2(bc)
    common = (x2, q2, scale2, R, C, br, bc)
    strides = (_row_stride(x2), _row_stride(q2), ssr, ssc)
    if pbr * pbc <= _TILE_ELEMS:
        # The interpreter's cost is per program and per operation, not per element: it takes
        # larger tiles.
        elems = _TILE_ELEMS * (4 if x2.device.type == "cpu" else 1)
        gr, gc = _blocks_per_program(pbr, pbc, nbr, nbc, elems)
        launch(
            fp8_quantize_blocks_kernel,
            (triton.cdiv(nbr, gr), triton.cdiv(nbc, gc)),
            x2.device,
            *common,
            nbr,
            nbc,
            *strides,
            MODE=mode,
            MIN=MIN_SCALE,
            GR=gr,
            PBR=pbr,
            GC=gc,
            PBC=pbc,
        )
        return
    tr, tc = _tile(br, bc)
    launch(
        fp8_quantize_kernel,
        (nbr, nbc),
        x2.device,
        *common,
        *strides,
        MODE=mode,
        MIN=MIN_SCALE,
        TILE_R=tr,
        TILE_C=tc,
    )


def fp8_quantize(
    x: torch.Tensor,
    granularity: str,
    scale: torch.Tensor | None = None,
    block_size: list[int] | tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x to E4M3 with fp32 scales; arguments already checked by bitpress.ops.

    Parameters
    ----------
    x : Tensor [..., K] (at least 1-D), float32 / float16 / bfloat16, any strides
    granularity : "tensor" (scale [1]), "token" (scale [..., 1]), "channel" (x [N, K], scale
        [N, 1]) or "block" with block_size [br, bc] (default [1, 128]): scale [..., ceil(K/bc)]
        for br = 1, [ceil(R/br), ceil(K/bc)] for a 2-D x [R, K] otherwise
    scale : a static fp32 scale of the granularity's shape ([] or [1] for "tensor"), or None

    Returns
    -------
    (q float8_e4m3fn of x's shape, scale float32 of the granularity's shape; a copy of a given
    scale).
    """
    K = x.shape[-1]
    R = x.numel() // K if K else 0
    q = new_output(x.shape, torch.float8_e4m3fn, x.device)
    if granularity == "tensor":
        # One scale: any blocking of the quantization pass reads it (strides 0).
        br, bc = 4, 1024
        sshape: tuple[int, ...] = (1,)
    elif granularity in ("token", "channel"):
        br, bc = 1, max(K, 1)
        sshape = (*x.shape[:-1], 1)
    elif granularity == "block":
        br, bc = (int(v) for v in block_size) if block_size is not None else (1, 128)
        lead = tuple(x.shape[:-1]) if br == 1 else (triton.cdiv(R, br),)
        sshape = (*lead, triton.cdiv(K, bc))
    else:
        raise ValueError(f"fp8_quantize: granularity {granularity!r} is not known")
    if scale is not None:
        out_scale = scale.float().reshape(sshape).clone()
    else:
        out_scale = new_output(sshape, torch.float32, x.device)
        if x.numel() == 0:
            out_scale.fill_(MIN_SCALE)  # the amax of nothing is 0
    if x.numel() == 0:
        return q, out_scale
    x2 = _rows_2d(x, R, K)
    q2 = q.view(torch.uint8).reshape(R, K)
    s2 = out_scale.reshape(1, 1) if granularity == "tensor" else out_scale.reshape(-1, sshape[-1])
    if scale is not None:
        _launch_blocks(x2, q2, s2, br, bc, STATIC)
        return q, out_scale
    if granularity != "tensor":
        _launch_blocks(x2, q2, s2, br, bc, DYNAMIC)
        return q, out_scale
    # Dynamic per-tensor: partial amaxes, one reduce, then the static quantization.
    ar, ac = _AMAX_BLOCK
    grid = (triton.cdiv(R, ar), triton.cdiv(K, ac))
    partial = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=x.device)
    launch(
        fp8_amax_kernel, grid, x.device, x2, partial, R, K, _row_stride(x2), BLOCK_R=ar, BLOCK_C=ac
    )
    launch(
        fp8_tensor_scale_kernel,
        (1,),
        x.device,
        partial,
        out_scale,
        partial.numel(),
        MIN=MIN_SCALE,
        BLOCK=1024,
    )
    _launch_blocks(x2, q2, s2, br, bc, STATIC)
    return q, out_scale


__all__ = ["E4M3_MAX", "MIN_SCALE", "f32_to_e4m3", "fp8_quantize"]
