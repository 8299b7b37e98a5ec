"""``python -m bitpress info | selftest | demo | generate``."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys

import torch

import bitpress
from bitpress import demo as demo_mod
from bitpress import selftest
from bitpress.speculative import generator as spec_generator
from bitpress.sysinfo import info_lines


def info() -> int:
    lines = info_lines()
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    return 0


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _is_quantized_checkpoint(path: str) -> bool:
    if os.path.exists(os.path.join(path, "quantize_config.json")):
        return True
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg) as f:
        return "quantization_config" in json.load(f)


def _load_model(path: str):
    """A bitpress/GPTQ checkpoint (``bitpress.from_pretrained``) or a plain transformers model
    directory (``AutoModelForCausalLM.from_pretrained``), float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    if _is_quantized_checkpoint(path):
        return bitpress.from_pretrained(path, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class _ByteTokenizer:
    """The demo model's vocabulary: one token per byte (UTF-8)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def streamer(self):
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids: dec.decode(bytes(i & 0xFF for i in ids))


class _HFTokenizer:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def streamer(self):
        seen: list[int] = []
        printed = [0]

        def push(ids):  # decode everything so far and print the new suffix (multi-token chars)
            seen.extend(ids)
            text = self.tok.decode(seen, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                return ""
            out, printed[0] = text[printed[0] :], len(text)
            return out

        return push


def _tokenizer(path: str):
    if any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return _HFTokenizer(AutoTokenizer.from_pretrained(path))
    return _ByteTokenizer()


class _PrintStreamer:
    """transformers' streamer protocol (put / end): prints the text as it is produced."""

    def __init__(self, push, out=sys.stdout):
        self.push, self.out, self.prompt_done = push, out, False

    def put(self, value):
        if not self.prompt_done:  # the first put is the prompt
            self.prompt_done = True
            return
        self.out.write(self.push(value.reshape(-1).tolist()))
        self.out.flush()

    def end(self):
        self.out.write("\n")
        self.out.flush()


def generate_cmd(args) -> int:
    model = _load_model(args.model)
    tok = _tokenizer(args.model)
    draft = args.draft
    if draft not in ("prompt-lookup", "self-int4") and not draft.startswith("layer-skip:"):
        draft = _load_model(draft)
    ids = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    if ids.numel() == 0:
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    print(args.prompt, end="", flush=True)
    out = spec_generator.generate(
        model,
        ids,
        draft=draft,
        num_draft=args.num_draft,
        adaptive=args.adaptive,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        streamer=_PrintStreamer(tok.streamer()),
    )
    print(f"[{out.stats.summary()}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitpress")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, CPU features, CUDA archs, available backends")
    sub.add_parser("selftest", help="every op on every available backend against the reference")
    demo = sub.add_parser(
        "demo", help="the compression report: every method's size, quality and speed, measured here"
    )
    demo.add_argument("--fast", action="store_true", help="a smaller report in under 2 minutes")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--out", default=demo_mod.OUT, help="report folder (default build/report)")
    demo.add_argument("--cache", default=demo_mod.CACHE, help="trained models (default build/demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps of the model")
    gen = sub.add_parser("generate", help="speculative generation with a transformers model")
    gen.add_argument("--model", required=True, help="transformers or bitpress/GPTQ model dir")
    gen.add_argument(
        "--draft",
        default="prompt-lookup",
        help="a draft model dir, prompt-lookup, self-int4 or layer-skip:L (default prompt-lookup)",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--num-draft", type=int, default=4, help="K, draft tokens per step")
    gen.add_argument("--adaptive", action="store_true", help="adapt K to the acceptance")
    gen.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "generate":
        return generate_cmd(args)
    if args.cmd == "info":
        return info()
    if args.cmd == "demo":
        return demo_mod.main(args.steps, args.fast, args.quiet, args.out, args.cache)
    return selftest.main()


if __name__ == "__main__":
    sys.exit(main())
