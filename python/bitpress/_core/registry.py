"""One registry of ops: each op registers itself once, next to its definition.

An :class:`OpSpec` names the op, its public function, its plain-PyTorch reference, the cases
``python -m bitpress selftest`` runs and its benchmark file. ``python -m bitpress info``,
``selftest`` and the CLI tests read this registry, so adding an op edits no shared file: the
feature's ``ops`` module calls :func:`register_op`. Backends register their implementations in
:mod:`bitpress._core.backends`.

The same module holds the two other registries the upper layers dispatch on: ``quantize_``
handlers by config type (torchao's ``register_quantize_module_handler``) and checkpoint formats
by ``quant_method``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Case:
    """One selftest case: ``make(device, gen, backend)`` returns the positional arguments of the
    backend implementations (which are those of the public function, without ``backend=``)."""

    op: str
    name: str
    make: Callable[[torch.device, torch.Generator, str], tuple]
    ref: Callable[..., object]
    tol: float  # relative error bound against the reference (0: exact)
    size: int = 0  # elements of the output: the Triton interpreter skips cases over 2^18
    gpu_only: bool = False  # run on CUDA devices only (Llama-sized shapes)


@dataclasses.dataclass
class OpSpec:
    name: str
    feature: str  # "int4", "speculative", ...
    fn: Callable  # the public function (bitpress.ops.<name>)
    reference: Callable
    cases: Callable[[], list[Case]] = lambda: []  # selftest cases on every machine
    gpu_cases: Callable[[], list[Case]] = lambda: []  # added on a CUDA machine
    bench: str | None = None  # the benchmark file, relative to the repository root


_OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in _OPS:
        raise RuntimeError(f"bitpress: op {spec.name!r} is registered twice")
    _OPS[spec.name] = spec
    return spec


def ops() -> dict[str, OpSpec]:
    """Every registered op, in registration order."""
    return dict(_OPS)


def op(name: str) -> OpSpec:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"bitpress: no op named {name!r} (ops: {sorted(_OPS)})") from None


# quantize_ / sparsify_ handlers: config type -> handler(model, config) -> model.
_QUANTIZE_HANDLERS: dict[type, Callable] = {}


def register_quantize_handler(config_type: type) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _QUANTIZE_HANDLERS[config_type] = fn
        return fn

    return deco


def quantize_handler(config: object) -> Callable:
    try:
        return _QUANTIZE_HANDLERS[type(config)]
    except KeyError:
        known = ", ".join(t.__name__ for t in _QUANTIZE_HANDLERS) or "none"
        raise TypeError(
            f"quantize_: config must be one of the bitpress configs ({known}), "
            f"got {type(config).__name__}"
        ) from None


@dataclasses.dataclass
class CheckpointFormat:
    """A checkpoint format of quantized modules, read and written by :mod:`bitpress.checkpoint`.

    name : the ``quant_method`` of its quantization_config.
    module_type : the module class it loads and saves.
    suffixes : the tensor name suffixes of one module (``<name>.<suffix>``).
    parse(qc, source) -> dict : validates a quantization_config, returns it normalised.
    module_names(tensors) -> list : the quantized modules of a checkpoint.
    load(name, linear, tensors, qc, dtype) -> module : the module that replaces ``linear``.
    save(modules, **options) -> (tensors, qc) : a checkpoint of ``modules`` {name: module}.
    """

    name: str
    module_type: type
    suffixes: tuple[str, ...]
    parse: Callable
    module_names: Callable
    load: Callable
    save: Callable


_FORMATS: dict[str, CheckpointFormat] = {}


def register_checkpoint_format(fmt: CheckpointFormat) -> CheckpointFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def checkpoint_formats() -> dict[str, CheckpointFormat]:
    return dict(_FORMATS)
