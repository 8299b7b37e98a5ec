"""Fp8Linear and Fp8Config: the weight quantization and every (granularity, activations) forward
against plain-torch formulas written here (E4M3 = clamp to +-448, then the round-to-nearest-even
cast), odd shapes, every x dtype, leading dims; the state_dict in compressed-tensors names with
one copy of the weight; dtype / device moves; calibration; quantize_ on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

import bitpress
from bitpress.testing import rel_err

E4M3 = torch.float8_e4m3fn
GRANULARITIES = ["tensor", "channel", "block"]
ACTIVATIONS = [None, "dynamic", "static"]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def quant(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of x / s (s broadcast; both float32, as the op's contract computes), float64."""
    return (x.float() / s.float()).clamp(-448, 448).to(E4M3).double()


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The fp32 scale amax / 448, as float64 values."""
    return (amax.float() / 448).double()


def blocks(x: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """amax of every [b0, b1] block of a 2-D x (ragged edges included), [ceil(R/b0), ceil(C/b1)]."""
    R, C = x.shape
    out = torch.zeros(-(-R // b0), -(-C // b1), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].abs().amax()
    return out


def expand(s: torch.Tensor, R: int, C: int, b0: int, b1: int) -> torch.Tensor:
    return s.repeat_interleave(b0, 0)[:R].repeat_interleave(b1, 1)[:, :C]


def ref_weight(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes [N, K] float64, scale of every element [N, K] float64)."""
    N, K = w.shape
    if granularity == "tensor":
        s = scale_of(w.abs().amax()).expand(N, K)
    elif granularity == "channel":
        s = scale_of(w.abs().amax(1, keepdim=True)).expand(N, K)
    else:
        s = expand(scale_of(blocks(w.double(), 128, 128)), N, K, 128, 128)
    return quant(w, s), s


def ref_forward(m, lin, x, granularity, activations, input_scale=None):
    q, s = ref_weight(lin.weight.detach(), granularity)
    W = q * s
    x2 = x.reshape(-1, x.shape[-1]).double()
    M, K = x2.shape
    if activations == "dynamic":
        if granularity == "block":
            sx = expand(scale_of(blocks(x2, 1, 128)), M, K, 1, 128)
        else:
            sx = scale_of(x2.abs().amax(1, keepdim=True)).expand(M, K)
        x2 = quant(x2, sx) * sx
    elif activations == "static":
        x2 = quant(x2, torch.tensor(float(input_scale), dtype=torch.float64)) * float(input_scale)
    y = x2 @ W.T
    if lin.bias is not None:
        y = y + lin.bias.double()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("N, K", [(33, 200), (130, 129), (1, 8)])
def test_weight_and_forward_match_the_formulas(granularity, activations, N, K):
    g = torch.Generator().manual_seed(N * K)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * torch.logspace(-2, 1, K))
    scale = 0.02 if activations == "static" else None
    m = bitpress.Fp8Linear.from_linear(lin, granularity, activations, input_scale=scale)
    q, s = ref_weight(lin.weight.detach(), granularity)
    assert m.weight.dtype == E4M3 and torch.equal(m.weight.double(), q)
    assert m.weight_scale.dtype == torch.float32
    assert torch.equal(m.expanded_scale().double(), s.float().double())
    assert torch.equal(m.dequantize(torch.float64), (q * s.float().double()))
    for shape in [(1, K), (7, K), (2, 3, K)]:
        x = torch.randn(*shape, generator=g)
        want = ref_forward(m, lin, x, granularity, activations, scale)
        got = m(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert rel_err(got.double(), want) < 1e-5, (shape, rel_err(got.double(), want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_x_dtypes(dtype, activations):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(160, 72).to(dtype)
    scale = 0.01 if activations == "static" else None
    m = bitpress.Fp8Linear.from_linear(lin, "channel", activations, input_scale=scale)
    assert m.bias.dtype == dtype and m.dtype == dtype
    x = torch.randn(5, 160, generator=g).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    want = ref_forward(m, lin.float(), x.float(), "channel", activations, scale)
    assert rel_err(y.double(), want) < TOL[dtype] + 1e-2 * (
        activations is not None and dtype != torch.float32
    )


def test_non_contiguous_input():
    lin = torch.nn.Linear(64, 24)
    m = bitpress.Fp8Linear.from_linear(lin, "channel", "dynamic")
    x = torch.randn(64, 10).t()  # [10, 64], stride (1, 10)
    assert torch.equal(m(x), m(x.contiguous()))


def test_state_dict_is_one_copy_in_compressed_tensors_names():
    lin = torch.nn.Linear(300, 130, bias=True)
    for g, shape in [("tensor", [1]), ("channel", [130, 1]), ("block", [2, 3])]:
        m = bitpress.Fp8Linear.from_linear(lin, g, "static", input_scale=0.5)
        sd = m.state_dict()
        assert list(sd) == ["weight", "weight_scale", "input_scale", "bias"]
        assert sd["weight"].dtype == E4M3 and list(sd["weight"].shape) == [130, 300]
        assert list(sd["weight_scale"].shape) == shape and list(sd["input_scale"].shape) == [1]
        assert sd["weight"].data_ptr() == m.weight.data_ptr()  # a view, not a converted copy
        assert m.nbytes == 130 * 300 + 4 * (len(sd["weight_scale"].reshape(-1)) + 1) + 4 * 130
        assert not list(m.parameters())
        fresh = bitpress.Fp8Linear(
            300, 130, granularity=g, activations="static", dtype=torch.float32
        )
        fresh.load_state_dict(sd)
        x = torch.randn(3, 300)
        assert torch.equal(fresh(x), m(x))


def test_dtype_and_device_moves_keep_the_fp8_tensors():
    m = bitpress.Fp8Linear.from_linear(torch.nn.Linear(64, 32), "block", "static", input_scale=0.1)
    w = m.weight.clone()
    m.half()
    assert m.dtype == torch.float16 and m.bias.dtype == torch.float16
    assert m.weight.dtype == E4M3 and torch.equal(m.weight.view(torch.uint8), w.view(torch.uint8))
    assert m.weight_scale.dtype == torch.float32 and m.input_scale.dtype == torch.float32
    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16 and m.weight.dtype == E4M3
    m.to("meta")
    assert (
        m.device.type == "meta" and m.weight.dtype == E4M3 and m.input_scale.device.type == "meta"
    )
    if torch.cuda.is_available():
        c = bitpress.Fp8Linear.from_linear(torch.nn.Linear(64, 32), "channel", None).cuda()
        assert c.weight.is_cuda and c.weight_scale.is_cuda


def test_calibrate_and_static_without_scale():
    lin = torch.nn.Linear(40, 16)
    m = bitpress.Fp8Linear.from_linear(lin, "tensor", "static")
    with pytest.raises(RuntimeError, match="needs input_scale"):
        m(torch.randn(2, 40))
    xs = [torch.randn(3, 40), torch.randn(5, 40) * 3]
    s = m.calibrate(xs)
    amax = max(float(x.abs().max()) for x in xs)
    assert s.shape == (1,) and abs(float(s) - amax / 448) <= 1e-6 * amax
    m2 = bitpress.Fp8Linear.from_linear(lin, "tensor", "static", calibration=xs)
    assert torch.equal(m2.input_scale, m.input_scale)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bitpress.Fp8Linear.from_linear(torch.nn.Linear(8, 8), "row"), "granularity"),
        (
            lambda: bitpress.Fp8Linear.from_linear(torch.nn.Linear(8, 8), "tensor", "token"),
            "activations",
        ),
        (
            lambda: bitpress.Fp8Linear.from_linear(
                torch.nn.Linear(8, 8), "tensor", None, input_scale=1.0
            ),
            "input_scale",
        ),
        (
            lambda: bitpress.Fp8Linear.from_tensors(
                torch.zeros(4, 8), torch.ones(1), granularity="tensor", activations=None
            ),
            "weight must be a float8_e4m3fn",
        ),
        (
            lambda: bitpress.Fp8Linear.from_tensors(
                torch.zeros(4, 8).to(E4M3), torch.ones(4), granularity="channel", activations=None
            ),
            r"weight_scale must have shape \[4, 1\]",
        ),
        (
            lambda: bitpress.Fp8Linear.from_tensors(
                torch.zeros(4, 8).to(E4M3),
                torch.ones(1),
                granularity="tensor",
                activations="static",
            ),
            "input_scale must be given",
        ),
        (
            lambda: bitpress.Fp8Linear.from_linear(
                torch.nn.Linear(8, 8), "tensor", "static", input_scale=-1.0
            ),
            "input_scale must be one positive",
        ),
        (
            lambda: bitpress.Fp8Linear.from_linear(torch.nn.Linear(8, 8))(torch.randn(2, 7)),
            r"x.shape\[-1\]",
        ),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_compile_fullgraph():
    m = bitpress.Fp8Linear.from_linear(torch.nn.Linear(64, 48), "channel", "dynamic")
    x = torch.randn(4, 64)
    f = torch.compile(m, fullgraph=True)
    assert rel_err(f(x), m(x)) < 1e-6


# --------------------------------------------------------------------------------------------
# Fp8Config / quantize_
# --------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_quantize_model(granularity, activations):
    dense = _llama()
    model = copy.deepcopy(dense)
    calib = [IDS[:1], IDS[1:]] if activations == "static" else None
    cfg = bitpress.Fp8Config(
        granularity=granularity,
        activations=activations,
        calibration=calib,
        ignore=["re:.*layers\\.1\\.mlp"],
    )
    bitpress.quantize_(model, cfg)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if "proj" in n or "lm_head" in n}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.1.mlp.up_proj"] == "Linear"
    assert kinds["model.layers.0.mlp.up_proj"] == "Fp8Linear"
    assert sum(k == "Fp8Linear" for k in kinds.values()) == 4 + 3 + 4
    for m in model.modules():
        if isinstance(m, bitpress.Fp8Linear):
            assert (m.granularity, m.activations) == (granularity, activations)
            assert (m.input_scale is not None) == (activations == "static")
    with torch.no_grad():
        a, b = model(IDS).logits, dense(IDS).logits
    assert rel_err(a, b) < 0.1


def test_config_errors():
    with pytest.raises(ValueError, match="calibration"):
        bitpress.Fp8Config(activations="static")
    with pytest.raises(ValueError, match="granularity"):
        bitpress.Fp8Config(granularity="row")
    with pytest.raises(ValueError, match="ignore"):
        bitpress.Fp8Config(ignore="lm_head")
