"""``python -m bitpress demo``: the compression report, measured on one model on this machine.

No downloads. The quality model is a Llama-architecture transformers model with a byte-level
vocabulary (256 tokens), trained here on the source text of Python's standard library (which every
Python installation carries) and cached under ``build/demo/``; held-out text: other
standard-library modules. Each method of the report compresses it (FP8, INT4 RTN / GPTQ / W4A8,
2:4 magnitude / Wanda / SparseGPT / + recovery / + INT4, a distilled half-depth student and that
student with GPTQ) and is measured for weight bytes, held-out perplexity and next-token agreement
with the fp32 model.

Speed is measured on another model: random weights with Llama-3-8B's layer shapes (hidden 4096,
MLP 14336, 32 heads, 8 KV heads), a few decoder layers and the byte vocabulary, compressed the same
way; decode (ms per token, batch 1) and prefill (one prompt) with cold weights, each against bf16
in the same run. Speculative generation: tokens/s and mean accepted length of each drafter on the
quality model against plain greedy generation.

Results: a markdown table on stdout, CSV / JSON / PNG / HTML under ``build/report/``
(:mod:`bitpress.report.render`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import os
import sysconfig
import time

import torch
from torch import nn

import bitpress
from bitpress import pipeline
from bitpress._core.progress import progress, set_quiet
from bitpress.int4 import Int4Linear
from bitpress.report import measure, render
from bitpress.sysinfo import info_lines

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
OUT = os.path.join("build", "report")
GROUP = 128  # INT4 group size of every INT4 row (quality and speed models alike)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much the demo trains and measures; ``FULL`` is the report, ``FAST`` the CI run."""

    steps: int = 300  # training steps of the quality model (batch 16 x 128 bytes)
    distill_steps: int = 300  # knowledge distillation of the half-depth student
    recover_steps: int = 100  # fine-tune after SparseGPT, masks fixed
    calibration: tuple[int, int] = (8, 8)  # batches x rows of 128 bytes (GPTQ, Wanda, SparseGPT)
    eval_rows: int = 256  # held-out rows of 128 bytes for perplexity and agreement
    speed_layers: int = 2  # decoder layers of the speed model
    # (hidden, MLP, heads, KV heads) of the speed model: Llama-3-8B's layer shapes
    speed_shape: tuple[int, int, int, int] = (4096, 14336, 32, 8)
    prompt_len: int = 128  # prefill length
    decode_tokens: int = 8  # timed decode steps per repeat
    repeats: int = 3
    spec_prompts: int = 4
    spec_new_tokens: int = 96


FULL = Settings()
FAST = Settings(
    steps=40,
    distill_steps=20,
    recover_steps=10,
    calibration=(2, 4),
    eval_rows=32,
    speed_layers=2,
    speed_shape=(1024, 3584, 8, 2),  # Llama-3-8B's shapes / 4: the CI run, not a measurement
    prompt_len=32,
    decode_tokens=3,
    repeats=2,
    spec_prompts=2,
    spec_new_tokens=32,
)


def _text(modules: list[str]) -> bytes:
    root = sysconfig.get_paths()["stdlib"]
    return b"\n".join(open(os.path.join(root, m + ".py"), "rb").read() for m in modules)


def _ids(modules: list[str]) -> torch.Tensor:
    return torch.frombuffer(bytearray(_text(modules)), dtype=torch.uint8).long()


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


def _train(model: nn.Module, batches: list[torch.Tensor], lr: float, desc: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(batches))
    model.train()
    losses = []
    with progress(batches, desc=desc, unit="step") as bar:
        for ids in bar:
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def trained_model(train: torch.Tensor, steps: int = 300, log=print, cache: str | None = None):
    """The demo's quality model, trained for ``steps`` AdamW steps (cached under ``cache``,
    default CACHE)."""
    cache = cache or CACHE
    path = os.path.join(cache, f"llama-bytes-{steps}.pt")
    model = build_model()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"loaded the trained demo model from {path}")
        return model.eval()
    log(
        f"training the demo model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        f"parameters, {steps} steps on {train.numel() / 1e3:.0f} kB of text; cached afterwards)"
    )
    gen = torch.Generator().manual_seed(1)
    _train(model, _batches(train, steps, 16, gen), 2e-3, "train")
    os.makedirs(cache, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def perplexity(model, data: torch.Tensor) -> float:
    n = (data.numel() - 1) // SEQ
    return measure.quality(model, data[: n * SEQ].reshape(n, SEQ)).perplexity


# ------------------------------------------------------------------------------------------------
# The trained models: the quality model, its distilled student, its recovered 2:4 version
# ------------------------------------------------------------------------------------------------


def student_model(teacher, train_batches, s: Settings, log, cache) -> tuple[nn.Module, float]:
    path = os.path.join(cache, f"student-{s.steps}-{s.distill_steps}.pt")
    if os.path.exists(path):
        student = pipeline.layer_subset_student(teacher)
        student.load_state_dict(torch.load(path, weights_only=True))
        log(f"loaded the distilled student from {path}")
        return student.eval(), 0.0
    cfg = pipeline.DistillConfig(steps=s.distill_steps)
    res = pipeline.compress(teacher, train_batches, distill=cfg)
    torch.save(res.model.state_dict(), path)
    return res.model, res.seconds["distill"]


def recovered_model(teacher, train_batches, calibration, s: Settings, log, cache):
    """2:4 SparseGPT + the recovery fine-tune (cached as dense 2:4 weights)."""
    path = os.path.join(cache, f"sparsegpt-recovered-{s.steps}-{s.recover_steps}.pt")
    if os.path.exists(path):
        model = build_model()
        model.load_state_dict(torch.load(path, weights_only=True))
        # The cached weights carry the 2:4 pattern: magnitude pruning keeps exactly them.
        bitpress.sparsify_(model, bitpress.Sparse24Config(method="magnitude"))
        log(f"loaded the recovered 2:4 model from {path}")
        return model.eval(), 0.0
    res = pipeline.compress(
        teacher,
        train_batches,
        prune=bitpress.Sparse24Config(method="sparsegpt", calibration=calibration),
        recover=pipeline.RecoverConfig(steps=s.recover_steps),
    )
    dense = copy.deepcopy(res.model)
    pipeline.densify_24(dense)  # cached as dense 2:4 weights: a plain Llama state_dict
    torch.save(dense.state_dict(), path)
    return res.model, res.seconds["prune"] + res.seconds["recover"]


# ------------------------------------------------------------------------------------------------
# The methods
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    name: str
    family: str
    speed: str  # key of the speed variant that runs the same kernels
    build: object  # () -> model (fp32 in, compressed; cast to bf16 by the caller unless fp32)
    note: str = ""


def _copy(model):
    return copy.deepcopy(model)


def methods(model, student, recovered, calibration) -> list[Method]:
    int4 = dict(group_size=GROUP, sym=True)
    gptq = dict(method="gptq", calibration=calibration, act_order=True, static_groups=True, **int4)
    q = bitpress.quantize_
    sp = bitpress.sparsify_
    memo = {}  # INT4 GPTQ, reused by W4A8 (the same weights, int8 activations)
    return [
        Method("fp32", "baseline", "fp32", lambda: model),
        Method("bf16", "baseline", "bf16", lambda: _copy(model)),
        Method(
            "FP8 weight-only",
            "fp8",
            "fp8-w",
            lambda: q(_copy(model), bitpress.Fp8Config(activations=None)),
            "E4M3, per-channel scales",
        ),
        Method(
            "FP8 W8A8 dynamic",
            "fp8",
            "fp8-w8a8",
            lambda: q(_copy(model), bitpress.Fp8Config()),
            "x per token at run time",
        ),
        Method(
            "INT4 RTN",
            "int4",
            "int4",
            lambda: q(_copy(model), bitpress.Int4Config(**int4)),
            f"group {GROUP}, symmetric",
        ),
        Method(
            "INT4 GPTQ",
            "int4",
            "int4",
            lambda: memo.setdefault("gptq", q(_copy(model), bitpress.Int4Config(**gptq))),
            "act-order, static groups",
        ),
        Method(
            "INT4 GPTQ, W4A8",
            "int4",
            "int4-w4a8",
            lambda: _set(_copy(memo["gptq"]), Int4Linear, act_dtype=torch.int8),
            "the GPTQ weights, x as int8 per token",
        ),
        Method(
            "2:4 magnitude",
            "sparse24",
            "sparse24",
            lambda: sp(_copy(model), bitpress.Sparse24Config(method="magnitude")),
        ),
        Method(
            "2:4 Wanda",
            "sparse24",
            "sparse24",
            lambda: sp(_copy(model), bitpress.Sparse24Config("wanda", calibration)),
        ),
        Method(
            "2:4 SparseGPT",
            "sparse24",
            "sparse24",
            lambda: sp(_copy(model), bitpress.Sparse24Config("sparsegpt", calibration)),
        ),
        Method(
            "2:4 SparseGPT + recovery",
            "sparse24",
            "sparse24",
            lambda: _copy(recovered),
            "fine-tune with fixed masks",
        ),
        Method(
            "2:4 + INT4 GPTQ",
            "sparse24",
            "sparse24-int4",
            lambda: q(
                _copy(recovered),
                bitpress.Int4Config(method="gptq", calibration=calibration, **int4),
            ),
            "the recovered 2:4 model",
        ),
        Method(
            "distilled student (1/2 depth)",
            "distill",
            "student",
            lambda: _copy(student),
            "KD from the fp32 model",
        ),
        Method(
            "student + INT4 GPTQ",
            "distill",
            "student-int4",
            lambda: q(_copy(student), bitpress.Int4Config(**gptq)),
            "distill, then quantize",
        ),
    ]


# ------------------------------------------------------------------------------------------------
# Speed: random weights with Llama-3-8B layer shapes
# ------------------------------------------------------------------------------------------------


def speed_config(layers: int, shape: tuple[int, int, int, int] = FULL.speed_shape):
    from transformers import LlamaConfig

    hidden, mlp, heads, kv_heads = shape
    return LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def speed_model(layers: int, shape=FULL.speed_shape, seed: int = 0) -> nn.Module:
    """Random bf16 weights (normal, std 0.02, Llama's initialiser) in the layer shapes ``shape``
    (hidden, MLP, heads, KV heads; default Llama-3-8B's)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(speed_config(layers, shape))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        model.model.rotary_emb.__init__(model.config)  # buffers of a meta-built rotary embedding
    return model.eval()


def _set(model: nn.Module, cls: type, **attrs) -> nn.Module:
    """Set attributes on every ``cls`` module (a mode switch: the same weights run another path)."""
    for m in model.modules():
        if isinstance(m, cls):
            for k, v in attrs.items():
                setattr(m, k, v)
    return model


@contextlib.contextmanager
def _every_other_layer(model: nn.Module):
    """The model with decoder layers 0, 2, 4, ... only (the student's depth), the same modules."""
    layers = model.model.layers
    n = model.config.num_hidden_layers
    kept = nn.ModuleList(layers[::2])
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    model.model.layers, model.config.num_hidden_layers = kept, len(kept)
    try:
        yield model
    finally:
        for i, layer in enumerate(layers):
            layer.self_attn.layer_idx = i
        model.model.layers, model.config.num_hidden_layers = layers, n


def speed_device() -> torch.device:
    """Where the speed model runs: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_speed(s: Settings, device: torch.device) -> dict[str, measure.Speed | str]:
    """Decode / prefill of every kernel family on the Llama-3-8B-shaped model on ``device``:
    each compressed model is built once (on the CPU, then moved: ``.to`` repacks for the
    device) and switched between modes that share its weights (FP8 weight-only and W8A8, INT4
    exact and W4A8, the student's depth as a view of every other layer). A variant the device
    cannot run gets the error's first line instead of a Speed."""
    flush = measure.CacheFlusher(device=device)
    int4 = bitpress.Int4Config(group_size=GROUP, sym=True)
    out = {}
    with progress(total=10, desc="speed", unit="model") as bar:

        def time_it(key, model):
            try:
                out[key] = measure.speed(
                    model.to(device), s.prompt_len, s.decode_tokens, s.repeats, flush, 256
                )
            except (RuntimeError, ValueError, NotImplementedError) as e:
                out[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            bar.update(1, model=key)

        base = speed_model(s.speed_layers, s.speed_shape)
        time_it("bf16", base)
        with _every_other_layer(base) as half:
            time_it("student", half)
        base = base.cpu()
        time_it("fp32", copy.deepcopy(base).float())
        gc.collect()
        m = bitpress.quantize_(copy.deepcopy(base), bitpress.Fp8Config(activations=None))
        time_it("fp8-w", m)
        time_it("fp8-w8a8", _set(m, bitpress.Fp8Linear, activations="dynamic"))
        m = bitpress.quantize_(copy.deepcopy(base), int4)
        time_it("int4", m)
        with _every_other_layer(m) as half:
            time_it("student-int4", half)
        time_it("int4-w4a8", _set(m, Int4Linear, act_dtype=torch.int8))
        del m
        gc.collect()
        m = bitpress.sparsify_(base, bitpress.Sparse24Config(method="magnitude"))
        time_it("sparse24", m)
        time_it("sparse24-int4", bitpress.quantize_(m.cpu(), int4))
    return out


# ------------------------------------------------------------------------------------------------
# Speculative generation on the quality model
# ------------------------------------------------------------------------------------------------


def measure_speculative(model, student, held, s: Settings) -> list[render.SpecResult]:
    n = model.config.num_hidden_layers
    prompts = [held[i * 4096 : i * 4096 + 64].reshape(1, 64) for i in range(s.spec_prompts)]
    plain = measure.plain_generation(model, prompts, s.spec_new_tokens)
    rows = [render.SpecResult("plain generation", plain.tokens_per_s, None, 1.0, "greedy")]
    drafters = [
        ("prompt lookup", "prompt-lookup"),
        (f"layer skip (first {n // 2} of {n} layers)", f"layer-skip:{n // 2}"),
        (f"self INT4 (RTN, group {GROUP})", "self-int4"),
        ("distilled student (1/2 depth)", student),
    ]
    for name, draft in progress(drafters, desc="speculative", unit="drafter"):
        run = measure.speculative_generation(model, prompts, s.spec_new_tokens, draft)
        same = torch.equal(run.tokens, plain.tokens)
        rows.append(
            render.SpecResult(
                name,
                run.tokens_per_s,
                run.mean_accepted,
                run.tokens_per_s / plain.tokens_per_s,
                "K = 4, greedy; " + ("tokens identical to plain" if same else "TOKENS DIFFER"),
            )
        )
    return rows


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def run(s: Settings = FULL, cache: str = CACHE, log=print) -> render.Report:
    """Train (or load) the models, compress and measure every method; returns the report."""
    torch.set_num_threads(os.cpu_count() or 1)
    timings = {}
    train, held = _ids(TRAIN_MODULES), _ids(HELD_OUT_MODULES)
    t0 = time.perf_counter()
    model = trained_model(train, s.steps, log=log, cache=cache)
    timings["train the quality model"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(2)
    calibration = _batches(train, *s.calibration, gen)
    batches = _batches(train, max(s.distill_steps, s.recover_steps), 16, gen)
    student, timings["distill the student"] = student_model(model, batches, s, log, cache)
    recovered, timings["SparseGPT + recovery"] = recovered_model(
        model, batches, calibration, s, log, cache
    )

    n_eval = min(s.eval_rows, (held.numel() - 1) // SEQ)
    eval_ids = held[: n_eval * SEQ].reshape(n_eval, SEQ)
    t0 = time.perf_counter()
    rows = []
    ref = None
    for m in progress(
        methods(model, student, recovered, calibration), desc="compress + eval", unit="method"
    ):
        built = m.build()
        if m.name != "fp32":
            built = built.to(torch.bfloat16)
        q = measure.quality(built, eval_ids, None if ref is None else ref.argmax)
        if ref is None:
            ref = q
        rows.append((m, measure.weight_bytes(built), q))
        del built
    timings["compress and evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    device = speed_device()
    speed = measure_speed(s, device)
    timings["speed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = measure_speculative(model, student, held, s)
    timings["speculative generation"] = time.perf_counter() - t0

    fp32_bytes, fp32_ppl = rows[0][1], rows[0][2].perplexity
    base = speed["bf16"]
    if not isinstance(base, measure.Speed):
        raise RuntimeError(f"the bf16 speed model failed on {device}: {base}")
    failed = {}
    results = []
    for m, nbytes, q in rows:
        sp = speed[m.speed]
        if not isinstance(sp, measure.Speed):
            failed[m.speed] = sp
            sp = measure.Speed(float("nan"), float("nan"))
        results.append(
            render.MethodResult(
                method=m.name,
                family=m.family,
                weight_bytes=nbytes,
                size_reduction=fp32_bytes / nbytes,
                perplexity=q.perplexity,
                retention=fp32_ppl / q.perplexity,
                agreement=1.0 if q.agreement is None else q.agreement,
                decode_ms=_or_none(sp.decode_ms),
                prefill_ms=_or_none(sp.prefill_ms),
                decode_speedup=_or_none(base.decode_ms / sp.decode_ms),
                prefill_speedup=_or_none(base.prefill_ms / sp.prefill_ms),
                note=m.note,
            )
        )
    info = dict(info_lines())
    machine = {k: info[k] for k in ("CPU", "CPU features", "CPU kernel path", "threads", "torch")}
    machine["GPU"] = info.get("GPU", "none")
    n_params = sum(p.numel() for p in model.parameters())
    h, f, a, kv = s.speed_shape
    return render.Report(
        title="bitpress compression report",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine,
        quality_model=(
            f"Llama architecture, {n_params / 1e6:.1f} M parameters (256 wide, 4 layers, byte "
            f"vocabulary), trained {s.steps} steps on Python standard-library source; "
            f"perplexity per byte on {n_eval * SEQ / 1e3:.0f} kB of held-out modules"
        ),
        speed_model=(
            f"random weights in {_shape_name(s.speed_shape)} ({h} hidden, {f} MLP, {a}/{kv} "
            f"heads), {s.speed_layers} decoder layers, byte vocabulary; bf16 activations; "
            f"decode: batch 1, median ms/token; prefill: {s.prompt_len} tokens; caches flushed "
            "before every timed call"
        ),
        methods=results,
        speculative=spec,
        timings=timings,
        notes=_notes(s, device)
        + [f"speed of {k} not measured on {device}: {v}" for k, v in failed.items()],
    )


def _or_none(x: float) -> float | None:
    return None if x != x else x  # NaN: not measured


def _shape_name(shape) -> str:
    if shape == FULL.speed_shape:
        return "Llama-3-8B layer shapes"
    return "Llama-3-8B layer shapes scaled down (not a measurement of Llama-3-8B speed)"


def _notes(s: Settings, device: torch.device) -> list[str]:
    return [
        f"speed device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "weight bytes: the model's state_dict as saved (compressed Linear layers with their "
        "scales and metadata; embeddings, norms and the output head in the model's dtype); "
        "every row but fp32 is stored and evaluated in bf16.",
        "quality retention: fp32 perplexity / the method's perplexity; next-token agreement: "
        "argmax equal to the fp32 model's, over every held-out position.",
        f"INT4 rows: group {GROUP}, symmetric. GPTQ calibrates on {s.calibration[0]} x "
        f"{s.calibration[1]} rows of 128 bytes of the training text; so do Wanda and SparseGPT.",
        "speed: rows that run the same kernels share one measurement (INT4 RTN and GPTQ; the "
        "2:4 rows); the student's speed model has half the decoder layers.",
        f"the student and the recovery fine-tune train further on the same text ({s.distill_steps}"
        f" and {s.recover_steps} steps) than the quality model itself ({s.steps} steps): their "
        "perplexity can reach fp32's; their next-token agreement shows they are other models.",
        "speculative: the quality model as target (fp32), 64-byte held-out prompts, batch 1; "
        "a model this small is bound by per-step overheads, so the ratios say more about the "
        "generator's overhead than about a large model's decode.",
    ]


def main(
    steps: int | None = None,
    fast: bool = False,
    quiet: bool = False,
    out_dir: str = OUT,
    cache: str = CACHE,
) -> int:
    """``python -m bitpress demo``: measure, print the markdown tables, write the report files."""
    s = FAST if fast else FULL
    if steps is not None:
        s = dataclasses.replace(s, steps=steps)
    os.makedirs(cache, exist_ok=True)
    set_quiet(True if quiet else None)
    report = run(s, cache)
    print()
    print(render.markdown(report))
    paths = render.write_report(report, out_dir)
    print(
        f"\nwritten to {out_dir}/: {', '.join(sorted(os.path.basename(p) for p in paths.values()))}"
    )
    return 0
