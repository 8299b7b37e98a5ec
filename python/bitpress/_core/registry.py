"""One registry of ops: each op registers itself once, next to its definition.

An :class:`OpSpec` names the op, its public function, its plain-PyTorch reference, the cases
``python -m bitpress selftest`` runs and its benchmark file. ``python -m bitpress info``,
``selftest`` and the CLI tests read this registry, so adding an op edits no shared file: the
feature's ``ops`` module calls :func:`register_op`. Backends register their implementations in
:mod:`bitpress._core.backends`.

An op joins the hostile-input suite (``tests/hostile``) with a :class:`HostileSpec`: its sizes,
its tensor arguments (accepted dtypes, rank, which arguments their sizes are checked against,
whether a stride-0 view or a non-finite value is valid) as plain data, and plain-torch functions
that build valid arguments from drawn sizes, call a backend and compute the expected result. The
suite turns the description into hypothesis strategies (hypothesis is a test dependency only).
An op passes ``hostile=`` to its :class:`OpSpec`, or its feature registers it by name with
:func:`register_hostile`; the suite fails for a registered op that has none.

The same module holds the other registries the upper layers dispatch on: ``quantize_``
handlers by config type (torchao's ``register_quantize_module_handler``), checkpoint formats
by ``quant_method`` (each format also names its hostile-checkpoint builder, ``tiny_model``), and
the per-layer schemes of compressed-tensors checkpoints by their ``format`` string
(:class:`CompressedTensorsScheme`, read by :mod:`bitpress.compressed_tensors`).
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


@dataclasses.dataclass(frozen=True)
class Dim:
    """A size of an op's hostile spec. Drawn from ``0..small`` (0, 1 and primes favoured), or
    one of ``large``; the size is ``multiple`` times the drawn count, at least ``min``."""

    name: str
    small: int = 16
    large: tuple[int, ...] = ()
    multiple: int = 1
    min: int = 0


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """A tensor argument of an op, as the hostile suite mutates it.

    dtypes : the dtypes the op accepts (another one must raise TypeError naming the argument).
    rank : its rank (another one must raise naming it); None: the rank varies (``x [..., K]``,
        a weight field whose rank depends on the layout): only 0-D is drawn as a wrong rank, and
        only the last dim is resized.
    related : the arguments its sizes are checked against: a wrong size may be reported as any
        of them (the message must name one).
    expandable : a stride-0 (expanded) view of a valid value is valid (not for ``perm``, whose
        rows must differ, nor ``group_starts``).
    nonfinite : non-finite values its contract allows (``nan``, ``inf``, ``-inf``).
    cast : the other accepted dtypes a valid value keeps its meaning in (int32 <-> int64).
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    rank: int | None
    related: tuple[str, ...] = ()
    expandable: bool = True
    nonfinite: tuple[float, ...] = ()
    cast: tuple[torch.dtype, ...] = ()


@dataclasses.dataclass
class HostileSpec:
    """How the hostile-input suite drives an op (module docstring; ``tests/hostile``).

    dims, options : the sizes and the discrete choices (``{"dtype": (float32, ...), "sym":
        (True, False)}``) a case draws.
    args : every tensor argument, by the name the op's messages use.
    make(sizes, options, gen, backend) -> dict : valid arguments by name (tensors and scalars) on
        the CPU, in the layout ``backend`` reads.
    call(backend, args) -> result : the backend's implementation on ``args`` (its own checks).
    reference(args) -> result : the expected result (plain torch, float64 / float32).
    tol(options) -> float : the relative-error bound (0: exact; tuples of outputs: exact).
    bad_values(args, gen) -> [(argument, args)] : arguments whose values are out of range, each
        naming the argument the error must name; checked only on ``value_checks`` backends.
    work(sizes) -> int : elements of work of a case (the Triton interpreter runs small ones).
    """

    op: str
    dims: tuple[Dim, ...]
    args: tuple[TensorArg, ...]
    make: Callable[[dict, dict, torch.Generator, str], dict]
    call: Callable[[str, dict], object]
    reference: Callable[[dict], object]
    tol: Callable[[dict], float]
    options: dict[str, tuple] = dataclasses.field(default_factory=dict)
    bad_values: Callable[[dict, torch.Generator], list] = lambda args, gen: []
    value_checks: tuple[str, ...] = ("cpu", "reference")
    work: Callable[[dict], int] = lambda sizes: 0


@dataclasses.dataclass
class OpSpec:
    name: str
    feature: str  # "int4", "speculative", ...
    fn: Callable  # the public function (bitpress.ops.<name>)
    reference: Callable
    cases: Callable[[], list[Case]] = lambda: []  # selftest cases on every machine
    gpu_cases: Callable[[], list[Case]] = lambda: []  # added on a CUDA machine
    bench: str | None = None  # the benchmark file, relative to the repository root
    hostile: Callable[[], HostileSpec] | None = None  # the hostile-input suite's description


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


def register_hostile(name: str) -> Callable[[Callable[[], HostileSpec]], Callable]:
    """Decorator: ``fn() -> HostileSpec`` is the hostile spec of the registered op ``name`` (for
    a feature whose ops module did not pass ``hostile=`` to its OpSpec)."""

    def deco(fn: Callable[[], HostileSpec]) -> Callable[[], HostileSpec]:
        spec = op(name)
        if spec.hostile is not None:
            raise RuntimeError(f"bitpress: op {name!r} has a hostile spec already")
        spec.hostile = fn
        return fn

    return deco


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
    load(name, linear, tensors, qc, dtype, device) -> module : the module that replaces
        ``linear``, built directly on ``device`` in the layout that device reads.
    save(modules, **options) -> (tensors, qc) : a checkpoint of ``modules`` {name: module}.
    hostile() -> CheckpointHostile : how the hostile-checkpoint suite (``tests/hostile``)
        builds and corrupts a checkpoint of this format (:func:`register_checkpoint_hostile`).
    select(model, tensors, qc) -> list : the quantized modules of ``model`` (built from the
        checkpoint's config), for a format whose config says which layers are quantized
        (compressed-tensors' targets and ignore lists); None: ``module_names(tensors)``.
    accepts(module) -> bool : whether ``save`` can write this module (None: every module of
        ``module_type``).
    save_priority : ``save_pretrained`` without ``quant_method`` tries the formats that accept
        every quantized module of a model by increasing priority (registration order breaks
        ties); None: only when asked for by name.
    """

    name: str
    module_type: type | tuple[type, ...]
    suffixes: tuple[str, ...]
    parse: Callable
    module_names: Callable
    load: Callable
    save: Callable
    hostile: Callable[[], CheckpointHostile] | None = None
    select: Callable | None = None
    accepts: Callable | None = None
    save_priority: int | None = 0


@dataclasses.dataclass
class CheckpointHostile:
    """What the hostile-checkpoint suite needs of a format.

    quantize(model) -> model : a small dense transformers model (float32) with its Linear layers
        replaced by the format's modules, ready for ``save_pretrained``.
    tensors : ``{suffix: (accepted dtypes, rank)}`` of the tensors of one quantized module.
    required : the suffixes a module cannot load without.
    save_options : the ``save_pretrained`` options to cover (``checkpoint_format`` ...).
    """

    quantize: Callable
    tensors: dict[str, tuple[tuple[torch.dtype, ...], int]]
    required: tuple[str, ...]
    save_options: tuple[dict, ...] = ({},)


_FORMATS: dict[str, CheckpointFormat] = {}


def register_checkpoint_format(fmt: CheckpointFormat) -> CheckpointFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def checkpoint_formats() -> dict[str, CheckpointFormat]:
    return dict(_FORMATS)


def register_checkpoint_hostile(name: str) -> Callable[[Callable[[], CheckpointHostile]], Callable]:
    """Decorator: ``fn() -> CheckpointHostile`` is the hostile description of the registered
    checkpoint format ``name`` (for a format registered without ``hostile=``)."""

    def deco(fn: Callable[[], CheckpointHostile]) -> Callable[[], CheckpointHostile]:
        try:
            fmt = _FORMATS[name]
        except KeyError:
            raise KeyError(f"bitpress: no checkpoint format named {name!r}") from None
        if fmt.hostile is not None:
            raise RuntimeError(f"bitpress: checkpoint format {name!r} has a hostile spec already")
        fmt.hostile = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------------
# compressed-tensors schemes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompressedTensorsScheme:
    """One per-layer format of compressed-tensors checkpoints (``quant_method:
    "compressed-tensors"``), read and written by :mod:`bitpress.compressed_tensors`.

    A checkpoint's layer is dispatched on one string, its *format*: the ``format`` of the
    ``sparsity_config`` when the layer is one of its targets and that format is not ``"dense"``
    (the outer compression: compressed-tensors applies sparsity compression after quantization),
    else the ``format`` of the first config group whose targets match the layer (or the config's
    global ``format`` when the group has none). A layer matched by neither stays a plain Linear.

    format : the format string ("float-quantized", "pack-quantized", "sparse-24-bitmask", ...).
    module_types : the module classes it loads to and saves from.
    load(name, linear, tensors, scheme_cfg, dtype, device) -> module : the module replacing
        ``linear`` (an ``nn.Linear`` on the meta device giving the shapes), from ``tensors`` (a
        mapping of the whole checkpoint by full name, values possibly views of memory-mapped
        files: copy what is kept). ``scheme_cfg`` (a dict, validated types, see
        :func:`bitpress.compressed_tensors.parse_compressed_tensors_config`):

        * ``format``: the format string dispatched on;
        * ``group``: the config group's name, or None (a sparse-only layer);
        * ``weights``, ``input_activations``, ``output_activations``: the group's quantization
          args, each None or a dict ``{num_bits, type ("int" | "float"), symmetric, strategy
          ("tensor" | "channel" | "group" | "block" | "token" | "tensor_group" | ...),
          group_size, block_structure ([rows, cols] or None), dynamic (bool or "local"),
          actorder}``, with the strategy inferred as compressed-tensors infers it;
        * ``sparsity_config``: the checkpoint's ``sparsity_config`` (a dict with ``format``,
          ``sparsity_structure``, ``targets``, ``ignore``, ...) when it targets this layer,
          else None;
        * ``quantization_config``: the whole normalised config.

        Errors are ValueError naming the tensor (``'<name>.<suffix>'``) or the config field.
    save(name, module) -> (tensors, scheme_cfg) : ``tensors`` by suffix (``{"weight": ...,
        "weight_scale": ...}``, written as ``<name>.<suffix>``); ``scheme_cfg`` a JSON-able dict
        with ``weights`` / ``input_activations`` / ``output_activations`` (quantization args as
        compressed-tensors writes them; absent or None: not quantized) and, for a sparse
        format, ``sparsity_config`` (``{"format", "sparsity_structure", ...}`` without targets:
        the writer gathers the targets). Layers with equal configs share a config group.
    suffixes : every tensor suffix of one layer the scheme may read (``bias`` included): the
        loader reports a tensor of another scheme's suffixes in a layer of this one.
    can_save(module) -> bool : whether ``save`` writes this module (two schemes may hold the
        same module class); the first registered scheme that can is used.
    hostile : what the hostile-checkpoint suite adds for this scheme: ``quantize(name,
        linear) -> module`` (a module of this scheme for a Linear of a tiny float32 Llama, or
        None to leave it), ``tensors`` ``{suffix: (accepted dtypes, rank)}`` and ``required``
        (suffixes every layer of the scheme needs), as a :class:`CompressedTensorsHostile`.
    """

    format: str
    module_types: tuple[type, ...]
    load: Callable
    save: Callable
    suffixes: tuple[str, ...] = ()
    can_save: Callable = lambda module: True
    hostile: Callable[[], CompressedTensorsHostile] | None = None


@dataclasses.dataclass
class CompressedTensorsHostile:
    """A compressed-tensors scheme's part of the hostile-checkpoint suite (see
    :class:`CompressedTensorsScheme`)."""

    quantize: Callable
    tensors: dict[str, tuple[tuple[torch.dtype, ...], int]]
    required: tuple[str, ...] = ()


_CT_SCHEMES: dict[str, CompressedTensorsScheme] = {}
COMPRESSED_TENSORS = "compressed-tensors"


def register_compressed_tensors_scheme(scheme: CompressedTensorsScheme) -> CompressedTensorsScheme:
    if scheme.format in _CT_SCHEMES:
        raise RuntimeError(
            f"bitpress: compressed-tensors scheme {scheme.format!r} is registered twice"
        )
    _CT_SCHEMES[scheme.format] = scheme
    fmt = _FORMATS.get(COMPRESSED_TENSORS)
    if fmt is not None:  # the container registered first: it reads and writes this one too
        fmt.module_type = compressed_tensors_module_types()
        fmt.suffixes = compressed_tensors_suffixes()
    return scheme


def compressed_tensors_schemes() -> dict[str, CompressedTensorsScheme]:
    """Every registered compressed-tensors scheme, by format, in registration order."""
    return dict(_CT_SCHEMES)


def compressed_tensors_scheme(fmt: str, where: str = "format") -> CompressedTensorsScheme:
    """The scheme of format ``fmt``; ValueError naming ``where`` (the config field) otherwise."""
    try:
        return _CT_SCHEMES[fmt]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in _CT_SCHEMES) or "none"
        raise ValueError(
            f"{where}: compressed-tensors format {fmt!r} is not supported (bitpress reads {known})"
        ) from None


def compressed_tensors_module_types() -> tuple[type, ...]:
    out: list[type] = []
    for s in _CT_SCHEMES.values():
        out.extend(t for t in s.module_types if t not in out)
    return tuple(out)


def compressed_tensors_suffixes() -> tuple[str, ...]:
    out: list[str] = []
    for s in _CT_SCHEMES.values():
        out.extend(x for x in s.suffixes if x not in out)
    return tuple(out)
