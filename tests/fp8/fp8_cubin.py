"""Machine code of the FP8 CUDA sources without a GPU and without a CUDA build of bitpress._C:
each ``csrc/fp8/*_sm80.cu`` compiled standalone with nvcc (torch-free sources: seconds) for sm_80
and sm_90a, read back with cuobjdump (the copy inside the triton package). Cached per session."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile

from bitpress.testing import ResourceUsage, cuobjdump, nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
ARCHS = ["sm_80", "sm_90a"]


def available() -> bool:
    return nvcc() is not None and cuobjdump() is not None


@functools.cache
def _tmpdir() -> str:
    return tempfile.mkdtemp(prefix="bitpress_fp8_cubin_")


@functools.cache
def cubin(source: str, arch: str) -> str:
    """Path of ``csrc/fp8/<source>`` compiled for ``arch`` with the build's nvcc flags."""
    num = arch[3:]
    out = os.path.join(_tmpdir(), f"{os.path.basename(source)}.{arch}.cubin")
    cmd = [
        nvcc(),
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-O3",
        "-I",
        os.path.join(CSRC, "include"),
        "-I",
        CSRC,
        f"-gencode=arch=compute_{num},code={arch}",
        "-cubin",
        "-o",
        out,
        os.path.join(CSRC, "fp8", source),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} for {arch}:\n{res.stderr}")
    return out


@functools.cache
def sass_lines(source: str, arch: str) -> dict[str, list[str]]:
    """{mangled function: its SASS instructions with operands, in address order}."""
    text = subprocess.run(
        [cuobjdump(), "--dump-sass", cubin(source, arch)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    funcs: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([^;]*);", line)
        if m and cur is not None:
            cur.append(" ".join(m.group(1).split()))
    return funcs


def sass(source: str, arch: str, function: str) -> dict[str, list[str]]:
    """{function: [mnemonics with modifiers]} of the functions whose name contains ``function``."""
    return {
        k: [i.split()[0] for i in v if i]
        for k, v in sass_lines(source, arch).items()
        if function in k
    }


@functools.cache
def _resources(source: str, arch: str) -> dict[str, ResourceUsage]:
    text = subprocess.run(
        [cuobjdump(), "--dump-resource-usage", cubin(source, arch)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out: dict[str, ResourceUsage] = {}
    func = None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and func:
            reg, stack, shared, local = (int(v) for v in m.groups())
            out[func] = ResourceUsage(reg, stack, local, shared)
            func = None
    return out


def resources(source: str, arch: str, function: str) -> dict[str, ResourceUsage]:
    return {k: v for k, v in _resources(source, arch).items() if function in k}
