"""The structure of the package (DESIGN.md, "Layout" and the layers of bitpress/__init__.py):
no import circle, no function-local import of a bitpress module, core imports no feature,
layouts and references import only torch, core and their feature's lower modules; the op
registry is complete; backend choice knows the op (capabilities, compute capability, CUDA
images); the named weight structure and the op schemas cannot drift."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitpress
from bitpress import ops
from bitpress._core import backends, registry
from bitpress._core.backends import Capability, Device
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import Int4CpuTiles, Int4MmaTiles
from bitpress.int4.rtn import rtn_quantize

ROOT = Path(__file__).resolve().parents[1]
# Package name -> source folder (setup.py package_dir).
SOURCES = {
    "bitpress": ROOT / "python" / "bitpress",
    "bitpress.triton_kernels": ROOT / "triton_kernels",
}


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    mods = {}
    for pkg, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "bitpress" and name.startswith("bitpress.triton_kernels"):
                continue
            mods[name] = path
    return mods


MODULES = _modules()
# Compiled extension modules (bitpress._C): leaves of the graph, not the package bitpress.
EXTENSIONS = {
    "bitpress." + path.name.split(".")[0] for path in SOURCES["bitpress"].glob("_C*.so")
} | {"bitpress._C"}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_pkg = MODULES.get(module, Path()).name == "__init__.py"
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.AST) -> list[str]:
    """The bitpress modules an import statement imports (``from a import b``: ``a.b`` when that
    is a module, else ``a``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        src = _resolve(module, node)
        names = [
            f"{src}.{a.name}" if f"{src}.{a.name}" in set(MODULES) | EXTENSIONS else src
            for a in node.names
        ]
    else:
        return []
    return [n for n in names if n == "bitpress" or n.startswith("bitpress.")]


def _known(name: str) -> str:
    """The longest prefix of ``name`` that is a module of the package."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """(top-level import graph {module: bitpress modules it imports}, function-local bitpress
    imports as 'module:line target')."""
    graph, local = {}, []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for inner in ast.walk(node):
                for t in _targets(mod, inner):
                    local.append(f"{mod}:{inner.lineno} imports {t}")
        for node in tree.body:  # module level, including under if / try (optional imports)
            for inner in ast.walk(node):
                if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                edges |= {_known(t) for t in _targets(mod, inner) if t not in EXTENSIONS}
        edges.discard(mod)
        graph[mod] = edges
    return graph, local


GRAPH, LOCAL_IMPORTS = _imports()


def test_modules_found():
    assert {"bitpress._core.backends", "bitpress.int4.ops", "bitpress.speculative.ops"} <= set(
        MODULES
    )
    assert "bitpress.triton_kernels.int4_gemm" in MODULES


def test_no_function_local_bitpress_import():
    assert LOCAL_IMPORTS == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None. A package imports its ``__init__`` first, so an edge to a
    submodule also runs its parents' ``__init__``: both are in the graph as modules."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_import_graph_is_acyclic():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _bitpress_imports(mod: str) -> set[str]:
    return GRAPH[mod]


def test_core_imports_no_other_bitpress_package():
    core = [m for m in MODULES if m == "bitpress._core" or m.startswith("bitpress._core.")]
    assert len(core) >= 4, core
    for mod in core:
        bad = {t for t in _bitpress_imports(mod) if not t.startswith("bitpress._core")}
        assert not bad, (mod, bad)


# The lowest layer of each feature: torch, the standard library, core and these modules.
LOWER = {
    "bitpress.int4.packing": set(),
    "bitpress.int4.quantized": {"bitpress.int4.packing"},
    "bitpress.int4.layout": {"bitpress.int4.packing", "bitpress.int4.quantized"},
    "bitpress.int4.reference": {
        "bitpress.int4.packing",
        "bitpress.int4.quantized",
        "bitpress.int4.layout",
    },
    "bitpress.speculative.reference": set(),
}


@pytest.mark.parametrize("mod", sorted(LOWER))
def test_layouts_and_references_import_only_torch_and_core(mod):
    tree = ast.parse(MODULES[mod].read_text())
    top = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top.add(node.module.split(".")[0])
    third_party = top - set(sys.stdlib_module_names) - {"torch", "bitpress", "__future__"}
    assert not third_party, (mod, third_party)
    allowed = LOWER[mod]
    bad = {
        t
        for t in _bitpress_imports(mod)
        if not t.startswith("bitpress._core")
        and t not in allowed
        # a package's __init__ runs first, but it is not what the module asks for
        and t not in ("bitpress", "bitpress.int4", "bitpress.speculative")
    }
    assert not bad, (mod, bad)


# --------------------------------------------------------------------------------------------
# The op registry
# --------------------------------------------------------------------------------------------


def test_every_public_op_is_registered_completely():
    specs = registry.ops()
    assert set(ops.__all__) == set(specs), (ops.__all__, sorted(specs))
    for name in ops.__all__:
        spec = specs[name]
        assert spec.fn is getattr(ops, name), name
        assert spec.reference is getattr(bitpress.reference, name), name
        cases = spec.cases()
        assert cases and all(c.op == name for c in cases), name
        assert spec.bench and (ROOT / spec.bench).is_file(), (name, spec.bench)
        assert spec.bench == f"bench/bench_{name}.py" or name == "int4_gemm_repack", spec.bench
        impls = backends.implementations(name)
        assert "reference" in impls, name
        assert backends.capabilities(name)["reference"].devices == ("any",), name


def test_info_lists_every_registered_op():
    res = subprocess.run(
        [sys.executable, "-m", "bitpress", "info"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    for name, spec in registry.ops().items():
        assert re.search(rf"^op {name} +\[{spec.feature}\] ", res.stdout, re.M), name


# --------------------------------------------------------------------------------------------
# Backend choice knows the op
# --------------------------------------------------------------------------------------------


@pytest.fixture
def test_op():
    """A throwaway op with a cuda implementation that needs sm_90, a triton one for any CUDA
    device and a reference; removed afterwards."""
    name = "_test_op"
    assert name not in backends._IMPLS
    backends.register(name, "cuda", Capability(devices=("cuda",), min_cc=(9, 0)))(lambda *a: "cuda")
    backends.register(name, "triton", Capability(devices=("cuda",)))(lambda *a: "triton")
    backends.register(name, "reference")(lambda *a: "reference")
    try:
        yield name
    finally:
        del backends._IMPLS[name]


def test_min_cc_refusal_and_fall_through(test_op, monkeypatch):
    sm80, sm90 = Device("cuda", (8, 0)), Device("cuda", (9, 0))
    why = backends.refusal(test_op, "cuda", sm80)
    assert why is not None and "9.0" in why and "8.0" in why, why
    assert backends.refusal(test_op, "cuda", sm90) is None
    assert backends.refusal(test_op, "triton", sm80) is None
    assert Capability(devices=("cuda",), min_cc=(9, 0)).refusal(sm80) == why
    # select() with the default order: cuda refused on sm_80, triton serves; sm_90: cuda.
    monkeypatch.setattr(backends.Device, "of", staticmethod(lambda device: sm80))
    name, fn = backends.select(test_op, "cuda")
    assert (name, fn()) == ("triton", "triton")
    monkeypatch.setattr(backends.Device, "of", staticmethod(lambda device: sm90))
    assert backends.select(test_op, "cuda")[0] == "cuda"
    # A forced backend that cannot serve says why; it never falls back.
    monkeypatch.setattr(backends.Device, "of", staticmethod(lambda device: sm80))
    with pytest.raises(
        RuntimeError,
        match=r"bitpress._test_op: backend 'cuda' cannot serve this call: .*compute "
        r"capability 9\.0 or newer, the device has 8\.0",
    ):
        backends.select(test_op, "cuda", backend="cuda")
    with pytest.raises(NotImplementedError, match="'cpu' backend does not implement this op"):
        backends.select(test_op, "cuda", backend="cpu")
    # On the CPU only the reference is registered for this op.
    monkeypatch.setattr(backends.Device, "of", staticmethod(lambda device: Device("cpu")))
    assert backends.select(test_op, "cpu")[0] == "reference"


def test_dtype_refusal(test_op):
    backends._IMPLS[test_op]["triton"] = backends.Implementation(
        lambda *a: "triton", Capability(devices=("cuda",), dtypes=(torch.float16,))
    )
    why = backends.refusal(test_op, "triton", Device("cuda", (8, 0)), torch.float32)
    assert why == "it takes float16 inputs, not float32"


@pytest.mark.parametrize(
    "cc, archs, fits",
    [
        ((8, 6), ["sm_80"], True),
        ((8, 0), ["sm_80"], True),
        ((9, 0), ["sm_80"], False),
        ((9, 0), ["sm_90a"], True),
        ((10, 0), ["sm_90a"], False),
        ((9, 1), ["sm_90a"], False),
        ((12, 0), ["compute_90"], True),
        ((8, 6), ["compute_90"], False),
        ((9, 0), ["sm_80", "sm_90a"], True),
        ((7, 5), ["sm_80", "sm_90a"], False),
    ],
)
def test_cuda_image_fits(cc, archs, fits):
    assert backends.cuda_image_fits(cc, archs) is fits


def test_compiled_backend_refuses_a_device_without_an_image(monkeypatch):
    monkeypatch.setattr(backends.ext, "with_cuda", lambda: True)
    monkeypatch.setattr(backends.ext, "cuda_archs", lambda: ["sm_80", "sm_90a"])
    cap = Capability(devices=("cuda",), compiled_cuda=True)
    assert cap.refusal(Device("cuda", (8, 9))) is None
    why = cap.refusal(Device("cuda", (10, 0)))
    assert why == "bitpress._C has no CUDA image for sm_100 (compiled: sm_80, sm_90a)"
    monkeypatch.setattr(backends.ext, "with_cuda", lambda: False)
    assert cap.refusal(Device("cuda", (8, 0))) == "bitpress._C was built without CUDA kernels"


def test_public_backends_is_the_core_module():
    from bitpress import backends as public

    for name in public.__all__:
        assert getattr(public, name) is getattr(backends, name), name


# --------------------------------------------------------------------------------------------
# The named weight structure and the op schemas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["int4_gemm", "int4_gemm_triton"])
@pytest.mark.parametrize("layout", [Int4CpuTiles, Int4MmaTiles], ids=lambda t: t.__name__)
def test_schema_arguments_are_the_weight_fields(op, layout):
    w = int4_layout.pack(rtn_quantize(torch.randn(70, 64), 32, sym=False), layout=layout)
    kw = w.op_kwargs()
    assert set(kw) == {
        "qweight",
        "scales",
        "zeros",
        "group_starts",
        "perm",
        "out_features",
        "layout",
    }
    schema = getattr(torch.ops.bitpress, op).default._schema
    names = [a.name for a in schema.arguments]
    assert names == ["x", *kw, "bias", "act_dtype"], (names, list(kw))
    assert kw["layout"] == int(layout.layout)
