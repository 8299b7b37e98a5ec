"""The kernel layouts are types (Int4CpuTiles, Int4MmaTiles, codes of Int4Layout), the weight
structure is the op's schema, and Int4Linear holds one copy of its weight (issue 9 item 8)."""

from __future__ import annotations

import io

import pytest
import torch
from int4_data import make_quantized
from torch import nn

from bitpress.int4 import Int4Linear
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import (
    LAYOUTS,
    Int4CpuTiles,
    Int4Layout,
    Int4MmaTiles,
    Int4PackedWeight,
    default_layout,
)


def test_layout_codes_and_types():
    assert int(Int4Layout.CPU_TILES) == 0 and int(Int4Layout.MMA_TILES) == 1
    assert LAYOUTS == {Int4Layout.CPU_TILES: Int4CpuTiles, Int4Layout.MMA_TILES: Int4MmaTiles}
    assert Int4CpuTiles.layout == Int4Layout.CPU_TILES
    assert Int4MmaTiles.layout == Int4Layout.MMA_TILES
    assert default_layout("cpu") is Int4CpuTiles and default_layout("cuda") is Int4MmaTiles
    qw = make_quantized(64, 70, 32, sym=False, act_order=True)
    with pytest.raises(TypeError, match="Int4PackedWeight is abstract"):
        Int4PackedWeight(**vars(int4_layout.pack(qw)))
    with pytest.raises(TypeError, match="layout must be Int4CpuTiles or Int4MmaTiles"):
        int4_layout.pack(qw, layout="mma")


@pytest.mark.parametrize("layout", [Int4CpuTiles, Int4MmaTiles], ids=lambda t: t.__name__)
def test_op_kwargs_are_the_schema_in_order(layout):
    qw = make_quantized(64, 70, 32, sym=False, act_order=True)
    w = int4_layout.pack(qw, layout=layout)
    assert type(w) is layout and w.layout == layout.layout
    kw = w.op_kwargs()
    for name in ("qweight", "scales", "zeros", "group_starts", "perm"):
        assert kw[name] is getattr(w, name), name
    assert kw["out_features"] == 70 and kw["layout"] == int(layout.layout)
    for op in ("int4_gemm", "int4_gemm_triton"):
        args = [a.name for a in getattr(torch.ops.bitpress, op).default._schema.arguments]
        assert args == ["x", *kw, "bias", "act_dtype"], (op, args)


@pytest.mark.parametrize("src", [Int4CpuTiles, Int4MmaTiles], ids=lambda t: t.__name__)
@pytest.mark.parametrize("dst", [Int4CpuTiles, Int4MmaTiles], ids=lambda t: t.__name__)
def test_to_converts_between_layouts_exactly(src, dst):
    qw = make_quantized(136, 65, 8, sym=False, act_order=True)
    w = int4_layout.pack(qw, layout=src)
    out = w.to("cpu", layout=dst)
    assert type(out) is dst
    back = int4_layout.unpack(out, 8, False)
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    same = int4_layout.pack(qw, layout=dst)
    for name in ("qweight", "scales", "zeros", "group_starts", "perm"):
        a, b = getattr(out, name), getattr(same, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert w.to("cpu") is not w and type(w.to("cpu")) is src


# --------------------------------------------------------------------------------------------
# Int4Linear: one copy of the weight
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_1024_2048():
    torch.manual_seed(0)
    return nn.Linear(1024, 2048, bias=True)


def _module(lin):
    return Int4Linear.from_linear(lin, group_size=128, sym=False)


def test_one_copy_of_the_weight(linear_1024_2048):
    m = _module(linear_1024_2048)
    x = torch.randn(3, 1024, dtype=torch.float16)
    m(x)  # a forward caches nothing
    w = m.weight_packed
    assert type(w) is Int4CpuTiles
    held = sum(t.numel() * t.element_size() for t in m.buffers())
    expected = w.nbytes + m.bias.numel() * m.bias.element_size()
    assert abs(held - expected) <= 0.05 * expected, (held, expected)
    assert m.nbytes == held
    # The buffers are the weight, not copies of it; none of them is persistent.
    assert w.qweight is m.packed_qweight and w.scales is m.packed_scales
    assert set(m.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert not any(hasattr(m, a) for a in ("qweight", "qzeros", "scales", "g_idx", "_packed"))


def test_state_dict_round_trip_bit_identical(linear_1024_2048):
    m = _module(linear_1024_2048)
    x = torch.randn(5, 1024, dtype=torch.float16)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    m2 = Int4Linear(1024, 2048, True, group_size=128, sym=False)
    m2.load_state_dict(sd)
    assert torch.equal(m2(x), m(x))
    gptq, gptq2 = m.to_gptq("gptq_v2"), m2.to_gptq("gptq_v2")
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        assert gptq[name].dtype == gptq2[name].dtype and torch.equal(gptq[name], gptq2[name])
        assert torch.equal(sd[name], gptq[name]), name
    for name, t in m.named_buffers():
        assert torch.equal(t, dict(m2.named_buffers())[name]), name


def test_dtype_changes_keep_outputs(linear_1024_2048):
    m = _module(linear_1024_2048)
    x = torch.randn(4, 1024)
    y = m(x)
    m.to(torch.float32)
    assert m.dtype == torch.float32 and m.bias.dtype == torch.float32
    torch.testing.assert_close(m(x), y, rtol=2e-5, atol=1e-5)
    m.half()
    assert m.dtype == torch.float16 and m.bias.dtype == torch.float16
    torch.testing.assert_close(m(x), y, rtol=2e-5, atol=1e-5)
    xh = x.half()
    torch.testing.assert_close(m(xh).float(), y, rtol=2e-3, atol=2e-3 * float(y.abs().max()))


def test_in_place_edits_take_effect(linear_1024_2048):
    m = Int4Linear.from_linear(linear_1024_2048, group_size=128, sym=False)
    m.bias.zero_()
    x = torch.randn(2, 1024)
    y = m(x)
    with torch.no_grad():
        m.packed_scales.mul_(2)
    torch.testing.assert_close(m(x), 2 * y, rtol=1e-5, atol=1e-5)
    # ... and the edit is what the state_dict saves.
    assert torch.equal(
        m.quantized().scales.float(), 2 * _module(linear_1024_2048).quantized().scales.float()
    )
