"""The drafters and the ragged-row cache on their own: prompt lookup's matches, the layer-skip
view and the INT4 self-draft (shared weights), SlotCache compaction and row selection (same
logits as without), draft distillation, and the ``python -m bitpress generate`` CLI."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from models import hf_greedy, prompts, tiny_model

import bitpress
from bitpress.int4 import Int4Linear
from bitpress.speculative import (
    Int4SelfDrafter,
    LayerSkipDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeGenerator,
    distill_draft,
)
from bitpress.speculative.distill import distill_loss
from bitpress.speculative.drafters import Sampling, SlotCache, filtered_probs, truncated_view


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _greedy(B):
    return Sampling(torch.zeros(B), None, None)


def test_prompt_lookup_most_recent_match_longest_ngram():
    hist = torch.tensor(
        [
            [5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6, 0, 0],  # "5 6": last match at 5 -> 1 2 5 6
            [1, 2, 3, 4, 2, 3, 9, 1, 2, 3, 0, 0, 0],  # "1 2 3" (3-gram) at 0 -> 4 2 3 9
            [7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # "7 7" at 0 -> 7 (one token known)
            [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no match
        ]
    )
    lengths = torch.tensor([11, 10, 3, 4])
    d, n, q = PromptLookupDrafter().propose(hist, lengths, torch.tensor([4, 4, 4, 2]), _greedy(4))
    assert q is None
    assert n.tolist() == [4, 4, 1, 0]
    assert d[0].tolist() == [1, 2, 5, 6]
    assert d[1].tolist() == [4, 2, 3, 9]
    assert d[2, :1].tolist() == [7]


def test_layer_skip_view_shares_weights():
    target = tiny_model("qwen2", layers=3)
    view = truncated_view(target, 1)
    assert view.config.num_hidden_layers == 1 and target.config.num_hidden_layers == 3
    assert len(view.model.layers) == 1 and len(target.model.layers) == 3
    assert view.model.layers[0] is target.model.layers[0]
    assert view.lm_head is target.lm_head and view.model.norm is target.model.norm
    full = truncated_view(target, 3)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(full(input_ids=ids).logits, target(input_ids=ids).logits)
        assert not torch.equal(view(input_ids=ids).logits, target(input_ids=ids).logits)
    gpt = tiny_model("gpt2", layers=3)
    assert len(truncated_view(gpt, 2).transformer.h) == 2
    with pytest.raises(ValueError, match="num_layers"):
        LayerSkipDrafter(target, 4)


def test_int4_self_drafter_shares_embeddings_and_head():
    target = tiny_model("llama")
    dr = Int4SelfDrafter(target)
    m = dr.model
    assert m.get_input_embeddings().weight is target.get_input_embeddings().weight
    assert m.lm_head.weight is target.lm_head.weight
    n_int4 = sum(isinstance(x, Int4Linear) for x in m.modules())
    assert n_int4 == 7 * target.config.num_hidden_layers
    assert not any(isinstance(x, Int4Linear) for x in target.modules())


def test_slot_cache_compaction_and_select_keep_logits():
    """Holes masked, compacted away or rows dropped: the next logits are the same as a plain
    forward over each row's live tokens."""
    model = tiny_model("llama")
    ids, mask = prompts(96, [6, 9, 4], seed=1, repeat=False)
    sc = SlotCache(model)
    sc.reset(3, ids.device)
    with torch.no_grad():
        sc.forward(ids, mask.bool())
        extra = torch.randint(0, 96, (3, 4))
        sc.forward(extra, torch.ones(3, 4, dtype=torch.bool))
        sc.commit(torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool))
        live = [torch.cat([ids[b][mask[b].bool()], extra[b, :k]]) for b, k in enumerate([1, 3, 0])]
        nxt = torch.randint(0, 96, (3, 1))

        def ref(b):
            return model(input_ids=torch.cat([live[b], nxt[b]])[None]).logits[0, -1]

        a = copy.deepcopy(sc)
        la = a.forward(nxt, torch.ones(3, 1, dtype=torch.bool))[:, -1]
        sc.compact()
        assert sc.num_slots == 12  # the longest row: 9 + 3
        lb = sc.forward(nxt, torch.ones(3, 1, dtype=torch.bool))[:, -1]
        for b in range(3):
            torch.testing.assert_close(la[b], ref(b), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lb[b], ref(b), rtol=1e-5, atol=1e-5)
        c = copy.deepcopy(a)
        c.select(torch.tensor([2, 0]))
        nxt2 = torch.randint(0, 96, (2, 1))
        lc = c.forward(nxt2, torch.ones(2, 1, dtype=torch.bool))[:, -1]
        r2 = model(input_ids=torch.cat([live[2], nxt[2], nxt2[0]])[None]).logits[0, -1]
        torch.testing.assert_close(lc[0], r2, rtol=1e-5, atol=1e-5)


def test_filtered_probs():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    s = Sampling(torch.tensor([1.0, 0.0]), torch.tensor([2, 0]), None)
    p = filtered_probs(logits, s)
    assert p[0, 2:].sum() == 0 and abs(float(p[0].sum()) - 1) < 1e-6
    assert p[1].tolist() == [0.0, 0.0, 0.0, 1.0]  # greedy row: one-hot argmax
    s = Sampling(torch.tensor([1.0, 1.0]), None, torch.tensor([0.5, 0.9]))
    p = filtered_probs(logits, s)
    assert (p[0] > 0).sum() == 1 and (p[1] > 0).sum() == 3  # 0.665 + 0.245 + 0.090 >= 0.9


def test_distill_loss_is_scaled_kl():
    t = torch.randn(5, 7)
    assert float(distill_loss(t, t, temperature=3.0)) == pytest.approx(0.0, abs=1e-6)
    d = torch.randn(5, 7)
    kl = (
        torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(d / 2, -1))
    ).sum(-1)
    assert float(distill_loss(d, t, temperature=2.0)) == pytest.approx(float(kl.mean() * 4))
    with pytest.raises(ValueError, match="labels"):
        distill_loss(d, t, alpha=0.5)


def test_distill_draft_raises_acceptance():
    target = tiny_model("llama", vocab=32, hidden=64, layers=3, seed=1, scale=0.2)
    draft = tiny_model("llama", vocab=32, hidden=32, layers=1, seed=2, scale=0.2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 32, (8, 32), generator=g) for _ in range(4)]
    ids, mask = prompts(32, [10, 6, 8], seed=3, repeat=False)

    def alpha():
        gen = SpeculativeGenerator(target, ModelDrafter(draft), num_draft=4)
        return gen.generate(ids, mask, max_new_tokens=24, pad_token_id=0).stats.totals()["alpha"]

    before = alpha()
    losses = distill_draft(draft, target, batches, steps=60, temperature=2.0, alpha=0.9, lr=3e-3)
    after = alpha()
    assert losses[-1] < 0.75 * losses[0]
    assert after > before + 0.05, (before, after)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "bitpress", "generate", *args],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_cli_generate_plain_and_gptq_checkpoint(tmp_path):
    """A byte-level tiny model saved with save_pretrained (no tokenizer: bytes), and its INT4
    GPTQ checkpoint; greedy output equals HF's generate on the same bytes."""
    model = tiny_model("llama", vocab=256, hidden=64, layers=2, scale=0.1)
    model.save_pretrained(tmp_path / "plain")
    prompt = "def f(x):\n    return x"
    ids = torch.tensor([list(prompt.encode())])
    ref = hf_greedy(model, ids, torch.ones_like(ids), 12)[0, ids.shape[1] :].tolist()
    res = _cli("--model", str(tmp_path / "plain"), "--draft", "layer-skip:1", "--prompt", prompt,
               "--max-new-tokens", "12")  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = bytes(ref).decode("utf-8", errors="replace")
    assert res.stdout.startswith(prompt + text)
    assert "tokens/s" in res.stdout and "accepted" in res.stdout

    q = bitpress.quantize_(copy.deepcopy(model), bitpress.Int4Config(group_size=32))
    bitpress.save_pretrained(q, tmp_path / "gptq")
    res = _cli("--model", str(tmp_path / "gptq"), "--draft", str(tmp_path / "plain"), "--prompt",
               prompt, "--max-new-tokens", "8", "--sample", "--temperature", "0.8",
               "--top-p", "0.9", "--seed", "3")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(prompt)
    again = _cli("--model", str(tmp_path / "gptq"), "--draft", str(tmp_path / "plain"),
                 "--prompt", prompt, "--max-new-tokens", "8", "--sample", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "3")  # fmt: skip
    assert again.stdout.split("[")[0] == res.stdout.split("[")[0]  # seeded: same text
