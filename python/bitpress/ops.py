"""Public functional API: one function per op, each forwarding to ``torch.ops.bitpress.*``.

Every op has a fake (meta) implementation registered here, so that it traces under
``torch.compile(fullgraph=True)``, and an implementation per backend (see bitpress.backends for
how one is chosen). Argument checks live in the C++ glue for the ``cpu``/``cuda`` backends and in
the ``_check_*`` functions here for the fake, ``triton`` and ``reference`` paths; both name the
argument and what was expected.
"""

from __future__ import annotations

import torch

from bitpress import _ext, backends, reference  # noqa: F401  (_ext registers the C++ ops)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(op: str, msg: str, exc: type[Exception] = RuntimeError) -> None:
    raise exc(f"{op}: {msg}")


def _check_dtype(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        _fail(op, f"{name} must be {allowed}, got {str(t.dtype).removeprefix('torch.')}", TypeError)


def _check_dim(op: str, name: str, t: torch.Tensor, dim: int, shape: str) -> None:
    if t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D {shape}, got shape {list(t.shape)}")


def _check_size(op: str, name: str, t: torch.Tensor, d: int, expected: int, what: str) -> None:
    if t.shape[d] != expected:
        _fail(op, f"{name}.size({d}) must be {expected} ({what}), got shape {list(t.shape)}")


def _check_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


# --------------------------------------------------------------------------------------------
# int4_dequantize
# --------------------------------------------------------------------------------------------


def int4_dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    group_size: int = 128,
    dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Unpack GPTQ-packed INT4 weights into a dense matrix.

    .. math:: w[k, n] = (q[k, n] - z[g(k), n]) \cdot s[g(k), n]

    computed in float32 and rounded once (round to nearest even) to ``dtype``.

    Parameters
    ----------
    qweight : Tensor, int32, shape [K/8, N]
        Packed along K: row ``k = 8r + j`` of column ``n`` is bits ``4j..4j+3`` of
        ``qweight[r, n]`` (lowest nibble first), an unsigned value ``q`` in 0..15.
    scales : Tensor, float32 / float16 / bfloat16, shape [G, N]
        Per-group, per-column scales ``s``.
    qzeros : Tensor, int32, shape [G, ceil(N/8)], optional
        Zero points ``z`` packed along N (column ``n = 8c + j`` in bits ``4j..4j+3`` of
        ``qzeros[g, c]``), holding the real zero points (GPTQ "v2"; ``bitpress.formats`` converts
        v1 checkpoints, whose stored zeros are ``z - 1``). ``None``: symmetric, ``z = 8``.
    g_idx : Tensor, int32, shape [K], optional
        Group of each row (act-order checkpoints); values in ``[0, G)``. ``None``:
        ``g(k) = k // group_size``.
    group_size : int
        Rows per group when ``g_idx`` is None (then ``G = ceil(K / group_size)``); ``-1`` means one
        group over all of K.
    dtype : torch.dtype, optional
        Output dtype (float32, float16 or bfloat16); default ``scales.dtype``.
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    Tensor, shape [K, N], ``dtype``, on the device of ``qweight``.

    Notes
    -----
    On CUDA, a ``g_idx`` value outside ``[0, G)`` cannot be reported without a host sync: the
    affected rows come out as NaN. The CPU backends raise.
    """
    _, impl = backends.select("int4_dequantize", qweight.device, backend)
    return impl(qweight, scales, qzeros, g_idx, group_size, dtype)


def _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype):
    op = "int4_dequantize"
    _check_dtype(op, "qweight", qweight, (torch.int32,))
    _check_dim(op, "qweight", qweight, 2, "[K/8, N]")
    _check_dtype(op, "scales", scales, _FLOAT_DTYPES)
    _check_dim(op, "scales", scales, 2, "[G, N]")
    _check_device(op, "scales", scales, qweight, "qweight")
    K, N, G = qweight.shape[0] * 8, qweight.shape[1], scales.shape[0]
    _check_size(op, "scales", scales, 1, N, "N = qweight.size(1)")
    if not (group_size > 0 or group_size == -1):
        _fail(op, f"group_size must be positive or -1 (one group over K), got {group_size}")
    if g_idx is not None:
        _check_dtype(op, "g_idx", g_idx, (torch.int32,))
        _check_dim(op, "g_idx", g_idx, 1, "[K]")
        _check_size(op, "g_idx", g_idx, 0, K, "K = 8 * qweight.size(0)")
        _check_device(op, "g_idx", g_idx, qweight, "qweight")
        if G == 0 and K > 0:
            _fail(op, f"scales must have at least one group, got shape {list(scales.shape)}")
    else:
        gs = max(K, 1) if group_size == -1 else group_size
        _check_size(op, "scales", scales, 0, -(-K // gs), "G = ceil(K / group_size)")
    if qzeros is not None:
        _check_dtype(op, "qzeros", qzeros, (torch.int32,))
        _check_dim(op, "qzeros", qzeros, 2, "[G, ceil(N/8)]")
        _check_size(op, "qzeros", qzeros, 0, G, "G = scales.size(0)")
        _check_size(op, "qzeros", qzeros, 1, -(-N // 8), "ceil(N/8)")
        _check_device(op, "qzeros", qzeros, qweight, "qweight")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        _fail(op, f"dtype must be float32, float16 or bfloat16, got {dtype}", TypeError)
    return K, N, G


@torch.library.register_fake("bitpress::int4_dequantize")
def _int4_dequantize_fake(qweight, scales, qzeros, g_idx, group_size, dtype=None):
    K, N, _ = _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)
    return scales.new_empty((K, N), dtype=dtype or scales.dtype)


@backends.register("int4_dequantize", "cpu")
@backends.register("int4_dequantize", "cuda")
def _int4_dequantize_compiled(qweight, scales, qzeros, g_idx, group_size, dtype):
    return torch.ops.bitpress.int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)


@torch.library.custom_op("bitpress::int4_dequantize_triton", mutates_args=())
def _int4_dequantize_triton(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    from bitpress.triton_kernels import int4_dequantize as tk

    K, N, G = _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)
    return tk.int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype or scales.dtype)


torch.library.register_fake("bitpress::int4_dequantize_triton")(_int4_dequantize_fake)


@backends.register("int4_dequantize", "triton")
def _int4_dequantize_triton_backend(qweight, scales, qzeros, g_idx, group_size, dtype):
    return torch.ops.bitpress.int4_dequantize_triton(
        qweight, scales, qzeros, g_idx, group_size, dtype
    )


@backends.register("int4_dequantize", "reference")
def _int4_dequantize_reference(qweight, scales, qzeros, g_idx, group_size, dtype):
    K, _, G = _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)
    if g_idx is not None and K and not torch.compiler.is_compiling():
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= G:
            _fail("int4_dequantize", f"g_idx values must lie in [0, {G}), got [{lo}, {hi}]")
    return reference.int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)


# --------------------------------------------------------------------------------------------
# int4_gemm
# --------------------------------------------------------------------------------------------


def int4_gemm(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""INT4 weight-only linear layer: ``y = x · Wᵀ + bias``.

    .. math:: W[n, k] = (q[k, n] - z[g(k), n]) \cdot s[g(k), n]

    Parameters
    ----------
    x : Tensor, float32 / float16 / bfloat16, shape [..., K]
        Activations; any leading shape (M = their product, from 1 to thousands).
    weight : bitpress.formats.int4_layout.Int4PackedWeight
        The weight in a kernel layout, built once at load time by
        ``int4_layout.pack(quantized_weight, layout=...)`` (``Int4Linear`` picks the layout of
        the device), N = ``weight.out_features``, Nt = ceil(N / 64), Np = 64 Nt:

        * ``layout="cpu"`` (the ``cpu`` backend): qweight int32 [Nt, Kp/8, 64], scales float32
          [Nt, G, 64], zeros uint8 [Nt, G, 64] or None (symmetric), group_starts int32 [G+1]
          in octets, perm int32 [Kp] or None;
        * ``layout="mma"`` (the ``cuda`` and ``triton`` backends): qweight int32
          [Kp/16, Nt*128] (``mma.m16n8k16`` B fragments), scales float32 [G, Np], zeros uint8
          [G, Np] or None, group_starts int32 [G+1] in 16-row k-tiles (uniform groups),
          perm int32 [Kp] or None.

        ``weight.to(device, layout=...)`` converts exactly; the ``reference`` backend reads both.
    bias : Tensor, shape [N], optional
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    Tensor, shape [..., N], ``x.dtype``.

    Notes
    -----
    Accumulation is in float32. On CPUs with AVX512_BF16 the bf16/fp16 path multiplies exact bf16
    representations of x (fp16 x as two bf16 terms), so its error is that of float32
    accumulation; float32 x always takes the float32 FMA path. On CUDA (``cuda`` backend) fp16 /
    bf16 x with M <= 64 (``BITPRESS_INT4_CUDA_MAX_M``) runs the Marlin-class kernel, whose
    dequantized weights are rounded once to x's dtype before the tensor-core product; larger M
    and fp32 x dequantize W once and call cuBLAS. On CUDA a perm value outside [-1, K) cannot be
    reported without a host sync: the output is NaN instead.
    """
    _, impl = backends.select("int4_gemm", x.device, backend)
    return impl(x, *weight.tensors(), bias)


def _check_int4_gemm(x, qweight, scales, zeros, group_starts, perm, out_features, bias):
    """Shape/dtype/device checks of int4_gemm for both layouts (told apart by qweight's rank:
    3-D = CPU tile layout, 2-D = GPU mma layout); returns (K, N)."""
    op = "int4_gemm"
    _check_dtype(op, "x", x, _FLOAT_DTYPES)
    if x.dim() < 1:
        _fail(op, "x must be [..., K], got a 0-D tensor")
    _check_dtype(op, "qweight", qweight, (torch.int32,))
    if qweight.dim() not in (2, 3):
        _fail(
            op,
            "qweight must be 3-D [Nt, Kp/8, 64] (CPU tile layout) or 2-D [Kp/16, Nt*128] (GPU mma "
            f"layout), got shape {list(qweight.shape)}",
        )
    mma = qweight.dim() == 2
    lay = "[G, Np]" if mma else "[Nt, G, 64]"
    _check_dtype(op, "scales", scales, (torch.float32,))
    _check_dim(op, "scales", scales, 2 if mma else 3, lay)
    _check_dtype(op, "group_starts", group_starts, (torch.int32,))
    _check_dim(op, "group_starts", group_starts, 1, "[G+1]")
    for name, t in (("qweight", qweight), ("scales", scales), ("group_starts", group_starts)):
        _check_device(op, name, t, x, "x")
    N = out_features
    if N < 0:
        _fail(op, f"out_features must be >= 0, got {N}")
    Nt = -(-N // 64)
    K = x.shape[-1]
    if mma:
        Kp, G = qweight.shape[0] * 16, scales.shape[0]
        _check_size(op, "qweight", qweight, 1, Nt * 128, "128 * ceil(out_features / 64)")
        _check_size(op, "scales", scales, 1, Nt * 64, "Np = 64 * ceil(out_features / 64)")
        if (G == 0 and Kp > 0) or (G > 0 and (Kp // 16) % G):
            _fail(
                op,
                f"the mma layout needs Kp/16 = {Kp // 16} k-tiles split evenly into G = {G} "
                f"groups (scales.size(0)), got qweight shape {list(qweight.shape)}",
            )
        perm_what = "Kp = 16 * qweight.size(0)"
    else:
        Kp, G = qweight.shape[1] * 8, scales.shape[1]
        _check_size(op, "qweight", qweight, 0, Nt, "Nt = ceil(out_features / 64)")
        _check_size(op, "qweight", qweight, 2, 64, "the tile width")
        _check_size(op, "scales", scales, 0, Nt, "Nt = ceil(out_features / 64)")
        _check_size(op, "scales", scales, 2, 64, "the tile width")
        perm_what = "Kp = 8 * qweight.size(1)"
    _check_size(op, "group_starts", group_starts, 0, G + 1, "G + 1 = number of groups + 1")
    if zeros is not None:
        _check_dtype(op, "zeros", zeros, (torch.uint8,))
        _check_dim(op, "zeros", zeros, scales.dim(), lay)
        if zeros.shape != scales.shape:
            _fail(
                op,
                f"zeros must have the shape of scales {list(scales.shape)}, "
                f"got {list(zeros.shape)}",
            )
        _check_device(op, "zeros", zeros, x, "x")
    if perm is not None:
        _check_dtype(op, "perm", perm, (torch.int32,))
        _check_dim(op, "perm", perm, 1, "[Kp]")
        _check_size(op, "perm", perm, 0, Kp, perm_what)
        _check_device(op, "perm", perm, x, "x")
    elif K != Kp:
        _fail(
            op,
            f"x.size(-1) must be K = {Kp} ({perm_what.split('= ')[1]}; the weight has no row "
            f"permutation), got shape {list(x.shape)}",
        )
    if bias is not None:
        _check_dtype(op, "bias", bias, _FLOAT_DTYPES)
        _check_dim(op, "bias", bias, 1, "[N]")
        _check_size(op, "bias", bias, 0, N, "N = out_features")
        _check_device(op, "bias", bias, x, "x")
    return K, N


@torch.library.register_fake("bitpress::int4_gemm")
def _int4_gemm_fake(x, qweight, scales, zeros, group_starts, perm, out_features, bias=None):
    _, N = _check_int4_gemm(x, qweight, scales, zeros, group_starts, perm, out_features, bias)
    return x.new_empty((*x.shape[:-1], N))


@backends.register("int4_gemm", "cpu")
@backends.register("int4_gemm", "cuda")
def _int4_gemm_compiled(x, qweight, scales, zeros, group_starts, perm, out_features, bias):
    return torch.ops.bitpress.int4_gemm(
        x, qweight, scales, zeros, group_starts, perm, out_features, bias
    )


@torch.library.custom_op("bitpress::int4_gemm_triton", mutates_args=())
def _int4_gemm_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_starts: torch.Tensor,
    perm: torch.Tensor | None,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_int4_gemm(x, qweight, scales, zeros, group_starts, perm, out_features, bias)
    if qweight.dim() != 2:
        _fail(
            "int4_gemm",
            "the triton backend reads the GPU mma layout (qweight [Kp/16, Nt*128]); this weight "
            "is in the CPU tile layout: repack it with weight.to(device, layout='mma')",
        )
    from bitpress.triton_kernels import int4_gemm as tk

    return tk.int4_gemm(x, qweight, scales, zeros, group_starts, perm, out_features, bias)


torch.library.register_fake("bitpress::int4_gemm_triton")(_int4_gemm_fake)


@backends.register("int4_gemm", "triton")
def _int4_gemm_triton_backend(x, qweight, scales, zeros, group_starts, perm, out_features, bias):
    return torch.ops.bitpress.int4_gemm_triton(
        x, qweight, scales, zeros, group_starts, perm, out_features, bias
    )


@backends.register("int4_gemm", "reference")
def _int4_gemm_reference(x, qweight, scales, zeros, group_starts, perm, out_features, bias):
    _check_int4_gemm(x, qweight, scales, zeros, group_starts, perm, out_features, bias)
    return reference.int4_gemm(x, qweight, scales, zeros, group_starts, perm, out_features, bias)


def int4_gemm_repack(
    qweight: torch.Tensor, perm: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    r"""Repack GPTQ INT4 weights into the GPU mma layout (``int4_mma_layout.h``), once at load.

    Parameters
    ----------
    qweight : Tensor, int32, shape [K/8, N]
        GPTQ packing along K (row ``k = 8r + j`` in bits ``4j..4j+3`` of ``qweight[r, n]``).
    perm : Tensor, int32, shape [Kp], optional
        Source row of each packed row, ``-1`` for a zero (padding) row, ``Kp % 16 == 0``
        (``int4_layout.mma_row_order``). ``None``: the identity (then ``K % 16 == 0``).
    backend : str, optional
        Force a backend (``cpu``, ``cuda``, ``reference``).

    Returns
    -------
    Tensor, int32, shape [Kp/16, 128 * ceil(N/64)], on the device of ``qweight``: word
    ``kt * Nt*128 + nt*128 + 4*lane + w`` holds lane ``lane``'s ``mma.m16n8k16`` B fragments of
    n8-blocks ``2w, 2w+1`` of the k16 x n64 tile (kt, nt); columns past N are zero.
    """
    _, impl = backends.select("int4_gemm_repack", qweight.device, backend)
    return impl(qweight, perm)


def _check_int4_gemm_repack(qweight, perm):
    op = "int4_gemm_repack"
    _check_dtype(op, "qweight", qweight, (torch.int32,))
    _check_dim(op, "qweight", qweight, 2, "[K/8, N]")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if perm is not None:
        _check_dtype(op, "perm", perm, (torch.int32,))
        _check_dim(op, "perm", perm, 1, "[Kp]")
        _check_device(op, "perm", perm, qweight, "qweight")
        Kp = perm.shape[0]
    else:
        Kp = K
    if Kp % 16:
        what = "perm.size(0)" if perm is not None else "K = 8 * qweight.size(0) (no perm)"
        _fail(op, f"{what} must be a multiple of 16 (the mma k-tile), got {Kp}")
    return Kp, N


@torch.library.register_fake("bitpress::int4_gemm_repack")
def _int4_gemm_repack_fake(qweight, perm=None):
    Kp, N = _check_int4_gemm_repack(qweight, perm)
    return qweight.new_empty((Kp // 16, -(-N // 64) * 128))


@backends.register("int4_gemm_repack", "cpu")
@backends.register("int4_gemm_repack", "cuda")
def _int4_gemm_repack_compiled(qweight, perm):
    return torch.ops.bitpress.int4_gemm_repack(qweight, perm)


@backends.register("int4_gemm_repack", "reference")
def _int4_gemm_repack_reference(qweight, perm):
    _check_int4_gemm_repack(qweight, perm)
    if perm is not None and perm.numel() and not torch.compiler.is_compiling():
        lo, hi, K = int(perm.min()), int(perm.max()), qweight.shape[0] * 8
        if lo < -1 or hi >= K:
            _fail("int4_gemm_repack", f"perm values must lie in [-1, {K}), got [{lo}, {hi}]")
    return reference.int4_gemm_repack(qweight, perm)


# --------------------------------------------------------------------------------------------
# spec_verify
# --------------------------------------------------------------------------------------------


def spec_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
    seeds: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Verify speculative-decoding drafts against the target's logits, for a batch of rows.

    The draft proposed ``num_draft[b]`` tokens for row ``b``; the target scored them in one
    forward pass. The result reproduces the target exactly: greedy rows emit the target's argmax
    chain, sampling rows emit tokens distributed as the target's own samples (Leviathan et al.
    2023, Chen et al. 2023).

    For row ``b`` with ``n = num_draft[b]`` drafts ``d[0..n)``, position ``j`` (``0 <= j <= n``):

    * **greedy** (``temperature[b] == 0``): accept ``d[j]`` while it equals
      ``argmax_v target_logits[b, j, v]`` (ties: the lowest ``v``); emit that argmax at the first
      mismatch, or at position ``n`` (the bonus token) when all ``n`` are accepted.
    * **sampling**: the target distribution is

      .. math:: p_j(v) = \frac{e_j(v)}{S_j}, \quad e_j(v) = 2^{z_{j,v} - \max_w z_{j,w}},
         \quad z_{j,v} = \mathrm{logit}_{j,v} \cdot (\log_2 e / T),
         \quad S_j = \sum_{v\ \mathrm{kept}} e_j(v)

      (that is, softmax(logit / T); the scale log2(e)/T is rounded once to float32 and 2^d is the
      canonical ``exp2_neg`` of ``bitpress/spec_verify.h``, so that every backend computes the
      same bits)
      over the tokens kept by ``top_k`` and ``top_p`` (all when they are off), 0 elsewhere.
      ``d[j]`` is accepted iff :math:`u_0 \, q_j(d_j) < p_j(d_j)`, i.e. with probability
      :math:`\min(1, p/q)`; ``q`` is ``draft_probs[b, j]``, or one-hot at ``d[j]`` when
      ``draft_probs`` is None (deterministic drafts: prompt lookup, greedy draft model). At the
      first rejection the emitted token is sampled from :math:`\max(0, p_j - q_j)` (normalized;
      0 at ``d[j]`` for one-hot q; from :math:`p_j` if that has no mass); when all ``n`` are
      accepted the bonus token is sampled from :math:`p_n`. Sampling is by inverse CDF: the
      first ``v`` whose running sum of the weights exceeds :math:`u_1 W` (``W`` their total);
      if rounding leaves the running sum short, the last ``v`` with positive weight, so a token
      with zero weight is never returned.

    ``u0``, ``u1`` are words 0 and 1 of Philox4x32-10 at key ``(seed lo, seed hi)`` and counter
    ``(offset lo, offset hi, j, 0)``, as ``(bits >> 8) * 2^-24`` (csrc/include/bitpress/philox.h).

    Parameters
    ----------
    target_logits : Tensor, float32 / float16 / bfloat16, shape [B, K+1, V]
        The target's logits at each draft position and at the bonus position. Read once per
        decided position; no probability tensor is materialized. Must not hold NaN (``-inf``
        masks a token; a position whose logits are all ``-inf`` or that has ``+inf`` has no
        distribution and is decided greedily).
    draft_tokens : Tensor, int32 / int64, shape [B, K]
        Proposed tokens; entries at ``j >= num_draft[b]`` are padding and are ignored. Real ones
        must lie in ``[0, V)``.
    num_draft : Tensor, int32 / int64, shape [B], optional
        Real drafts per row, in ``0..K`` (ragged batches; 0: only the bonus token is sampled).
        Default: K for every row.
    draft_probs : Tensor, float32 / float16 / bfloat16, shape [B, K, V], optional
        The draft's distribution ``q`` at each position (rows need not be exactly normalized).
        None: q is one-hot at the proposed token.
    temperature : Tensor float32 [B], or float, optional
        ``> 0``: sampling at that temperature; ``0``: greedy. Greedy and sampling rows mix in one
        batch. Default (None): every row greedy.
    top_k : Tensor int32 / int64 [B], or int, optional
        Keep the tokens whose scaled logit is at least the k-th largest (ties kept); ``<= 0`` or
        ``>= V``: off. Applied to p before verification.
    top_p : Tensor float32 [B], or float, optional
        After top_k, keep the smallest set of most probable tokens whose mass reaches ``top_p``
        (ties at the threshold kept); outside ``(0, 1)``: off.
    seeds, offsets : Tensor, int64, shape [B], optional
        Per-row randomness: use one seed per sequence and a new offset per call (e.g. the decode
        step). ``seeds=None``: drawn from torch's default generator for the device when any
        temperature is given, so ``torch.manual_seed`` makes runs repeatable (the op
        ``torch.ops.bitpress.spec_verify`` itself takes 0). ``offsets=None``: 0.
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    tokens : Tensor, int64, shape [B, K+1]
        The accepted drafts, then the correction or bonus token, then -1 padding.
    num_accepted : Tensor, int64, shape [B]
        Accepted drafts ``a`` (``0..num_draft[b]``).
    num_emitted : Tensor, int64, shape [B]
        ``a + 1``.

    Notes
    -----
    *Exactness across backends.* Every backend uses the same uniforms, the same base-2 exp
    polynomial (only individually rounded ``+ - *``; no FMA) and the same formulas, so they agree
    bit for bit except through the order of the sums ``S``, ``W`` and the running CDF, which differs
    between the CPU kernel (16/8/4 SIMD lanes), the CUDA kernel (block reductions), the Triton
    kernel and the reference: a decision can differ only when a uniform falls within rounding of a
    boundary (probability ~1e-7 per decision). The tests check identical tokens on many seeds.

    *Cost.* A row reads only the positions it decides: one pass per position; the sampled token
    costs one more pass over that row (CUDA / Triton: two). Rows with ``top_k`` / ``top_p`` take
    binary searches over their positions: up to 32 counting passes (top_k) and ~30 masked sums
    (top_p), from cache on the CPU.

    *Errors.* Shapes, dtypes and devices are checked on every backend. Values (``num_draft`` in
    ``[0, K]``, draft ids in ``[0, V)``, ``temperature >= 0``) are checked on CPU tensors; on CUDA
    that would cost a host sync, so the kernels clamp ``num_draft`` to ``[0, K]``, reject a draft
    id outside the vocabulary without reading it, and treat a negative temperature as greedy.
    """
    B, dev = target_logits.shape[0], target_logits.device
    if isinstance(temperature, (int, float)):
        temperature = torch.full((B,), float(temperature), dtype=torch.float32, device=dev)
    if isinstance(top_k, int):
        top_k = torch.full((B,), top_k, dtype=torch.int64, device=dev)
    if isinstance(top_p, (int, float)):
        top_p = torch.full((B,), float(top_p), dtype=torch.float32, device=dev)
    if seeds is None and temperature is not None:
        seeds = torch.randint(-(2**63), 2**63 - 1, (B,), dtype=torch.int64, device=dev)
    _, impl = backends.select("spec_verify", dev, backend)
    return impl(
        target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds,
        offsets,
    )  # fmt: skip


_INT_DTYPES = (torch.int32, torch.int64)


def _check_spec_verify(
    target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds, offsets
):
    """Shapes, dtypes and devices, with the messages of csrc/torch/spec_verify.cpp."""
    op = "spec_verify"
    _check_dtype(op, "target_logits", target_logits, _FLOAT_DTYPES)
    _check_dim(op, "target_logits", target_logits, 3, "[B, K+1, V]")
    B, K, V = target_logits.shape[0], target_logits.shape[1] - 1, target_logits.shape[2]
    if K < 0 or V < 1:
        _fail(
            op,
            "target_logits must have at least one position (K+1 >= 1) and one token (V >= 1), "
            f"got shape {list(target_logits.shape)}",
        )
    if V >= 2**31:
        _fail(op, f"target_logits.size(2) (V) must be below 2^31, got {V}")
    _check_dtype(op, "draft_tokens", draft_tokens, _INT_DTYPES)
    _check_dim(op, "draft_tokens", draft_tokens, 2, "[B, K]")
    _check_size(op, "draft_tokens", draft_tokens, 0, B, "B = target_logits.size(0)")
    _check_size(op, "draft_tokens", draft_tokens, 1, K, "K = target_logits.size(1) - 1")
    _check_device(op, "draft_tokens", draft_tokens, target_logits, "target_logits")

    def per_row(name, t, dtypes):
        if t is not None:
            _check_dtype(op, name, t, dtypes)
            _check_dim(op, name, t, 1, "[B]")
            _check_size(op, name, t, 0, B, "B = target_logits.size(0)")
            _check_device(op, name, t, target_logits, "target_logits")

    per_row("num_draft", num_draft, _INT_DTYPES)
    if draft_probs is not None:
        _check_dtype(op, "draft_probs", draft_probs, _FLOAT_DTYPES)
        _check_dim(op, "draft_probs", draft_probs, 3, "[B, K, V]")
        _check_size(op, "draft_probs", draft_probs, 0, B, "B = target_logits.size(0)")
        _check_size(op, "draft_probs", draft_probs, 1, K, "K = target_logits.size(1) - 1")
        _check_size(op, "draft_probs", draft_probs, 2, V, "V = target_logits.size(2)")
        _check_device(op, "draft_probs", draft_probs, target_logits, "target_logits")
    per_row("temperature", temperature, (torch.float32,))
    per_row("top_k", top_k, _INT_DTYPES)
    per_row("top_p", top_p, (torch.float32,))
    per_row("seeds", seeds, (torch.int64,))
    per_row("offsets", offsets, (torch.int64,))
    return B, K, V


def _check_spec_verify_values(target_logits, draft_tokens, num_draft, temperature):
    """The value checks of the C++ glue (CPU tensors, outside torch.compile: they sync)."""
    if target_logits.device.type != "cpu" or torch.compiler.is_compiling():
        return
    op = "spec_verify"
    B, K, V = target_logits.shape[0], target_logits.shape[1] - 1, target_logits.shape[2]
    n = num_draft.long() if num_draft is not None else torch.full((B,), K, dtype=torch.long)
    d = draft_tokens.long()
    for b in range(B):
        nb = int(n[b])
        if not 0 <= nb <= K:
            _fail(op, f"num_draft values must lie in [0, K] (K = {K}), got num_draft[{b}] = {nb}")
        bad = ((d[b, :nb] < 0) | (d[b, :nb] >= V)).nonzero()
        if len(bad):
            j = int(bad[0, 0])
            _fail(
                op,
                f"draft_tokens values must lie in [0, V) (V = {V}), got draft_tokens[{b}, {j}] "
                f"= {int(d[b, j])}",
            )
        if temperature is not None and not float(temperature[b]) >= 0.0:
            _fail(
                op,
                f"temperature values must be >= 0 (0: greedy), got temperature[{b}] = "
                f"{float(temperature[b]):g}",
            )


@torch.library.register_fake("bitpress::spec_verify")
def _spec_verify_fake(
    target_logits,
    draft_tokens,
    num_draft=None,
    draft_probs=None,
    temperature=None,
    top_k=None,
    top_p=None,
    seeds=None,
    offsets=None,
):
    B, K, _ = _check_spec_verify(
        target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds,
        offsets,
    )  # fmt: skip
    new = target_logits.new_empty
    return (
        new((B, K + 1), dtype=torch.int64),
        new((B,), dtype=torch.int64),
        new((B,), dtype=torch.int64),
    )


@backends.register("spec_verify", "cpu")
@backends.register("spec_verify", "cuda")
def _spec_verify_compiled(*args):
    return torch.ops.bitpress.spec_verify(*args)


@torch.library.custom_op("bitpress::spec_verify_triton", mutates_args=())
def _spec_verify_triton(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from bitpress.triton_kernels import spec_verify as tk

    args = (target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds)
    _check_spec_verify(*args, offsets)
    _check_spec_verify_values(target_logits, draft_tokens, num_draft, temperature)
    return tk.spec_verify(*args, offsets)


torch.library.register_fake("bitpress::spec_verify_triton")(_spec_verify_fake)


@backends.register("spec_verify", "triton")
def _spec_verify_triton_backend(*args):
    return torch.ops.bitpress.spec_verify_triton(*args)


@backends.register("spec_verify", "reference")
def _spec_verify_reference(*args):
    _check_spec_verify(*args)
    _check_spec_verify_values(args[0], args[1], args[2], args[4])
    return reference.spec_verify(*args)
