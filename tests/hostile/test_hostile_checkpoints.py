"""The hostile-input suite of the checkpoint loaders: for every registered checkpoint format
(``bitpress._core.registry.checkpoint_formats()``; a format joins with a ``CheckpointHostile``,
``register_checkpoint_hostile``), a tiny Llama quantized into that format is written with
``bitpress.save_pretrained`` (one file, and sharded with an index), then hypothesis corrupts a
copy and ``bitpress.from_pretrained`` must either load it (where the corruption leaves a valid
checkpoint: an optional tensor removed, a dtype the format accepts) or raise ``ValueError`` /
``FileNotFoundError`` whose message names the file, the tensor or the config field:

* safetensors files truncated at any byte, or with a byte of the header overwritten;
* one tensor in another dtype, of another shape, removed, or an extra tensor added;
* config.json / quantize_config.json fields of the wrong type or value, the files not JSON
  objects;
* model.safetensors.index.json weight_map entries that are not strings, paths outside the
  checkpoint directory, missing shards, a tensor mapped to the wrong shard.

Budget: the hypothesis profile of ``tests/conftest.py`` (``ci`` / ``dev``).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import bitpress
from bitpress._core import registry

transformers = pytest.importorskip("transformers")

FORMATS = [name for name, f in registry.checkpoint_formats().items()]
WRONG_VALUES = ("4", 4.5, None, [], {}, True, False, -3, 0, "x", 2**40)
PROBE = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))


def test_every_format_has_a_hostile_spec():
    for name in FORMATS:
        assert registry.checkpoint_formats()[name].hostile is not None, name


def _tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


_BASES: dict = {}
_QUANTIZED: dict[str, set[str]] = {}  # format -> names of the quantized modules of its base


def _base(fmt: str, option: int, sharded: bool) -> Path:
    """A valid checkpoint directory (built once per session)."""
    key = (fmt, option, sharded)
    if key not in _BASES:
        hostile = registry.checkpoint_formats()[fmt].hostile()
        model = hostile.quantize(_tiny_llama())
        kinds = registry.checkpoint_formats()[fmt].module_type
        _QUANTIZED[fmt] = {n for n, m in model.named_modules() if isinstance(m, kinds)}
        path = Path(tempfile.mkdtemp(prefix=f"bitpress-hostile-{fmt}-"))
        opts = hostile.save_options[option % len(hostile.save_options)]
        bitpress.save_pretrained(model, path, max_shard_size=4096 if sharded else None, **opts)
        assert bitpress.from_pretrained(path, dtype=torch.float32) is not None
        _BASES[key] = path
    return _BASES[key]


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    for p in _BASES.values():
        shutil.rmtree(p, ignore_errors=True)
    _BASES.clear()


def _files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _tensors(path: Path) -> dict[str, tuple[Path, torch.Tensor]]:
    out = {}
    for f in _files(path):
        for k, v in load_file(f).items():
            out[k] = (f, v)
    return out


def _rewrite(f: Path, change) -> None:
    t = load_file(f)
    change(t)
    save_file(t, f, metadata={"format": "pt"})


def _load(path: Path):
    """(model, None) or (None, exception)."""
    try:
        return bitpress.from_pretrained(path, dtype=torch.float32), None
    except Exception as e:  # noqa: BLE001  (the type is the assertion)
        return None, e


# The loader's messages about one tensor: "tensor 'name' ...", "missing tensor 'name'", "tensor(s)
# the model has no place for: ['name']".
NAMES_A_TENSOR = re.compile(r"tensor '[^']+'|tensor\(s\) [^:]*: \['[^']+'")


def _expect_error(
    exc, names: list[str], what: str, types=(ValueError, FileNotFoundError), any_tensor=False
):
    assert exc is not None, f"{what}: loaded without an error"
    msg = str(exc)
    assert isinstance(exc, types), f"{what}: want {types}, got {type(exc).__name__}: {msg}"
    named = any(n in msg for n in names) or (any_tensor and NAMES_A_TENSOR.search(msg))
    assert named, f"{what}: message names none of {names[:4]}: {msg}"


def _expect_ok_or_error(model, exc, names, what, any_tensor=False):
    if exc is not None:
        _expect_error(exc, names, what, any_tensor=any_tensor)
    else:
        with torch.no_grad():
            model(PROBE)


def _quantized_suffix(fmt: str, key: str) -> str | None:
    hostile = registry.checkpoint_formats()[fmt].hostile()
    module, _, suffix = key.rpartition(".")
    # A suffix may name a plain parameter elsewhere ("weight" of an FP8 layer and of a norm).
    return suffix if suffix in hostile.tensors and module in _QUANTIZED[fmt] else None


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_corrupt_tensors(fmt, data):
    kind = data.draw(
        st.sampled_from(["truncate", "header", "dtype", "shape", "missing", "extra"]),
        label="corruption",
    )
    option = data.draw(st.integers(0, 3), label="save option")
    sharded = data.draw(st.booleans(), label="sharded")
    hostile = registry.checkpoint_formats()[fmt].hostile()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        shutil.copytree(_base(fmt, option, sharded), path)
        files = _files(path)
        f = data.draw(st.sampled_from(files), label="file")
        tensors = _tensors(path)
        key = data.draw(st.sampled_from(sorted(k for k, (g, _) in tensors.items() if g == f)))
        suffix = _quantized_suffix(fmt, key)
        what = f"{kind} of {f.name}"
        if kind == "truncate":
            size = f.stat().st_size
            n = data.draw(st.integers(0, size - 1), label="bytes kept")
            f.write_bytes(f.read_bytes()[:n])
            note(f"{f.name} truncated to {n} of {size} bytes")
            _, exc = _load(path)
            _expect_error(exc, [f.name], what)
            return
        if kind == "header":
            raw = bytearray(f.read_bytes())
            hlen = int.from_bytes(raw[:8], "little")
            i = data.draw(st.integers(0, 8 + hlen - 1), label="byte")
            b = data.draw(st.integers(0, 255), label="value")
            assume(raw[i] != b)
            raw[i] = b
            f.write_bytes(bytes(raw))
            note(f"{f.name}: byte {i} of the {8 + hlen}-byte header set to {b}")
            model, exc = _load(path)
            # A byte of metadata or padding may change nothing; anything else names the file
            # or the tensor whose entry it broke.
            _expect_ok_or_error(model, exc, [f.name], what, any_tensor=True)
            return
        what = f"{kind} of tensor {key!r}"
        t = tensors[key][1]
        if kind == "dtype":
            dtype = data.draw(
                st.sampled_from(
                    [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
                     torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]
                ),
                label="dtype",
            )  # fmt: skip
            assume(dtype != t.dtype)
            _rewrite(f, lambda d: d.__setitem__(key, t.to(dtype)))
            note(f"{key}: {t.dtype} -> {dtype}")
            model, exc = _load(path)
            if suffix is not None:
                accepted = dtype in hostile.tensors[suffix][0]
            else:  # plain parameters: any floating dtype is converted to the model's
                accepted = dtype.is_floating_point == t.dtype.is_floating_point
            if accepted:
                assert exc is None, f"{what}: {dtype} is accepted, got {exc!r}"
            else:
                _expect_error(exc, [key], what)
            return
        if kind == "shape":
            how = data.draw(st.sampled_from(["grow", "shrink", "flatten", "unsqueeze"]))
            if how == "grow":
                new = torch.cat([t, t[:1]]) if t.dim() else t[None]
            elif how == "shrink":
                assume(t.dim() and t.shape[0] > 1)
                new = t[:-1]
            elif how == "flatten":
                assume(t.dim() != 1)
                new = t.reshape(-1)
            else:
                new = t[None]
            _rewrite(f, lambda d: d.__setitem__(key, new.contiguous()))
            note(f"{key}: {list(t.shape)} -> {list(new.shape)}")
            _, exc = _load(path)
            _expect_error(exc, [key], what)
            return
        if kind == "missing":
            _rewrite(f, lambda d: d.pop(key))
            index = path / "model.safetensors.index.json"
            if index.exists():  # keep the index consistent: only the tensor is gone
                idx = json.loads(index.read_text())
                idx["weight_map"].pop(key)
                index.write_text(json.dumps(idx))
                assume(idx["weight_map"])
                assume(any(load_file(g) for g in _files(path)))
            model, exc = _load(path)
            if suffix is not None and suffix not in hostile.required:
                _expect_ok_or_error(model, exc, [key], what)
            else:
                _expect_error(exc, [key, key.rsplit(".", 1)[0]], what)
            return
        if kind == "extra":
            module = key.rsplit(".", 1)[0]
            name = data.draw(
                st.sampled_from(
                    [
                        "extra",
                        f"{module}.extra",
                        "model.layers.99.mlp.up_proj.weight",
                        f"{module}.qweight_marlin",
                        "lm_head.qweight",
                    ]
                ),
                label="extra tensor",
            )
            assume(name not in tensors)
            _rewrite(f, lambda d: d.__setitem__(name, torch.zeros(4, 8, dtype=torch.int32)))
            index = path / "model.safetensors.index.json"
            if index.exists():
                idx = json.loads(index.read_text())
                idx["weight_map"][name] = f.name
                index.write_text(json.dumps(idx))
            note(f"extra tensor {name!r} in {f.name}")
            _, exc = _load(path)
            _expect_error(exc, [name, name.rsplit(".", 1)[0]], f"extra tensor {name!r}")
            return
        raise AssertionError(kind)


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_corrupt_configs(fmt, data):
    where = data.draw(
        st.sampled_from(["quantization_config", "quantize_config.json", "config.json"]),
        label="file",
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        shutil.copytree(_base(fmt, 0, False), path)
        cfg_file, q_file = path / "config.json", path / "quantize_config.json"
        cfg = json.loads(cfg_file.read_text())
        if where == "config.json":
            # The transformers config itself: not a JSON object, or a model field mistyped.
            how = data.draw(st.sampled_from(["list", "not json", "field"]), label="how")
            if how == "list":
                cfg_file.write_text(json.dumps([cfg]))
                names = ["config.json"]
            elif how == "not json":
                cfg_file.write_text(json.dumps(cfg)[:-3])
                names = ["config.json"]
            else:
                # A model that does not fit the tensors: reported as the tensor that has no
                # place (mistyped transformers fields: test_config_field_errors_name_the_file).
                value = data.draw(st.sampled_from([-1, 0, 2, 3]), label="num_hidden_layers")
                cfg["num_hidden_layers"] = value
                cfg_file.write_text(json.dumps(cfg))
                names = ["num_hidden_layers"]
            note(f"config.json: {how}")
            _, exc = _load(path)
            _expect_error(exc, names, f"config.json {how}", any_tensor=True)
            return
        if where == "quantize_config.json":
            qc = cfg.pop("quantization_config")
            cfg_file.write_text(json.dumps(cfg))
        else:
            qc = cfg["quantization_config"]
        field = data.draw(st.sampled_from(sorted(qc) + ["<whole>"]), label="field")
        value = data.draw(st.sampled_from(WRONG_VALUES), label="value")
        if field == "<whole>":
            assume(not isinstance(value, dict))
            new = value
            names = [where if where != "quantize_config.json" else "quantize_config.json"]
        else:
            assume(type(value) is not type(qc[field]) or value != qc[field])
            new = {**qc, field: value}
            names = [field]
        if where == "quantize_config.json":
            q_file.write_text(json.dumps(new))
        else:
            cfg["quantization_config"] = new
            cfg_file.write_text(json.dumps(cfg))
        note(f"{where}.{field} = {value!r}")
        model, exc = _load(path)
        if field == "<whole>" and value is None and where == "quantization_config":
            # null is an absent quantization_config: quantize_config.json is read instead.
            assert exc is None, f"quantization_config = null: {exc!r}"
        elif field != "<whole>" and type(value) is type(qc[field]):
            # A value of the right type may be valid (sym false, another group size, ...).
            _expect_ok_or_error(model, exc, names, f"{where}.{field} = {value!r}")
        elif field != "<whole>" and field not in (
            "quant_method",
            "bits",
            "group_size",
            "sym",
            "desc_act",
            "checkpoint_format",
            "format",
        ):
            # Fields the loader does not read (damp_percent, true_sequential, ...).
            _expect_ok_or_error(model, exc, names, f"{where}.{field} = {value!r}")
        else:
            _expect_error(exc, names, f"{where}.{field} = {value!r}", types=(ValueError,))


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_corrupt_index(fmt, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        shutil.copytree(_base(fmt, 0, True), path)
        index = path / "model.safetensors.index.json"
        assert index.exists() and len(_files(path)) > 1
        idx = json.loads(index.read_text())
        keys = sorted(idx["weight_map"])
        key = data.draw(st.sampled_from(keys), label="tensor")
        shards = sorted({v for v in idx["weight_map"].values()})
        how = data.draw(
            st.sampled_from(["value", "outside", "missing shard", "wrong shard", "map", "json"]),
            label="how",
        )
        types: tuple = (ValueError,)
        if how == "value":
            idx["weight_map"][key] = data.draw(st.sampled_from([3, None, [shards[0]], {}, 1.5]))
        elif how == "outside":
            real = path / idx["weight_map"][key]
            idx["weight_map"][key] = data.draw(
                st.sampled_from(
                    [f"../{real.name}", str(real), f"sub/../../{real.name}", "/etc/hostname"]
                )
            )
        elif how == "missing shard":
            idx["weight_map"][key] = "model-00009-of-00009.safetensors"
            types = (FileNotFoundError,)
        elif how == "wrong shard":
            other = [s for s in shards if s != idx["weight_map"][key]]
            idx["weight_map"][key] = other[0]
        elif how == "map":
            idx["weight_map"] = data.draw(st.sampled_from([[], {}, "x", None, 3]))
        if how == "json":
            index.write_text(json.dumps(idx)[:-2])
        else:
            index.write_text(json.dumps(idx))
        note(f"index: {how} ({key})")
        _, exc = _load(path)
        _expect_error(exc, ["model.safetensors.index.json"], f"index {how}", types=types)


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", "64"), ("vocab_size", None), ("num_hidden_layers", 1.5), ("vocab_size", -1)],
)
def test_config_field_errors_name_the_file(field, value):
    """Fixed (found by this suite): transformers' own config errors become a ValueError naming
    config.json and the field."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        shutil.copytree(_base(FORMATS[0], 0, False), path)
        cfg = json.loads((path / "config.json").read_text())
        cfg[field] = value
        (path / "config.json").write_text(json.dumps(cfg))
        _, exc = _load(path)
        _expect_error(exc, ["config.json"], f"config.json {field} = {value!r}", types=(ValueError,))
        assert field in str(exc)
