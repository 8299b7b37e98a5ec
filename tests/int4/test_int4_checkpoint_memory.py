"""Loading at scale (issue 15, items 18-19): ``bitpress.from_pretrained`` reads the safetensors
files lazily (mmap) and materializes only what the quantized model keeps, so the peak growth of
the process's anonymous memory stays within 1.3x the checkpoint's size; the weights are packed
into the kernel layout at load, so the first forward is not the slow one.

The load runs in a fresh subprocess (earlier allocations of the test process would mask its
peak) while this process samples the child's ``RssAnon`` from /proc (pages of the mmap'd
checkpoint files are file pages, RssFile, and do not count; VmHWM would count them).

Run as a script for the Llama-shape measurement of bench/NOTES_loading.md (not in CI)::

    python tests/int4/test_int4_checkpoint_memory.py llama [DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers") if __name__ != "__main__" else None
if __name__ != "__main__":
    pytest.importorskip("safetensors")

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs /proc (RssAnon)"
)

# The test's model: Llama-like proportions (quantized layers ~60% of the bytes, as in a 1B
# Llama), ~80 MB on disk, built and loaded in well under a minute on two cores.
SMALL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=8000,
)
# The shape of the issue: hidden 2048, 16 layers, vocab 32000 (~0.66 GB on disk).
LLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)


def build_checkpoint(path: Path, shape: dict, max_shard_size: str | None = None) -> int:
    """A random symmetric GPTQ checkpoint (group 128, float16) of a Llama of ``shape``, written by
    ``bitpress.save_pretrained``; returns its size in bytes (safetensors files)."""
    import transformers

    import bitpress
    from bitpress.int4 import Int4Linear
    from bitpress.int4.quantized import QuantizedWeight

    cfg = transformers.LlamaConfig(
        **shape, max_position_embeddings=256, tie_word_embeddings=False, torch_dtype="float16"
    )
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            K, N = m.in_features, m.out_features
            qw = QuantizedWeight(
                q=torch.randint(0, 16, (K, N), dtype=torch.uint8, generator=g),
                scales=(torch.rand(-(-K // 128), N, generator=g) * 0.02 + 0.001).half(),
                zeros=torch.full((-(-K // 128), N), 8, dtype=torch.uint8),
                g_idx=(torch.arange(K) // 128).to(torch.int32),
                group_size=128,
                sym=True,
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int4Linear.from_quantized(qw))
    model.to_empty(device="cpu").half()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() == 2 else 1.0))
    bitpress.save_pretrained(model, path, max_shard_size=max_shard_size)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# The child: imports first (interpreter, torch, transformers, bitpress are the baseline), then,
# on "go", loads and runs two forwards.
_CHILD = r"""
import json, sys, time
import torch, transformers, bitpress
import transformers.models.llama.modeling_llama  # imported by from_config: part of the baseline
torch.set_num_threads(2)
# (progress= is tested for so that the script can measure versions without it)
kw = {"progress": False} if "progress" in bitpress.from_pretrained.__kwdefaults__ else {}
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
model = bitpress.from_pretrained(sys.argv[1], dtype=torch.float16, **kw)
load_s = time.perf_counter() - t0
print("loaded", flush=True)
sys.stdin.readline()
ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    for _ in range(3):
        t0 = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - t0)
print(json.dumps({"load_s": load_s, "forward_s": times}), flush=True)
"""


def _rss_anon(pid: int) -> int:
    """RssAnon of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/<pid>/status")


def measure_load(path: Path) -> dict:
    """Load ``path`` in a fresh process: peak RssAnon growth during ``from_pretrained`` (bytes,
    sampled every ~1 ms from this process), load time and the times of three forwards."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        base = _rss_anon(proc.pid)
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], _rss_anon(proc.pid))
                except (OSError, RuntimeError):
                    return
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline().strip()
        stop.set()
        sampler.join()
        assert line == "loaded", f"child failed: {line!r}"
        after = _rss_anon(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return {**result, "base": base, "peak_growth": peak[0] - base, "kept": after - base}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("ckpt")
    return path, build_checkpoint(path, SMALL, max_shard_size="30MB")


def test_load_peak_anonymous_memory_and_first_forward(small_checkpoint):
    path, size = small_checkpoint
    assert len(list(path.glob("*.safetensors"))) > 1  # sharded: every shard is read lazily
    r = measure_load(path)
    growth = r["peak_growth"] / size
    # Item 18: what the quantized model keeps is ~1x the checkpoint (int4 words as stored, float32
    # scales, float16 embeddings); the transients of one layer at a time fit in the rest.
    assert growth <= 1.3, (
        f"peak RssAnon growth {r['peak_growth'] / 1e6:.0f} MB = {growth:.2f}x the checkpoint "
        f"({size / 1e6:.0f} MB), kept {r['kept'] / 1e6:.0f} MB"
    )
    # Item 19: packed at load, the first forward is not the slow one. A repack of this model's
    # ~100 M weights at the first forward would cost seconds; the first forward's one-time costs
    # (first touch of the per-thread workspaces, oneDNN's primitive for the fp16 lm_head) measured
    # up to ~0.15 s on a loaded 2-core machine, hence the 0.25 s allowance.
    first, second, third = r["forward_s"]
    assert first <= 3 * min(second, third) + 0.25, r["forward_s"]


def test_no_view_of_the_files_survives_loading(small_checkpoint):
    """Plain parameters are copies (in anonymous memory), not views of the mmap'd files: once
    loaded, no checkpoint file is mapped any more (it may be deleted or rewritten)."""
    import gc

    import bitpress

    path, _ = small_checkpoint
    model = bitpress.from_pretrained(path, dtype=torch.float16, progress=False)
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert str(path.resolve()) not in maps
    assert model.model.embed_tokens.weight.dtype == torch.float16


@pytest.mark.parametrize("layout", ["cpu", "mma"])
@pytest.mark.parametrize("K, N, group_size, sym, act_order", [
    (256, 200, 32, True, False),
    (136, 65, 24, False, False),  # groups not in whole octets: padding rows
    (256, 7, -1, False, False),
    (256, 130, 32, False, True),
    (128, 64, 8, True, True),
])  # fmt: skip
def test_packing_from_gptq_words_is_layout_pack(layout, K, N, group_size, sym, act_order):
    """The loader's repack (GPTQ words straight to the kernel layout, a block at a time) and the
    state_dict's way back are bit for bit those of bitpress.int4.layout (pack / unpack)."""
    from bitpress.int4 import format_gptq
    from bitpress.int4 import layout as int4_layout
    from bitpress.int4.format_gptq import quantized_to_gptq
    from bitpress.int4.layout import LAYOUTS, Int4Layout, pack, unpack
    from bitpress.int4.quantized import QuantizedWeight

    g = torch.Generator().manual_seed(K + N)
    G = 1 if group_size == -1 else -(-K // group_size)
    g_idx = (torch.arange(K) // (K if group_size == -1 else group_size)).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    qw = QuantizedWeight(
        q=torch.randint(0, 16, (K, N), dtype=torch.uint8, generator=g),
        scales=torch.randn(G, N, generator=g).half(),
        zeros=torch.full((G, N), 8, dtype=torch.uint8)
        if sym
        else torch.randint(0, 16, (G, N), dtype=torch.uint8, generator=g),
        g_idx=g_idx,
        group_size=group_size,
        sym=sym,
    )
    lay = LAYOUTS[Int4Layout.CPU_TILES if layout == "cpu" else Int4Layout.MMA_TILES]
    want = pack(qw, lay)
    old = int4_layout.CHUNK_WORDS
    int4_layout.CHUNK_WORDS = 64  # many blocks, partial ones included
    try:
        got = int4_layout.pack_fast(qw, lay)
        for fmt in ("gptq", "gptq_v2"):
            back = format_gptq.packed_to_gptq(want, group_size, sym, fmt)
            ref = quantized_to_gptq(unpack(want, group_size, sym), fmt)
            for k in ref:
                assert back[k].dtype == ref[k].dtype and torch.equal(back[k], ref[k]), (fmt, k)
    finally:
        int4_layout.CHUNK_WORDS = old
    assert type(got) is type(want) and got.scale_dtype == want.scale_dtype
    for name in want.TENSORS:
        a, b = getattr(want, name), getattr(got, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name


def test_progress_bar(tmp_path, capfd):
    """progress=True draws a bar on stderr; False and the default off a terminal do not."""
    import bitpress

    shape = dict(SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=1, vocab_size=64)
    shape.update(num_attention_heads=4, num_key_value_heads=2)
    build_checkpoint(tmp_path, shape)
    capfd.readouterr()
    bitpress.from_pretrained(tmp_path, progress=True)
    assert "bitpress: loading" in capfd.readouterr().err
    bitpress.from_pretrained(tmp_path, progress=False)
    bitpress.from_pretrained(tmp_path)  # stderr is captured: not a terminal
    assert "bitpress: loading" not in capfd.readouterr().err


def _main(argv: list[str]) -> None:
    import tempfile

    if not argv or argv[0] not in ("llama", "small"):
        sys.exit(__doc__)
    shape = LLAMA if argv[0] == "llama" else SMALL
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(argv[1]) if len(argv) > 1 else Path(tmp)
        if (path / "config.json").exists():
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        else:
            t0 = time.perf_counter()
            size = build_checkpoint(path, shape)
            print(f"built in {time.perf_counter() - t0:.1f} s")
        r = measure_load(path)
    gb = size / 1e9
    print(
        f"checkpoint {gb:.3f} GB | load {r['load_s']:.2f} s = {r['load_s'] / gb:.2f} s/GB | "
        f"peak RssAnon growth {r['peak_growth'] / 1e9:.3f} GB = {r['peak_growth'] / size:.2f}x | "
        f"kept {r['kept'] / 1e9:.3f} GB = {r['kept'] / size:.2f}x | forwards (s) "
        + " / ".join(f"{t:.3f}" for t in r["forward_s"])
    )


if __name__ == "__main__":
    _main(sys.argv[1:])
