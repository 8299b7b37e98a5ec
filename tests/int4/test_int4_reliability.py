"""Issue 15 (Python and C++ layers): gradients, pickling, in-place edits, shared validation,
checkpoint hardening and error messages that name what is wrong. Each test failed before its fix."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from int4_data import make_quantized
from tiny_llama import tiny_llama

import bitpress
from bitpress import ops
from bitpress._core import backends
from bitpress.int4 import Int4Config, Int4Linear
from bitpress.int4.gptq import gptq_quantize
from bitpress.int4.layout import Int4CpuTiles, pack

CPU_BACKENDS = ["cpu", "reference"]


# --------------------------------------------------------------------------------------------
# 8. gradients through quantized layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_gemm_backward_matches_dense(backend, dtype):
    w = pack(make_quantized(64, 40, 32, sym=False, act_order=True))
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, dtype=dtype, requires_grad=True)
    gy = torch.randn(3, 5, 40, dtype=dtype)
    ops.int4_gemm(x, w, bias, backend=backend).backward(gy)
    W = bitpress.reference.int4_gemm(torch.eye(64, dtype=torch.float64), w).t()  # [N, K]
    want_x = gy.double() @ W
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert x.grad is not None and x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), want_x, rtol=tol, atol=tol)
    torch.testing.assert_close(bias.grad.double(), gy.double().sum((0, 1)), rtol=tol, atol=tol)


def test_int4_gemm_gradcheck():
    """gradcheck in float32 (the op takes no float64 x) with a finite-difference step to match."""
    w = pack(make_quantized(32, 16, 32))
    x = torch.randn(2, 32, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ops.int4_gemm(t, w), (x,), eps=1e-2, atol=2e-2, rtol=1e-2, fast_mode=True
    )


def test_int4_linear_backward_and_frozen_weight():
    m = Int4Linear.from_linear(torch.nn.Linear(64, 24), group_size=32).float()
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    w = m.weight_packed
    w.scales.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen: scales must not require grad"):
        ops.int4_gemm(x, w)


# --------------------------------------------------------------------------------------------
# 9, 12. one copy of the weight: in-place edits take effect; pickling
# --------------------------------------------------------------------------------------------


def test_in_place_edits_take_effect():
    m = Int4Linear.from_linear(torch.nn.Linear(64, 24, bias=False), group_size=32).float()
    x = torch.randn(3, 64)
    y = m(x)
    m.packed_scales.mul_(2)
    torch.testing.assert_close(m(x), 2 * y)


def test_pickle_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    bitpress.quantize_(model, Int4Config(group_size=32, filter_fn=lambda n, m: True))
    x = torch.randn(2, 64, dtype=torch.float16)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), model(x))


# --------------------------------------------------------------------------------------------
# 13. one group_size validation
# --------------------------------------------------------------------------------------------


def test_group_size_7_is_refused_everywhere(tmp_path):
    lin = torch.nn.Linear(64, 16)
    with pytest.raises(ValueError, match="group_size must be -1 or a positive multiple of 8"):
        Int4Linear(64, 16, group_size=7)
    with pytest.raises(ValueError, match="group_size must be -1 or a positive multiple of 8"):
        Int4Linear.from_linear(lin, group_size=7)
    with pytest.raises(ValueError, match="group_size must be -1 or a positive multiple of 8"):
        Int4Config(group_size=7)
    g = Int4Linear.from_linear(lin, group_size=8).to_gptq()
    with pytest.raises(ValueError, match="group_size must be -1 or a positive multiple of 8"):
        Int4Linear.from_gptq(g["qweight"], g["qzeros"], g["scales"][:10], group_size=7)
    with pytest.raises(ValueError, match="group_size must be -1 or a positive multiple of 8"):
        bitpress.checkpoint.parse_quantization_config({"bits": 4, "group_size": 7})


# --------------------------------------------------------------------------------------------
# 14, 15. checkpoints: confined shards, messages that name the file or field
# --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    bitpress.quantize_(model, Int4Config(group_size=32))
    bitpress.save_pretrained(model, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    return tmp_path


def _edit_index(path, fn):
    f = path / "model.safetensors.index.json"
    idx = json.loads(f.read_text())
    fn(idx["weight_map"])
    f.write_text(json.dumps(idx))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_shard_outside_the_checkpoint_is_refused(saved, shard):
    outside = saved.parent / "outside.safetensors"
    outside.write_bytes(b"")
    first = next(
        iter(json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"])
    )
    _edit_index(saved, lambda wm: wm.__setitem__(first, shard))
    with pytest.raises(ValueError, match="is not a file of the checkpoint directory"):
        bitpress.from_pretrained(saved)


def test_weight_map_value_not_a_string(saved):
    first = next(
        iter(json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"])
    )
    _edit_index(saved, lambda wm: wm.__setitem__(first, 3))
    with pytest.raises(ValueError, match=r"weight_map\[.*\] must be a file name"):
        bitpress.from_pretrained(saved)


def test_config_json_that_is_a_list(saved):
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: must hold a JSON object, got a list"):
        bitpress.from_pretrained(saved)


def test_broken_safetensors_names_the_file(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=f"{shard.name}: not a readable safetensors file"):
        bitpress.from_pretrained(saved)


# --------------------------------------------------------------------------------------------
# 10, 15. op errors that name the argument
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int4_gemm_perm_with_duplicates_is_refused(backend):
    w = pack(make_quantized(64, 16, 32, act_order=True))
    assert w.perm is not None
    perm = w.perm.clone()
    rows = (perm >= 0).nonzero().flatten()
    perm[rows[1]] = perm[rows[0]]
    bad = Int4CpuTiles(**{**w.__dict__, "perm": perm})
    with pytest.raises(RuntimeError, match="perm must name each row of x at most once"):
        ops.int4_gemm(torch.randn(2, 64), bad, backend=backend)


def test_int4_gemm_no_groups_is_named():
    w = pack(make_quantized(64, 16, 32))
    bad = Int4CpuTiles(
        **{**w.__dict__, "scales": w.scales[:, :0], "group_starts": w.group_starts[:1]}
    )
    with pytest.raises(RuntimeError, match="scales must hold at least one group"):
        ops.int4_gemm(torch.randn(2, 64), bad, backend="cpu")


def test_int4_gemm_repack_empty_perm():
    qweight = torch.zeros(8, 70, dtype=torch.int32)
    out = ops.int4_gemm_repack(qweight, torch.zeros(0, dtype=torch.int32), backend="cpu")
    assert out.shape == (0, 256)


def test_int4_dequantize_huge_group_size():
    qweight = torch.zeros(4, 8, dtype=torch.int32)
    scales = torch.ones(1, 8)
    out = ops.int4_dequantize(qweight, scales, None, None, 2**63 - 1, backend="cpu")
    assert out.shape == (32, 8) and torch.equal(out, torch.full((32, 8), -8.0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int4_dequantize_names_qweight_when_its_rows_disagree_with_g_idx(backend):
    qweight = torch.zeros(31, 8, dtype=torch.int32)
    g_idx = torch.arange(256, dtype=torch.int32) // 128
    with pytest.raises(RuntimeError, match=r"qweight.size\(0\) must be K/8 = 32"):
        ops.int4_dequantize(qweight, torch.ones(2, 8), None, g_idx, 128, backend=backend)


def test_from_gptq_names_qweight_when_its_rows_disagree_with_g_idx():
    g = Int4Linear.from_linear(torch.nn.Linear(256, 16), group_size=128).to_gptq()
    with pytest.raises(ValueError, match=r"qweight must have shape \[K/8, N\] = \[32, 16\]"):
        Int4Linear.from_gptq(
            g["qweight"][:31], g["qzeros"], g["scales"], g["g_idx"], group_size=128, sym=True,
            checkpoint_format="gptq",
        )  # fmt: skip


@pytest.mark.parametrize(("in_features", "out_features"), [(0, 8), (64, -1), (64, 0)])
def test_int4_linear_bad_sizes(in_features, out_features):
    with pytest.raises(ValueError, match="Int4Linear: (in|out)_features must be"):
        Int4Linear(in_features, out_features)


def test_int4_linear_0d_input():
    m = Int4Linear.from_linear(torch.nn.Linear(64, 8), group_size=32)
    with pytest.raises(ValueError, match="x.shape\\[-1\\] must be in_features = 64"):
        m(torch.tensor(1.0, dtype=torch.float16))


def test_ops_on_meta_tensors_check_shapes():
    B, K, V = 2, 3, 11
    tokens, a, e = ops.spec_verify(
        torch.randn(B, K + 1, V, device="meta"), torch.zeros(B, K, dtype=torch.long, device="meta")
    )
    assert tokens.shape == (B, K + 1) and tokens.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"draft_tokens.size\(1\) must be 3"):
        ops.spec_verify(
            torch.randn(B, K + 1, V, device="meta"),
            torch.zeros(B, K + 1, dtype=torch.long, device="meta"),
        )


# --------------------------------------------------------------------------------------------
# 11. spec_verify: -1 padding beyond num_draft, invalid draft_probs
# --------------------------------------------------------------------------------------------


def _spec_inputs(B=4, K=3, V=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    d = torch.randint(0, V, (B, K), generator=g)
    return logits, d, q


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_spec_verify_padding_beyond_num_draft(backend):
    logits, d, _ = _spec_inputs()
    num_draft = torch.tensor([0, 1, 2, 3])
    d = torch.where(torch.arange(3)[None, :] < num_draft[:, None], d, -1)
    for temp in (None, 0.7):
        seeds = torch.arange(4)
        got = ops.spec_verify(logits, d, num_draft, temperature=temp, seeds=seeds, backend=backend)
        want = ops.spec_verify(
            logits, d.clamp(min=0), num_draft, temperature=temp, seeds=seeds, backend="cpu"
        )
        for g_, w_ in zip(got, want, strict=True):
            assert torch.equal(g_, w_)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_spec_verify_rejects_invalid_draft_probs(backend, bad):
    logits, d, q = _spec_inputs()
    q[:, 0, :] = bad  # read at the first draft of every sampling row
    with pytest.raises(RuntimeError, match=r"draft_probs values must be finite and >= 0"):
        ops.spec_verify(logits, d, draft_probs=q, temperature=1.0, seeds=torch.arange(4),
                        backend=backend)  # fmt: skip


def test_spec_verify_greedy_rows_do_not_read_draft_probs():
    logits, d, q = _spec_inputs()
    q[:] = float("nan")
    out = ops.spec_verify(logits, d, draft_probs=q, temperature=0.0, backend="cpu")
    assert torch.equal(out[0], ops.spec_verify(logits, d, backend="cpu")[0])


# --------------------------------------------------------------------------------------------
# 15. GPTQ on a plain module; 17. act_group_aware
# --------------------------------------------------------------------------------------------


def test_gptq_on_a_plain_sequential():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    x = torch.randn(256, 64)
    y = model(x)
    cal = list(x.split(64))
    bitpress.quantize_(
        model,
        Int4Config(method="gptq", calibration=cal, group_size=32, filter_fn=lambda n, m: True),
    )
    assert all(isinstance(model[i], Int4Linear) for i in (0, 2))
    err = ((model(x) - y).norm() / y.norm()).item()
    assert err < 0.2


def test_act_group_aware_lowers_layer_error_and_keeps_g_idx_monotonic():
    g = torch.Generator().manual_seed(0)
    K, N = 256, 64
    X = (torch.randn(2048, K, generator=g) @ (torch.randn(K, K, generator=g) / K**0.5)) * torch.exp(
        torch.randn(K, generator=g)
    )
    W = torch.randn(N, K, generator=g) * 0.02
    H = 2 * X.t() @ X / X.shape[0]

    def err(qw):
        return ((X @ (W - qw.dequantize(torch.float32)).t()).norm() / (X @ W.t()).norm()).item()

    plain = gptq_quantize(W, H, group_size=64)
    gar = gptq_quantize(W, H, group_size=64, act_group_aware=True)
    assert torch.equal(gar.g_idx, torch.arange(K, dtype=torch.int32) // 64)
    assert err(gar) < err(plain)


def test_saved_config_does_not_claim_true_sequential(saved):
    cfg = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert cfg["true_sequential"] is False


def test_forced_backend_refusal_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this call: .*cuda"):
        ops.int4_gemm(torch.randn(2, 64), pack(make_quantized(64, 8, 32)), backend="cuda")
    assert backends.refusal("int4_gemm", "cpu", "cpu") is None
