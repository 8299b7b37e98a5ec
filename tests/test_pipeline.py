"""bitpress.pipeline: distill, prune, recover, quantize on a tiny transformers Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_causal_lm import tiny_causal_lm

import bitpress
from bitpress import pipeline
from bitpress.int4 import Int4Linear
from bitpress.sparse24 import Sparse24Int4Linear, Sparse24Linear

transformers = pytest.importorskip("transformers")


def _tiny(layers=4, seed=0):
    return tiny_causal_lm(layers, seed)


def _batches(n=6, seed=1):
    # A learnable sequence: a repeating ramp, so that a few steps lower the loss.
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 64, (n, 4), generator=gen)
    return [(s[:, None] + torch.arange(32)) % 64 for s in starts]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_layer_subset_student_copies_the_kept_layers():
    teacher = _tiny(4)
    student = pipeline.layer_subset_student(teacher)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    t, s = teacher.state_dict(), student.state_dict()
    for i, k in enumerate([0, 2]):
        for name, value in teacher.model.layers[k].state_dict().items():
            assert torch.equal(s[f"model.layers.{i}.{name}"], value)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = _batches(1)[0]
    student(input_ids=ids)  # runs, and with a KV cache
    student.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_layer_subset_student_bad_arguments():
    with pytest.raises(ValueError, match="keep_layers"):
        pipeline.layer_subset_student(_tiny(4), [0, 4])
    with pytest.raises(ValueError, match="keep_layers"):
        pipeline.layer_subset_student(_tiny(4), [1, 1])
    with pytest.raises(TypeError, match="transformers causal LM"):
        pipeline.layer_subset_student(torch.nn.Linear(4, 4))


def test_distill_trains_a_half_depth_student_and_leaves_the_teacher():
    teacher = _tiny(4)
    before = _state(teacher)
    res = pipeline.compress(
        teacher, _batches(), distill=pipeline.DistillConfig(steps=12, lr=3e-3, alpha=0.5)
    )
    assert len(res.model.model.layers) == 2
    losses = res.losses["distill"]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert res.seconds["distill"] > 0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not res.model.training


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_recover_keeps_the_masks_and_learns(method):
    teacher = _tiny(2)
    batches = _batches()
    prune = bitpress.Sparse24Config(method=method, calibration=batches[:2])
    pruned = pipeline.compress(teacher, batches, prune=prune).model
    res = pipeline.compress(
        teacher, batches, prune=prune, recover=pipeline.RecoverConfig(steps=10, lr=3e-3)
    )
    names = [n for n, m in pruned.named_modules() if isinstance(m, Sparse24Linear)]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head kept dense
    changed = 0
    for name in names:
        a = pruned.get_submodule(name).dense_weight()
        b = res.model.get_submodule(name)
        assert isinstance(b, Sparse24Linear)
        b = b.dense_weight()
        assert torch.equal(b[a == 0], torch.zeros_like(b[a == 0]))  # pruned weights stay zero
        changed += int(not torch.equal(a, b))
    assert changed == len(names)  # and the kept weights trained
    losses = res.losses["recover"]
    assert len(losses) == 10 and losses[-1] < losses[0]


def test_distill_prune_recover_quantize_end_to_end():
    teacher = _tiny(4)
    batches = _batches()
    res = pipeline.compress(
        teacher,
        batches,
        distill=pipeline.DistillConfig(steps=4),
        prune=bitpress.Sparse24Config(method="wanda", calibration=batches[:2]),
        recover=pipeline.RecoverConfig(steps=3),
        quantize=bitpress.Int4Config(group_size=32, method="gptq", calibration=batches[:2]),
    )
    kinds = {type(m) for m in res.model.modules()}
    assert Sparse24Int4Linear in kinds and Sparse24Linear not in kinds
    assert len(res.model.model.layers) == 2
    assert set(res.seconds) == {"distill", "prune", "recover", "quantize"}
    out = res.model(input_ids=batches[0]).logits
    assert torch.isfinite(out).all()


def test_quantize_only_copies_the_model():
    teacher = _tiny(2)
    res = pipeline.compress(teacher, [], quantize=bitpress.Int4Config(group_size=32))
    assert any(isinstance(m, Int4Linear) for m in res.model.modules())
    assert not any(isinstance(m, Int4Linear) for m in teacher.modules())


def test_compress_bad_arguments():
    teacher = _tiny(2)
    with pytest.raises(ValueError, match="recover needs prune"):
        pipeline.compress(teacher, _batches(), recover=pipeline.RecoverConfig())
    with pytest.raises(ValueError, match="at least one"):
        pipeline.compress(teacher, _batches())
    with pytest.raises(ValueError, match="batches is empty"):
        pipeline.compress(teacher, [], distill=pipeline.DistillConfig(steps=1))
    dense = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="no Sparse24Linear"):
        pipeline.recover_(dense, teacher, _batches(), pipeline.RecoverConfig(steps=1))
