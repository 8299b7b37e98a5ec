"""Hypothesis strategies built from the plain-data hostile specs the library registers
(:class:`bitpress._core.registry.HostileSpec`, :class:`~bitpress._core.registry.TensorArg`), and
the tensor transformations they draw: memory layouts (strided, transposed, storage offset,
expanded), non-finite values and the corruptions of invalid inputs (dtype, rank, size, device,
values). Everything random comes from hypothesis (sizes, options, choices) or from a
``torch.Generator`` seeded by a drawn integer, so a failing example replays from its seed.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from hypothesis import strategies as st

from bitpress._core.registry import Dim, HostileSpec, TensorArg

PRIMES = (2, 3, 5, 7, 11, 13, 17, 31, 61, 67, 127)
# Dtypes a wrong-dtype corruption draws from (each op accepts a few of them).
ALL_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.float8_e4m3fn,
)
LAYOUTS = ("contiguous", "strided", "transposed", "offset", "expanded")
# Messages of the CPU-side value checks (what a GPU backend documents as NaN instead).
VALUE_CHECK = re.compile(
    r"values must|at most once|group_starts must (run|be non|be arange)|must be finite"
)
# The Triton interpreter runs Python per program: keep its cases this small (elements of work).
INTERPRETER_WORK = 1 << 14


def dim_size(dim: Dim, *, small_only: bool = False) -> st.SearchStrategy[int]:
    """0, 1, primes, anything up to ``small``, or one of ``large``: times ``multiple``."""
    cands = [st.sampled_from([c for c in (0, 1, *PRIMES) if c <= dim.small])]
    cands.append(st.integers(0, dim.small))
    if dim.large and not small_only:
        cands.append(st.sampled_from([-(-n // dim.multiple) for n in dim.large]))
    return st.one_of(cands).map(lambda c: max(dim.min, c * dim.multiple))


def sizes(spec: HostileSpec, *, small_only: bool = False) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({d.name: dim_size(d, small_only=small_only) for d in spec.dims})


def options(spec: HostileSpec) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({k: st.sampled_from(v) for k, v in spec.options.items()})


seeds = st.integers(0, 2**32 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Memory layouts of valid values
# --------------------------------------------------------------------------------------------


def relayout(t: torch.Tensor, how: str, arg: TensorArg) -> torch.Tensor:
    """The same values (``expanded``: a stride-0 view of the first slice) in another memory
    layout: every stride pattern an op must read correctly."""
    if how == "contiguous" or t.dim() == 0:
        return t
    if how == "strided":  # every other element of a twice-as-large buffer along the last dim
        buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    if how == "transposed":  # column-major storage of the last two dims
        if t.dim() < 2:
            return relayout(t, "strided", arg)
        return t.mT.contiguous().mT
    if how == "offset":  # a view at a storage offset of 3 elements
        flat = torch.zeros(t.numel() + 3, dtype=t.dtype)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape)
    if how == "expanded":
        if not arg.expandable:
            return t
        # "[..., K]" arguments (rank None) repeat a leading dim only: a vector constant along
        # K makes the sums cancel (y = x_m * sum_k W[n, k]), which is the test's conditioning,
        # not the kernel's error.
        dims = range(t.dim() - 1) if arg.rank is None and t.dim() > 1 else range(t.dim())
        if arg.rank is None and t.dim() == 1:
            return t
        d = max(dims, key=lambda i: t.shape[i])
        if t.shape[d] <= 1:
            return t
        return t.narrow(d, 0, 1).expand(t.shape)
    raise ValueError(how)


def with_nonfinite(t: torch.Tensor, values: tuple[float, ...], gen, count: int) -> torch.Tensor:
    """``t`` with ``count`` elements replaced by values drawn from ``values``."""
    if not t.numel() or not values or not count:
        return t
    t = t.clone()
    flat = t.view(-1)
    for _ in range(count):
        i = int(torch.randint(0, flat.numel(), (1,), generator=gen))
        flat[i] = values[int(torch.randint(0, len(values), (1,), generator=gen))]
    return t


# --------------------------------------------------------------------------------------------
# Corruptions of valid arguments
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corruption:
    kind: str  # "dtype", "rank", "size", "device", "value"
    arg: str  # the argument changed
    args: dict  # the corrupted arguments
    exc: type[Exception]  # the documented exception type
    names: tuple[str, ...]  # the message may blame any of these (size conflicts)
    note: str  # what was done, for the failure report

    def describe(self) -> str:
        return f"{self.kind} of {self.arg}: {self.note}"


def tensor_args(spec: HostileSpec, args: dict) -> list[TensorArg]:
    return [a for a in spec.args if isinstance(args.get(a.name), torch.Tensor)]


def corrupt(
    spec: HostileSpec, args: dict, kind: str, data, gen, *, values_too: bool = True
) -> Corruption | None:
    """One corruption of ``args`` of ``kind`` (choices drawn from ``data``), or None when this
    case has nothing of that kind to corrupt."""
    tensors = tensor_args(spec, args)
    if kind == "value":
        bad = spec.bad_values(args, gen) if values_too else []
        if not bad:
            return None
        name, new = data.draw(st.sampled_from(bad), label="bad value")
        return Corruption("value", name, new, RuntimeError, (name,), "out-of-range value")
    if kind == "device":
        # The first argument's device picks the backend: move another one to meta.
        tensors = tensors[1:]
    if not tensors:
        return None
    arg = data.draw(st.sampled_from(tensors), label=f"{kind} argument")
    t = args[arg.name]
    if kind == "dtype":
        dtype = data.draw(st.sampled_from([d for d in ALL_DTYPES if d not in arg.dtypes]))
        new = t.to(dtype)
        return Corruption("dtype", arg.name, {**args, arg.name: new}, TypeError, (arg.name,),
                          f"{t.dtype} -> {dtype}")  # fmt: skip
    if kind == "rank":
        if arg.rank is None:
            new = t.reshape(-1)[0] if t.numel() else torch.zeros((), dtype=t.dtype)
        else:
            how = data.draw(st.sampled_from(["unsqueeze", "squeeze"] if t.dim() else ["unsqueeze"]))
            if how == "unsqueeze":
                new = t.unsqueeze(data.draw(st.integers(0, t.dim())))
            elif t.shape[0] == 0:
                new = torch.zeros(t.shape[1:], dtype=t.dtype)
            else:
                new = t[0]
        return Corruption("rank", arg.name, {**args, arg.name: new}, RuntimeError, (arg.name,),
                          f"shape {list(t.shape)} -> {list(new.shape)}")  # fmt: skip
    if kind == "size":
        if t.dim() == 0:
            return None
        d = t.dim() - 1 if arg.rank is None else data.draw(st.integers(0, t.dim() - 1))
        delta = data.draw(st.sampled_from([1, 2, 8, 16, -1, -8]))
        n = t.shape[d]
        if n + delta < 0:
            delta = 1
        if delta > 0:
            extra = t.narrow(d, 0, 1) if n else torch.zeros_like(t.narrow(d, 0, 0))
            if not n:
                shape = list(t.shape)
                shape[d] = 1
                extra = torch.zeros(shape, dtype=t.dtype)
            new = torch.cat([t, *[extra] * delta], d)
        else:
            new = t.narrow(d, 0, n + delta)
        return Corruption("size", arg.name, {**args, arg.name: new}, RuntimeError,
                          (arg.name, *arg.related), f"size({d}) {n} -> {new.shape[d]}")  # fmt: skip
    if kind == "device":
        new = t.to("meta")
        return Corruption("device", arg.name, {**args, arg.name: new}, RuntimeError, (arg.name,),
                          "moved to the meta device")  # fmt: skip
    raise ValueError(kind)


def names_pattern(op: str, names: tuple[str, ...], *, anywhere: bool = False) -> re.Pattern:
    """``^<op>: <name>`` (or ``<name>`` anywhere after ``<op>: ``) for any of ``names``."""
    alt = "|".join(re.escape(n) for n in names)
    return re.compile(rf"^{op}: " + (rf".*\b({alt})\b" if anywhere else rf"({alt})\b"), re.S)
