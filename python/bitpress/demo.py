"""``python -m bitpress demo``: INT4 quantization of a small Llama model, end to end.

No downloads: the model is a Llama-architecture transformers model with a byte-level vocabulary
(256 tokens), trained here for a minute on the source text of Python's standard library (which
every Python installation carries) and cached under ``build/demo/``. Held-out text: other
standard-library modules. The demo then quantizes it with RTN and with GPTQ (calibrated on the
training text) and prints size, per-layer output SQNR, next-token agreement and perplexity
against the unquantized model, and the decode-step time of each model on this device.
"""

from __future__ import annotations

import copy
import math
import os
import sysconfig
import time

import torch
from torch import nn

import bitpress
from bitpress.int4 import Int4Linear
from bitpress.testing import sqnr_db

TRAIN_MODULES = [
    "argparse",
    "textwrap",
    "difflib",
    "inspect",
    "pydoc",
    "typing",
    "dataclasses",
    "functools",
    "logging/__init__",
    "json/decoder",
    "json/encoder",
    "csv",
]
HELD_OUT_MODULES = ["shutil", "fractions", "calendar"]
SEQ = 128
CACHE = os.path.join("build", "demo")


def _text(modules: list[str]) -> bytes:
    root = sysconfig.get_paths()["stdlib"]
    return b"\n".join(open(os.path.join(root, m + ".py"), "rb").read() for m in modules)


def _batches(data: torch.Tensor, n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    starts = torch.randint(0, data.numel() - SEQ - 1, (n, batch), generator=gen)
    return [torch.stack([data[s : s + SEQ] for s in row]) for row in starts]


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def trained_model(train: torch.Tensor, steps: int = 300, log=print):
    path = os.path.join(CACHE, f"llama-bytes-{steps}.pt")
    model = build_model()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"loaded the trained demo model from {path}")
        return model.eval()
    log(
        f"training the demo model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        f"parameters, {steps} steps on {train.numel() / 1e3:.0f} kB of text; cached afterwards)"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    t0 = time.time()
    model.train()
    for step, ids in enumerate(_batches(train, steps, 16, gen)):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def perplexity(model, data: torch.Tensor) -> float:
    n = (data.numel() - 1) // SEQ
    ids = data[: n * SEQ].reshape(n, SEQ)
    nll = 0.0
    for i in range(0, n, 16):
        nll += model(input_ids=ids[i : i + 16], labels=ids[i : i + 16]).loss.item() * len(
            ids[i : i + 16]
        )
    return math.exp(nll / n)


@torch.no_grad()
def next_token_agreement(model, ref, data: torch.Tensor) -> float:
    ids = data[: 32 * SEQ].reshape(32, SEQ)
    a = model(input_ids=ids).logits.argmax(-1)
    b = ref(input_ids=ids).logits.argmax(-1)
    return (a == b).float().mean().item()


@torch.no_grad()
def layer_sqnr(model_q, model_ref, ids: torch.Tensor) -> dict[str, float]:
    """Output SQNR of every quantized Linear: its output on the reference model's own inputs."""

    inputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0]))
        for n, m in model_ref.named_modules()
        if isinstance(m, nn.Linear)
    ]
    model_ref(input_ids=ids)
    for h in hooks:
        h.remove()
    out = {}
    for name, m in model_q.named_modules():
        if isinstance(m, Int4Linear):
            ref = model_ref.get_submodule(name)
            out[name] = sqnr_db(ref(inputs[name]), m(inputs[name]))
    return out


def state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def decode_ms(model, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """Milliseconds per generated token (greedy, KV cache, batch 1), best of 3."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(prompt, **kw)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        model.generate(prompt, **kw)
        best = min(best, time.perf_counter() - t0)
    return best / new_tokens * 1e3


def main(steps: int = 300) -> int:

    torch.set_num_threads(os.cpu_count() or 1)
    train = torch.frombuffer(bytearray(_text(TRAIN_MODULES)), dtype=torch.uint8).long()
    held = torch.frombuffer(bytearray(_text(HELD_OUT_MODULES)), dtype=torch.uint8).long()
    model = trained_model(train, steps)
    gen = torch.Generator().manual_seed(2)
    calibration = _batches(train, 8, 8, gen)

    t0 = time.time()
    rtn = bitpress.quantize_(copy.deepcopy(model), bitpress.Int4Config(group_size=64, sym=True))
    t_rtn = time.time() - t0
    t0 = time.time()
    gptq = bitpress.quantize_(
        copy.deepcopy(model),
        bitpress.Int4Config(
            group_size=64, sym=True, method="gptq", act_order=True, calibration=calibration
        ),
    )
    t_gptq = time.time() - t0
    n_int4 = sum(isinstance(m, Int4Linear) for m in gptq.modules())

    print(
        f"\nbitpress demo — Llama-architecture model, {n_int4} Linear layers -> Int4Linear "
        f"(group 64, symmetric; lm_head kept), device: cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"quantization time: RTN {t_rtn:.1f} s, GPTQ {t_gptq:.1f} s "
        f"({len(calibration)} x {calibration[0].shape[0]} x {SEQ} calibration tokens)\n"
    )

    ids = held[: 8 * SEQ].reshape(8, SEQ)
    s_rtn, s_gptq = layer_sqnr(rtn, model, ids), layer_sqnr(gptq, model, ids)
    print("per-layer output SQNR on held-out text (dB)")
    print(f"  {'layer':36s} {'RTN':>7s} {'GPTQ':>7s}")
    for name in s_rtn:
        print(f"  {name:36s} {s_rtn[name]:7.2f} {s_gptq[name]:7.2f}")
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    print(f"  {'mean':36s} {mean(s_rtn):7.2f} {mean(s_gptq):7.2f}\n")

    rows = [("unquantized (fp32)", model), ("INT4 RTN", rtn), ("INT4 GPTQ", gptq)]
    ppl = {name: perplexity(m, held) for name, m in rows}
    agree = {name: next_token_agreement(m, model, held) for name, m in rows}
    prompt = held[:64].reshape(1, 64)
    speed = {}
    for name, m in rows:
        m16 = copy.deepcopy(m).to(torch.bfloat16)
        speed[name] = decode_ms(m16, prompt)
    print(
        f"  {'model':20s} {'state size':>12s} {'perplexity':>11s} {'next-token':>11s} "
        f"{'decode ms/token (bf16)':>23s}"
    )
    for name, m in rows:
        print(
            f"  {name:20s} {state_bytes(m) / 2**20:9.2f} MiB {ppl[name]:11.3f} "
            f"{agree[name]:10.1%} {speed[name]:23.2f}"
        )
    print(
        f"\n(perplexity: bytes of held-out stdlib text ({held.numel() / 1e3:.0f} kB); "
        "next-token: argmax agreement with the unquantized model; a model this small is "
        "dominated by per-call overhead in decode, see bench/ for the kernel itself)"
    )
    return 0
