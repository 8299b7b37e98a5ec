"""bitpress.calibration: the layer-by-layer calibration shared by GPTQ, Wanda and SparseGPT."""

from __future__ import annotations

import torch
from torch import nn

import bitpress
from bitpress.int4 import Int4Linear
from bitpress.sparse24 import Sparse24Linear


class _LinearStack(nn.Module):
    """A decoder-layer list whose layers are bare Linear layers (found by find_layers as
    ``layers``): each is replaced in the list, not attached to itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(64, 64) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_gptq_and_sparsegpt_replace_bare_linear_layers_of_a_layer_list():
    calibration = [
        torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    model = bitpress.quantize_(
        _LinearStack(), bitpress.Int4Config(group_size=32, method="gptq", calibration=calibration)
    )
    assert all(isinstance(m, Int4Linear) for m in model.layers)
    assert torch.isfinite(model(calibration[0])).all()
    pruned = bitpress.sparsify_(
        _LinearStack(), bitpress.Sparse24Config(method="sparsegpt", calibration=calibration)
    )
    assert all(isinstance(m, Sparse24Linear) for m in pruned.layers)
    pruned.train()  # no module is its own child (that recursed forever)
    assert torch.isfinite(pruned(calibration[0])).all()
