"""Int4Linear and quantize_: construction, forward against the dequantized weight, state_dict
round trip, repr, device/dtype moves, and swapping the Linear layers of a model."""

from __future__ import annotations

import pytest
import torch
from int4_data import make_quantized
from torch import nn

import bitpress
from bitpress.int4 import Int4Linear
from bitpress.int4.layout import Int4CpuTiles, Int4Layout, Int4MmaTiles
from bitpress.testing import rel_err, sqnr_db


@pytest.mark.parametrize("gs,sym", [(32, True), (64, False), (128, True), (-1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_from_linear_forward(gs, sym, dtype):
    lin = nn.Linear(256, 96, bias=True)
    m = Int4Linear.from_linear(lin, group_size=gs, sym=sym)
    x = torch.randn(2, 3, 256).to(dtype)
    y = m(x)
    assert y.shape == (2, 3, 96) and y.dtype == dtype
    w = m.dequantize(torch.float64)
    ref = x.double() @ w.t() + m.bias.double()
    assert rel_err(y, ref) < {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    # the quantized weight is close to the original: 4-bit RTN SQNR
    assert sqnr_db(lin.weight, w.float()) > 15


def test_from_quantized_act_order_and_state_dict_round_trip():
    qw = make_quantized(128, 40, 32, sym=False, act_order=True)
    bias = torch.randn(40, dtype=torch.float16)
    m = Int4Linear.from_quantized(qw, bias)
    back = m.quantized()
    for name in ("q", "zeros", "g_idx", "scales"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    sd = m.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    m2 = Int4Linear(128, 40, True, group_size=32, sym=False)
    m2.load_state_dict(sd)
    x = torch.randn(5, 128, dtype=torch.float16)
    assert torch.equal(m2(x), m(x))
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_state_dict_invalidates_the_kernel_layout():
    a = Int4Linear.from_quantized(make_quantized(64, 16, 32, seed=1))
    b = Int4Linear.from_quantized(make_quantized(64, 16, 32, seed=2))
    x = torch.randn(1, 64, dtype=torch.float16)
    ya, yb = a(x), b(x)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), yb) and not torch.equal(ya, yb)


def test_gptq_tensors_round_trip():
    qw = make_quantized(64, 24, 32, sym=False)
    m = Int4Linear.from_quantized(qw)
    for fmt in ("gptq", "gptq_v2"):
        t = m.to_gptq(fmt)
        m2 = Int4Linear.from_gptq(
            t["qweight"],
            t["qzeros"],
            t["scales"],
            t["g_idx"],
            group_size=32,
            sym=False,
            checkpoint_format=fmt,
        )
        # The same GPTQ tensors (state_dict and to_gptq) and the same packed weight.
        back = m2.to_gptq(fmt)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(back[name], t[name]), (fmt, name)
        for name, buf in m.named_buffers():
            other = dict(m2.named_buffers())[name]
            assert (buf is None and other is None) or torch.equal(buf, other), (fmt, name)


def test_repr_and_errors():
    m = Int4Linear.from_quantized(make_quantized(64, 16, 32, sym=False, act_order=True))
    r = repr(m)
    assert "in_features=64" in r and "out_features=16" in r and "group_size=32" in r
    # An act-order weight carries a row permutation; the layout is named by its type.
    assert "row_perm=True" in r and "sym=False" in r and "layout=Int4CpuTiles" in r
    with pytest.raises(
        ValueError, match="Int4Linear: in_features must be a positive multiple of 8"
    ):
        Int4Linear(60, 8)
    with pytest.raises(ValueError, match="Int4Linear: in_features must be a positive multiple"):
        Int4Linear(4, 8)
    with pytest.raises(ValueError, match="x.shape\\[-1\\] must be in_features = 64"):
        m(torch.randn(2, 63, dtype=torch.float16))


def test_to_dtype_keeps_one_packed_weight():
    """A dtype change converts the saved scales and the bias, not the kernel layout (float32
    scales, int32 words): the packed buffers are the same tensors, and the output is unchanged."""
    m = Int4Linear.from_quantized(make_quantized(64, 16, 32), torch.randn(16).half())
    x = torch.randn(2, 64)
    y = m(x)
    before = {name: buf for name, buf in m.named_buffers() if name.startswith("packed_")}
    # Symmetric, no act-order: no zeros, no perm (None buffers).
    assert set(before) == {"packed_qweight", "packed_scales", "packed_group_starts"}
    m = m.to(torch.float32)
    assert m.dtype == torch.float32 and m.bias.dtype == torch.float32
    assert m.state_dict()["scales"].dtype == torch.float32
    for name, buf in m.named_buffers():
        if name.startswith("packed_"):
            assert buf is before[name], name  # not rebuilt, not copied
    assert m.packed_scales.dtype == torch.float32 and m.packed_qweight.dtype == torch.int32
    torch.testing.assert_close(m(x), y, rtol=2e-5, atol=1e-6)
    m = m.half()
    assert m.dtype == torch.float16 and m.bias.dtype == torch.float16
    assert m.state_dict()["scales"].dtype == torch.float16
    torch.testing.assert_close(m(x), y, rtol=2e-5, atol=1e-6)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.odd = nn.Linear(60, 8)  # in_features not a multiple of 8: stays
        self.down = nn.Linear(128, 64, bias=False)
        self.lm_head = nn.Linear(64, 32)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


def test_quantize_swaps_linears_in_place():
    model = Tiny()
    x = torch.randn(4, 64)
    y0 = model(x)
    out = bitpress.quantize_(model, bitpress.Int4Config(group_size=32, sym=False))
    assert out is model
    assert isinstance(model.up, Int4Linear) and isinstance(model.down, Int4Linear)
    assert type(model.lm_head) is nn.Linear and type(model.odd) is nn.Linear
    y1 = model(x)
    assert sqnr_db(y0, y1) > 15


def test_quantize_filter_and_config_errors():
    model = Tiny()
    bitpress.quantize_(model, bitpress.Int4Config(filter_fn=lambda n, m: n == "up", group_size=64))
    assert isinstance(model.up, Int4Linear) and type(model.down) is nn.Linear
    with pytest.raises(ValueError, match="method must be 'rtn' or 'gptq'"):
        bitpress.Int4Config(method="awq")
    with pytest.raises(ValueError, match="group_size must be -1 or a positive multiple of 8"):
        bitpress.Int4Config(group_size=12)
    with pytest.raises(ValueError, match="needs calibration"):
        bitpress.Int4Config(method="gptq")


def test_kernel_layout_follows_the_device():
    m = Int4Linear.from_linear(nn.Linear(64, 32), group_size=32)
    w = m.packed(torch.device("cpu"))
    assert type(w) is Int4CpuTiles and w.layout == Int4Layout.CPU_TILES
    assert w.qweight is m.packed_qweight  # the module's own weight, not a copy
    assert type(m.weight_packed) is Int4CpuTiles
    # Another device's layout is a converted copy, which the module does not keep.
    gpu = m.weight_packed.to("cpu", layout=Int4MmaTiles)
    assert type(gpu) is Int4MmaTiles and type(m.weight_packed) is Int4CpuTiles


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_forward_uses_the_mma_layout(dtype):
    """On CUDA the module repacks into the GPU mma layout once and runs the default backend."""
    lin = nn.Linear(512, 300, bias=True)
    m = Int4Linear.from_linear(lin, group_size=128, sym=False, dtype=dtype).cuda()
    assert type(m.weight_packed) is Int4MmaTiles and m.weight_packed.layout == Int4Layout.MMA_TILES
    assert m.packed_qweight.device.type == "cuda" and m.device.type == "cuda"
    assert m.packed(torch.device("cuda")).qweight is m.packed_qweight
    # Back on the CPU: the CPU tile layout, the same weight.
    back = m.cpu()
    assert type(back.weight_packed) is Int4CpuTiles
    for M in (1, 16, 200):
        x = torch.randn(M, 512, dtype=dtype, device="cuda")
        ref = x.double() @ m.dequantize(torch.float64).t() + m.bias.double()
        assert rel_err(m(x), ref) < {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
