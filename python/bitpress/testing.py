"""Helpers for tests and the selftest: tolerances, error metrics, output poisoning, and the
machine-code checks that verify GPU code without a GPU.

GPU code checks (no driver needed):

* :func:`compile_triton` compiles a Triton kernel ahead of time for a GPU target (sm_80, sm_90)
  and returns its PTX, SASS and resource usage.
* :func:`extension_sass` lists the SASS instructions of a function in the built bitpress._C for
  one arch, and :func:`extension_resource_usage` its registers / stack / local memory.

Both use ``cuobjdump`` (shipped in the triton package; /usr/local/cuda/bin otherwise).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import torch

from bitpress._core import ext as _ext

try:  # triton is optional
    from bitpress.triton_kernels._runtime import jit_function
except ImportError:  # pragma: no cover
    jit_function = None

# Relative-error bounds (‖out − ref‖ / ‖ref‖) for results rounded once to the dtype.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere gives NaN)."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖x‖² / ‖x − x̂‖²) in dB."""
    x, x_hat = x.double(), x_hat.double()
    noise = (x - x_hat).pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * torch.log10(x.pow(2).sum() / noise).item()


@contextlib.contextmanager
def poisoned_outputs(on: bool = True) -> Iterator[None]:
    """Ops fill their outputs with NaN / most-negative integers before kernels write them."""

    prev = _ext.C.set_poison_outputs(on)
    try:
        yield
    finally:
        _ext.C.set_poison_outputs(prev)


# --------------------------------------------------------------------------------------------
# Machine code
# --------------------------------------------------------------------------------------------


@functools.cache
def cuobjdump() -> str | None:
    """Path of cuobjdump: the copy inside the triton package, else the CUDA toolkit's."""
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(p, os.X_OK):
            return p
    except ImportError:
        pass
    for cand in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


@functools.cache
def nvcc() -> str | None:
    """Path of nvcc: the one on PATH, else /usr/local/cuda's; None when there is none."""
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "csrc")


@functools.cache
def compile_cuda(
    source: str, gencode: str
) -> tuple[dict[str, list[str]], dict[str, ResourceUsage]]:
    """A torch-free CUDA source compiled standalone with nvcc (the build's language flags and
    include paths; seconds, no GPU and no CUDA build of bitpress._C needed) for one ``gencode``
    (``"arch=compute_80,code=sm_80"``), read back with cuobjdump: ({mangled function: SASS
    mnemonics}, {mangled function: ResourceUsage}). Cached per process."""
    with tempfile.TemporaryDirectory(prefix="bitpress_cubin_") as tmp:
        path = os.path.join(tmp, "out.cubin")
        cmd = [nvcc(), "-std=c++20", "--expt-relaxed-constexpr", "-O3", "-I"]
        cmd += [os.path.join(_CSRC, "include"), "-I", _CSRC, "-gencode", gencode]
        _run(cmd + ["-cubin", "-o", path, source])
        sass = _run([cuobjdump(), "--dump-sass", path])
        res = _run([cuobjdump(), "--dump-resource-usage", path])
    return _split_sass_functions(sass), _parse_resource_usage(res)


def _run(args: list[str]) -> str:
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


@dataclasses.dataclass
class ResourceUsage:
    registers: int
    stack: int
    local: int
    shared: int


_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _parse_resource_usage(text: str) -> dict[str, ResourceUsage]:
    out: dict[str, ResourceUsage] = {}
    func = None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        m = _RES_RE.search(line)
        if m and func:
            reg, stack, shared, local = (int(v) for v in m.groups())
            out[func] = ResourceUsage(reg, stack, local, shared)
            func = None
    return out


def _split_sass_functions(text: str) -> dict[str, list[str]]:
    """cuobjdump --dump-sass output -> {mangled function name: [instruction mnemonics with
    modifiers, e.g. 'HMMA.16816.F32.BF16']}."""
    funcs: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and cur is not None:
            cur.append(m.group(1))
    return funcs


def extension_path() -> str:

    return _ext.C.__file__


def extension_archs() -> list[str]:
    """SM archs with SASS in bitpress._C (e.g. ['sm_80', 'sm_90a'])."""
    text = _run([cuobjdump(), "--list-elf", extension_path()])
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", text)))


@functools.cache
def _extension_sass(arch: str) -> dict[str, list[str]]:
    return _split_sass_functions(
        _run([cuobjdump(), "--dump-sass", "--gpu-architecture", arch, extension_path()])
    )


def extension_sass(function: str, arch: str) -> dict[str, list[str]]:
    """SASS instructions of every function of bitpress._C whose mangled name contains
    ``function``, for ``arch`` ('sm_80', 'sm_90a')."""
    return {k: v for k, v in _extension_sass(arch).items() if function in k}


@functools.cache
def _extension_resources(arch: str) -> dict[str, ResourceUsage]:
    return _parse_resource_usage(
        _run([cuobjdump(), "--dump-resource-usage", "--gpu-architecture", arch, extension_path()])
    )


def extension_resource_usage(function: str, arch: str) -> dict[str, ResourceUsage]:
    """Registers, stack, local and shared memory of the matching functions of bitpress._C."""
    return {k: v for k, v in _extension_resources(arch).items() if function in k}


@dataclasses.dataclass
class TritonAsm:
    name: str
    ptx: str
    sass: list[str]  # instruction mnemonics
    resources: ResourceUsage | None
    spills: int  # bytes spilled, as ptxas reported them (n_spills in the metadata)


def compile_triton(
    kernel,
    signature: dict[str, str],
    constexprs: dict[str, object],
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    isolated: bool = True,
) -> TritonAsm:
    """Compile a Triton kernel ahead of time for ``sm_<arch>`` (no GPU needed).

    ``signature`` maps every non-constexpr argument to a Triton type ('*fp16', 'i32', ...);
    ``constexprs`` gives the constexpr arguments. Returns PTX, SASS mnemonics and resources.

    ``isolated`` (default) compiles in a fresh Python process: the Triton interpreter, which the
    tests also run in this process, patches ``triton.language`` while kernels execute, and a
    compile must never see that state.
    """
    fn = getattr(kernel, "fn", kernel)
    if isolated:
        job = {
            "module": fn.__module__,
            "name": fn.__name__,
            "signature": signature,
            "constexprs": constexprs,
            "arch": arch,
            "num_warps": num_warps,
            "num_stages": num_stages,
        }
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "job.json")
            with open(path, "w") as f:
                json.dump(job, f)
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            res = subprocess.run(
                [sys.executable, "-m", "bitpress.testing", path],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                raise RuntimeError(f"compiling {fn.__name__} for sm_{arch} failed:\n{res.stderr}")
            with open(path) as f:
                out = json.load(f)
        return _triton_asm(out["name"], out["ptx"], base64.b64decode(out["cubin"]), out["spills"])

    compiled = _compile(kernel, signature, constexprs, arch, num_warps, num_stages)
    return _triton_asm(
        compiled.metadata.name,
        compiled.asm["ptx"],
        compiled.asm["cubin"],
        int(getattr(compiled.metadata, "n_spills", 0) or 0),
    )


def _compile(kernel, signature, constexprs, arch, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(kernel)
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def _triton_asm(name: str, ptx: str, cubin: bytes, spills: int) -> TritonAsm:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = _split_sass_functions(_run([cuobjdump(), "--dump-sass", f.name]))
        res = _parse_resource_usage(_run([cuobjdump(), "--dump-resource-usage", f.name]))
    return TritonAsm(
        name=name, ptx=ptx, sass=sass.get(name, []), resources=res.get(name), spills=spills
    )


def _compile_job(path: str) -> None:
    """Entry point of the isolated compile (``python -m bitpress.testing job.json``)."""
    import importlib

    with open(path) as f:
        job = json.load(f)
    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    c = _compile(
        kernel,
        job["signature"],
        job["constexprs"],
        job["arch"],
        job["num_warps"],
        job["num_stages"],
    )
    out = {
        "name": c.metadata.name,
        "ptx": c.asm["ptx"],
        "cubin": base64.b64encode(c.asm["cubin"]).decode(),
        "spills": int(getattr(c.metadata, "n_spills", 0) or 0),
    }
    with open(path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    _compile_job(sys.argv[1])
