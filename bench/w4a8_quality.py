"""W4A8 quality on the demo model (python/bitpress/demo.py, its cached trained weights): per-layer
output SQNR of W4A8 against the exact-activation INT4 path (same weights, same inputs: the
unquantized model's own layer inputs), both against the unquantized layer, and held-out
perplexity. Usage: python bench/w4a8_quality.py [demo cache dir]."""

from __future__ import annotations

import copy
import sys

import torch

import bitpress
from bitpress import demo
from bitpress.int4.modules import Int4Linear
from bitpress.testing import sqnr_db


def set_act(model, act):
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.act_dtype = act


@torch.no_grad()
def main():
    if len(sys.argv) > 1:
        demo.CACHE = sys.argv[1]
    torch.set_num_threads(2)
    train = torch.frombuffer(bytearray(demo._text(demo.TRAIN_MODULES)), dtype=torch.uint8).long()
    held = torch.frombuffer(bytearray(demo._text(demo.HELD_OUT_MODULES)), dtype=torch.uint8).long()
    model = demo.trained_model(train, 300)
    ids = held[: 8 * demo.SEQ].reshape(8, demo.SEQ)
    gen = torch.Generator().manual_seed(2)
    calibration = demo._batches(train, 8, 8, gen)
    cfgs = {
        "RTN": bitpress.Int4Config(group_size=64, sym=True),
        "GPTQ": bitpress.Int4Config(
            group_size=64, sym=True, method="gptq", act_order=True, calibration=calibration
        ),
    }
    quick = len(sys.argv) > 2 and sys.argv[2] == "quick"  # RTN, float32 only
    if quick:
        cfgs.pop("GPTQ")
    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
        ref = copy.deepcopy(model).to(dtype)
        print(f"\n## demo model in {dtype}")
        print(f"perplexity unquantized: {demo.perplexity(ref, held):.3f}")
        for qname, cfg in cfgs.items():
            q = bitpress.quantize_(copy.deepcopy(model), cfg).to(dtype)
            inputs = {}
            hooks = [
                m.register_forward_hook(lambda mod, a, o, n=n, d=inputs: d.__setitem__(n, a[0]))
                for n, m in ref.named_modules()
                if isinstance(m, torch.nn.Linear)
            ]
            ref(input_ids=ids)
            for h in hooks:
                h.remove()
            print(f"\n### {qname} (group 64, symmetric), {dtype}")
            print(
                "| layer | W4A8 vs exact INT4 (dB) | exact INT4 vs unquantized | W4A8 vs unquant. |"
            )
            print("|---|---|---|---|")
            rows = []
            for name, m in q.named_modules():
                if not isinstance(m, Int4Linear):
                    continue
                x = inputs[name]
                r = ref.get_submodule(name)(x).float()
                m.act_dtype = None
                e = m(x).float()
                m.act_dtype = torch.int8
                a = m(x).float()
                m.act_dtype = None
                rows.append((sqnr_db(e, a), sqnr_db(r, e), sqnr_db(r, a)))
                print(f"| {name} | {rows[-1][0]:.2f} | {rows[-1][1]:.2f} | {rows[-1][2]:.2f} |")
            mean = [sum(c) / len(c) for c in zip(*rows, strict=True)]
            print(f"| mean | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} |")
            set_act(q, None)
            p_exact = demo.perplexity(q, held)
            set_act(q, torch.int8)
            p_w4a8 = demo.perplexity(q, held)
            print(f"\nperplexity {qname}: exact activations {p_exact:.3f}, W4A8 {p_w4a8:.3f}")


if __name__ == "__main__":
    main()
