"""Sparse24Linear and Sparse24Int4Linear against a dense float64 reference; one copy of the
weight; state_dict round trips and bad state_dicts; sparsify_ and quantize_ on whole models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparse24_data import assert_24, correlated_inputs, tiny_llama
from torch import nn

import bitpress
from bitpress import Int4Config, Sparse24Config, Sparse24Int4Linear, Sparse24Linear
from bitpress.int4.rtn import rtn_quantize
from bitpress.sparse24 import modules as sparse24_modules
from bitpress.sparse24.layout import Sparse24Layout
from bitpress.sparse24.prune import magnitude_prune

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def linear(K, N, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias)


# --------------------------------------------------------------------------------------------
# Sparse24Linear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("M", [1, 7, 33])
def test_sparse24_linear_matches_dense_reference(dtype, method, M):
    K, N = 72, 33
    lin = linear(K, N)
    x_cal = correlated_inputs(256, K, seed=1)
    m = Sparse24Linear.from_linear(lin, method, None if method == "magnitude" else x_cal)
    m = m.to(dtype)
    assert m.dtype == dtype and m.layout == Sparse24Layout.ROW
    w = m.dense_weight()
    assert w.dtype == dtype
    assert_24(w)
    x = torch.randn(M, K).to(dtype)
    ref = x.double() @ w.double().t() + m.bias.double()
    assert rel(m(x), ref) < TOL[dtype]


def test_sparse24_linear_non_contiguous_and_batched_input():
    m = Sparse24Linear.from_linear(linear(64, 16))
    x = torch.randn(3, 64, 5).transpose(1, 2)  # [3, 5, 64], not contiguous
    ref = x.double() @ m.dense_weight().double().t() + m.bias.double()
    assert rel(m(x), ref) < 1e-5
    with pytest.raises(ValueError, match="x.shape\\[-1\\] must be in_features = 64"):
        m(torch.randn(2, 63))


def test_from_dense_is_exact_and_checks_the_pattern():
    w = magnitude_prune(torch.randn(16, 32))
    m = Sparse24Linear.from_dense(w, bias=None)
    assert torch.equal(m.dense_weight(), w) and m.bias is None
    w[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"^layers\.0\.mlp\.up_proj\.weight: .*row 5, group 2"):
        Sparse24Linear.from_dense(w, name="layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"^weight: in_features K must be a multiple of 8"):
        Sparse24Linear.from_dense(torch.zeros(4, 12))
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 8"):
        Sparse24Linear(12, 4)
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        Sparse24Linear.from_dense(torch.zeros(4, 16, dtype=torch.float64))


def test_one_copy_of_the_weight():
    K, N = 128, 48
    m = Sparse24Linear.from_linear(linear(K, N)).to(torch.bfloat16)
    names = {n for n, _ in m.named_buffers()}
    assert names == {"packed_values", "packed_meta", "bias"}
    assert not list(m.parameters())
    assert m.nbytes == N * K // 2 * 2 + N * K // 8 + N * 2
    # In-place edits of the packed tensors are edits of the weight the next forward uses.
    m.packed_values.zero_()
    assert m(torch.randn(2, K, dtype=torch.bfloat16)).sub(m.bias).abs().max() == 0


def test_state_dict_round_trip():
    src = Sparse24Linear.from_linear(linear(64, 24), "magnitude").to(torch.float16)
    sd = src.state_dict()
    assert set(sd) == {"values", "meta", "bias"}
    assert sd["values"].dtype == torch.float16 and list(sd["values"].shape) == [24, 32]
    assert sd["meta"].dtype == torch.uint8 and list(sd["meta"].shape) == [24, 8]
    dst = Sparse24Linear(64, 24, dtype=torch.float16)
    dst.load_state_dict(sd)
    assert torch.equal(dst.dense_weight(), src.dense_weight())
    x = torch.randn(5, 64, dtype=torch.float16)
    assert torch.equal(dst(x), src(x))
    # a state_dict is a checkpoint: the interchange tensors themselves
    v, meta = bitpress.ops.sparse24_compress(src.dense_weight())
    assert torch.equal(sd["values"], v) and torch.equal(sd["meta"], meta)


@pytest.mark.parametrize(
    "key, bad, match",
    [
        ("values", lambda t: t.float(), r"values: expected shape|dtype"),
        ("values", lambda t: t[:, :-1], r"values: expected shape \[24, 32\]"),
        ("meta", lambda t: t.to(torch.int16), r"meta: dtype must be uint8"),
        ("meta", lambda t: t[:-1], r"meta: expected shape"),
        ("meta", lambda t: t.clone().fill_(0x11), r"meta: invalid 2:4 metadata nibble 0x1"),
    ],
)
def test_bad_state_dict_names_the_tensor(key, bad, match):
    sd = Sparse24Linear.from_linear(linear(64, 24)).to(torch.float16).state_dict()
    sd = {f"layer.{k}": v for k, v in sd.items()}
    sd[f"layer.{key}"] = bad(sd[f"layer.{key}"])
    parent = nn.Module()
    parent.layer = Sparse24Linear(64, 24, dtype=torch.float16)
    if key == "values" and sd["layer.values"].dtype == torch.float32:
        # another float dtype is a dtype change, accepted (the module adopts it)
        parent.load_state_dict(sd)
        return
    with pytest.raises(RuntimeError, match=f"layer\\.{match}"):
        parent.load_state_dict(sd)


def test_missing_keys_are_reported():
    m = Sparse24Linear(64, 8)
    res = m.load_state_dict({"bias": torch.zeros(8)}, strict=False)
    assert set(res.missing_keys) == {"values", "meta"}


def test_dtype_and_device_moves_keep_the_pattern():
    m = Sparse24Linear.from_linear(linear(32, 8))
    meta = m.packed_meta.clone()
    h = m.half()
    assert h.packed_values.dtype == torch.float16 and torch.equal(h.packed_meta, meta)
    assert h.bias.dtype == torch.float16
    assert_24(h.dense_weight())


def test_mma_layout_round_trip_without_gpu(monkeypatch):
    """The MMA layout's conversions exercised on the CPU: a module whose weight is held in the
    mma.sp layout (as on CUDA) computes, saves and converts back exactly."""
    monkeypatch.setattr(sparse24_modules, "default_layout", lambda device, N, K: Sparse24Layout.MMA)
    ref = Sparse24Linear.from_linear(linear(128, 64)).to(torch.float16)
    m = Sparse24Linear.from_interchange(*ref.interchange(), ref.bias)
    assert m.layout == Sparse24Layout.MMA and m.packed_meta.dtype == torch.int32
    assert torch.equal(m.dense_weight(), ref.dense_weight())
    sd = m.state_dict()
    assert torch.equal(sd["values"], ref.state_dict()["values"])
    assert torch.equal(sd["meta"], ref.state_dict()["meta"])
    x = torch.randn(3, 128, dtype=torch.float16)
    with bitpress.use_backend("reference"):  # the CPU kernel reads ROW only
        torch.testing.assert_close(m(x), ref(x), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layout_round_trip():
    m = Sparse24Linear.from_linear(linear(128, 64)).to(torch.float16)
    w = m.dense_weight()
    g = m.to("cuda")
    assert g.layout == Sparse24Layout.MMA
    assert g.packed_meta.dtype == torch.int32  # the mma.sp metadata words
    assert torch.equal(g.dense_weight().cpu(), w)
    x = torch.randn(4, 128, dtype=torch.float16)
    torch.testing.assert_close(g(x.cuda()).cpu(), m(x), rtol=2e-3, atol=2e-3)
    assert torch.equal(g.cpu().dense_weight(), w)


def test_compiles_fullgraph():
    m = Sparse24Linear.from_linear(linear(64, 16))
    x = torch.randn(3, 64)
    out = torch.compile(m, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, m(x))


# --------------------------------------------------------------------------------------------
# Sparse24Int4Linear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_int4_rtn_is_rtn_of_the_kept_values(sym, group_size):
    K, N = 128, 40
    lin = linear(K, N)
    m = Sparse24Int4Linear.from_linear(lin, group_size=group_size, sym=sym)
    pruned = magnitude_prune(lin.weight.detach())
    expect = rtn_quantize(pruned, group_size=group_size, sym=sym).dequantize()
    assert torch.equal(m.dense_weight(torch.float32), expect)
    assert_24(m.dense_weight())
    assert m.sym is sym and (m.packed_zeros is None) is sym


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 5])
def test_int4_forward_matches_dense_reference(dtype, M):
    K, N = 64, 24
    m = Sparse24Int4Linear.from_linear(linear(K, N), group_size=32, sym=False, dtype=dtype)
    x = torch.randn(M, K).to(dtype)
    ref = x.double() @ m.dense_weight(torch.float64).t() + m.bias.double()
    assert rel(m(x), ref) < TOL[dtype]


def test_int4_state_dict_round_trip_and_bad_tensors():
    src = Sparse24Int4Linear.from_linear(linear(64, 24), group_size=32, sym=False)
    sd = src.state_dict()
    assert set(sd) == {"qvalues", "meta", "scales", "zeros", "bias"}
    assert sd["qvalues"].dtype == torch.int32 and list(sd["qvalues"].shape) == [24, 4]
    dst = Sparse24Int4Linear(64, 24, group_size=32, sym=False)
    dst.load_state_dict(sd)
    x = torch.randn(3, 64, dtype=torch.float16)
    assert torch.equal(dst(x), src(x))
    for key, bad, match in [
        ("qvalues", sd["qvalues"].to(torch.int64), r"qvalues: dtype must be int32"),
        ("scales", sd["scales"][:1], r"scales: expected shape \[G, N\] = \[2, 24\]"),
        ("meta", sd["meta"].clone().fill_(0x22), r"meta: invalid 2:4 metadata nibble"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            Sparse24Int4Linear(64, 24, group_size=32, sym=False).load_state_dict({**sd, key: bad})
    sym = Sparse24Int4Linear(64, 24, group_size=32, sym=True)
    with pytest.raises(RuntimeError, match="zeros: unexpected for symmetric"):
        sym.load_state_dict(sd)
    assert set(sym.state_dict()) == {"qvalues", "meta", "scales", "bias"}


def test_int4_gptq_with_mask_beats_rtn_and_keeps_the_mask():
    K, N = 128, 64
    x = correlated_inputs(2048, K, seed=21)
    lin = linear(K, N, seed=3)
    sparse = Sparse24Linear.from_linear(lin, "sparsegpt", x)
    rtn = Sparse24Int4Linear.from_sparse24(sparse, group_size=32)
    gptq = Sparse24Int4Linear.from_sparse24(sparse, group_size=32, inputs=x)
    assert torch.equal(gptq.packed_meta, sparse.packed_meta)
    assert torch.equal(rtn.packed_meta, sparse.packed_meta)
    ref = F.linear(x.double(), lin.weight.detach().double())
    err = {
        k: rel(F.linear(x.double(), m.dense_weight(torch.float64)), ref)
        for k, m in [("rtn", rtn), ("gptq", gptq)]
    }
    assert err["gptq"] < err["rtn"], err
    joint = Sparse24Int4Linear.from_linear(lin, "sparsegpt", x, group_size=32)
    assert rel(F.linear(x.double(), joint.dense_weight(torch.float64)), ref) < err["rtn"]


def test_int4_one_copy_and_rejects_act_order():
    m = Sparse24Int4Linear.from_linear(linear(128, 32, bias=False), group_size=64)
    names = {n for n, _ in m.named_buffers()}
    assert names == {"packed_qvalues", "packed_meta", "packed_scales"}
    assert m.nbytes == 32 * 128 // 16 * 4 + 32 * 128 // 8 + 2 * 32 * 2
    model = bitpress.sparsify_(nn.Sequential(linear(64, 32)), Sparse24Config())
    with pytest.raises(ValueError, match="act_order: not supported on 2:4"):
        bitpress.quantize_(
            model,
            Int4Config(
                group_size=32, method="gptq", act_order=True, calibration=[torch.randn(4, 64)]
            ),
        )


# --------------------------------------------------------------------------------------------
# sparsify_ / quantize_ on whole models
# --------------------------------------------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 30)
    ).eval()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_sparsify_sequential(method):
    x = correlated_inputs(512, 64, seed=22)
    calib = None if method == "magnitude" else [x[:256], x[256:]]
    model = bitpress.sparsify_(_mlp(), Sparse24Config(method=method, calibration=calib))
    assert [type(m).__name__ for m in model] == [
        "Sparse24Linear",
        "GELU",
        "Sparse24Linear",
        "GELU",
        "Sparse24Linear",
    ]
    dense = _mlp()
    with torch.no_grad():
        for d, s in zip(dense, model, strict=True):
            if isinstance(d, nn.Linear):
                d.weight.copy_(s.dense_weight())
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def test_sparsify_then_quantize_sequential():
    x = correlated_inputs(1024, 64, seed=23)
    with torch.no_grad():
        ref = _mlp()(x)
    errs = {}
    for method in ("rtn", "gptq"):
        model = bitpress.sparsify_(_mlp(), Sparse24Config("sparsegpt", calibration=[x]))
        masks = [m.packed_meta.clone() for m in model if isinstance(m, Sparse24Linear)]
        bitpress.quantize_(
            model,
            Int4Config(group_size=32, method=method, calibration=[x] if method == "gptq" else None),
        )
        q = [m for m in model if isinstance(m, Sparse24Int4Linear)]
        assert len(q) == 3 and all(
            torch.equal(m.packed_meta, k) for m, k in zip(q, masks, strict=True)
        )
        with torch.no_grad():
            errs[method] = rel(model(x), ref)
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.parametrize("int4_method", ["rtn", "gptq"])
def test_sparsify_tiny_llama_and_filter(int4_method):
    pytest.importorskip("transformers")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(24))
    model = tiny_llama(correlated=True)
    bitpress.sparsify_(
        model,
        Sparse24Config("sparsegpt", calibration=[ids], filter_fn=lambda n, m: "mlp" in n),
    )
    kinds = {
        n: type(m).__name__
        for n, m in model.named_modules()
        if n.endswith("_proj") or n == "lm_head"
    }
    assert all(v == "Sparse24Linear" for n, v in kinds.items() if ".mlp." in n), kinds
    assert all(v == "Linear" for n, v in kinds.items() if ".mlp." not in n), kinds
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    calib = [ids] if int4_method == "gptq" else None
    bitpress.quantize_(model, Int4Config(group_size=32, method=int4_method, calibration=calib))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert all(v == "Sparse24Int4Linear" for n, v in kinds.items() if ".mlp." in n), kinds
    assert all(v == "Int4Linear" for n, v in kinds.items() if ".mlp." not in n), kinds
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_config_errors():
    with pytest.raises(ValueError, match="Sparse24Config.method must be one of"):
        Sparse24Config(method="random")
    with pytest.raises(ValueError, match="needs calibration"):
        Sparse24Config(method="wanda")
    with pytest.raises(TypeError, match="quantize_: config must be one of"):
        bitpress.sparsify_(_mlp(), object())
