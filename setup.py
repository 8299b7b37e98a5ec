"""Builds the torch extension bitpress._C (CPU kernels always; CUDA kernels when possible).

Environment:
  BITPRESS_CUDA=0|1       0: CPU-only build. 1: CUDA required (error if no toolkit/CUDA torch).
                          Unset: CUDA when torch is a CUDA build and nvcc is found.
  TORCH_CUDA_ARCH_LIST    CUDA archs; default "8.0+PTX;9.0a" (Ampere mma.sync, Hopper wgmma).
                          Each .cu is compiled only for the listed archs it is written for:
                          `<op>_sm80.cu` for every listed arch >= 8.0, `<op>_sm90a.cu` only for
                          9.0a (skipped when 9.0a is not listed); see csrc/README.md. "+PTX"
                          also ships that arch's PTX (compute_80 by default), which the driver
                          JIT-compiles on GPUs no cubin fits (Blackwell sm_100 / sm_120): without
                          it every launch there fails with "no kernel image".
  CUDA_HOME               CUDA toolkit; default /usr/local/cuda when it exists.
  MAX_JOBS                parallel compile jobs (ninja).
"""

import glob
import os
import re
import site
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

# 8.0+PTX: sm_80 and sm_90a cubins, and compute_80 PTX for newer GPUs (forward compatibility;
# the sm_90a cubin runs on Hopper, arch-specific PTX such as compute_90a would run nowhere else).
DEFAULT_CUDA_ARCHS = "8.0+PTX;9.0a"


def want_cuda() -> bool:
    flag = os.environ.get("BITPRESS_CUDA", "").strip()
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not have:
        sys.exit(
            "BITPRESS_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return have


def cuda_header_dirs() -> list[str]:
    """Headers of the CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include.

    A minimal toolkit at CUDA_HOME lacks them; the pip `nvidia-*` wheels that come with a CUDA
    build of torch ship them under site-packages/nvidia/<cuXX>/include.
    """
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for pattern in ("nvidia/cu[0-9]*/include", "nvidia/cusparselt/include"):
            dirs += [d for d in sorted(glob.glob(os.path.join(sp, pattern))) if os.path.isdir(d)]
    return list(dict.fromkeys(dirs))


def parse_archs(arch_list: str) -> list[tuple[int, str, bool]]:
    """TORCH_CUDA_ARCH_LIST -> [(80, "", ptx), (90, "a", ptx)]: numeric arch, suffix, +PTX."""
    out = []
    for a in arch_list.replace(" ", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", a)
        if not m:
            sys.exit(f"TORCH_CUDA_ARCH_LIST: unsupported entry {a!r} (expected e.g. 8.0, 9.0a)")
        out.append((int(m[1] + m[2]), m[3], m[4] is not None))
    return out


def shipped_images(gencode: list[str]) -> list[str]:
    """The images a list of -gencode flags embeds: cubins ``sm_XY[a]`` and PTX ``compute_XY[a]``,
    in flag order (what bitpress._C.cuda_archs() reports; cuobjdump --list-elf / --list-ptx)."""
    out = []
    for flag in gencode:
        code = flag.split("code=")[-1]
        if code not in out:
            out.append(code)
    return out


def source_archs(path: str, archs: list[tuple[int, str, bool]]) -> list[tuple[int, str, bool]]:
    """The listed archs a CUDA source is compiled for, from its name `<op>_sm<NN>[a].cu`.

    `_sm80.cu`: every listed arch >= 8.0 (sm_90a included: arch-specific targets run portable
    code too). `_sm90a.cu` (arch-specific instructions: wgmma, setmaxnreg): 9.0a only.
    """
    m = re.search(r"_sm(\d+)([af]?)\.cu$", os.path.basename(path))
    if not m:
        sys.exit(f"{path}: a CUDA source must be named <op>_sm<NN>.cu or <op>_sm<NN>a.cu")
    num, sfx = int(m[1]), m[2]
    if sfx:
        return [a for a in archs if a[0] == num and a[1] == sfx]
    return [a for a in archs if a[0] >= num]


def gencode_flags(archs: list[tuple[int, str, bool]]) -> list[str]:
    flags = []
    for num, sfx, ptx in archs:
        flags.append(f"-gencode=arch=compute_{num}{sfx},code=sm_{num}{sfx}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num}{sfx},code=compute_{num}{sfx}")
    return flags


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with per-source CUDA archs.

    torch applies one -gencode set (from TORCH_CUDA_ARCH_LIST) to every .cu of an extension.
    Here the .cu sources are grouped by the archs their names ask for (source_archs); each group
    is compiled through the same (ninja) compiler and flags, plus its own -gencode flags (an
    explicit arch flag makes torch add none), into its own object folder, and the objects are
    linked into the extension.
    """

    def build_extension(self, ext):
        groups = getattr(ext, "cuda_arch_groups", {})
        objects = []
        for gencode, sources in groups.items():
            tag = "_".join(f.split("code=")[-1] for f in gencode)
            args = dict(ext.extra_compile_args)
            args["nvcc"] = list(args["nvcc"]) + list(gencode)
            objects += self.compiler.compile(
                sources,
                output_dir=os.path.join(self.build_temp, "cuda_" + tag),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=args,
                depends=ext.depends,
            )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def extension():
    with_cuda = want_cuda()
    # csrc: the private headers of the sources (common/, torch/glue.h); csrc/include: the API.
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # -fopenmp: torch is built with OpenMP and at::parallel_for is a header template whose
    # `#pragma omp parallel` is compiled into this extension; without the flag it runs serially.
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    # One folder per feature (csrc/<feature>/): kernels, torch glue and CUDA stubs. The stubs
    # (`*_cuda_stubs.cpp`) stand in for the CUDA entry points in a build without CUDA.
    sources = sorted(glob.glob(os.path.join("csrc", "*", "*.cpp")))
    if not with_cuda:
        return cpp_extension.CppExtension(
            "bitpress._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    archs = parse_archs(arch_list)
    groups: dict[tuple[str, ...], list[str]] = {}
    for cu in sorted(glob.glob(os.path.join("csrc", "*", "*.cu"))):
        gencode = tuple(gencode_flags(source_archs(cu, archs)))
        if gencode:  # e.g. an _sm90a.cu when 9.0a is not listed: not built
            groups.setdefault(gencode, []).append(cu)
    shipped = shipped_images([f for g in groups for f in g])
    defines = ["-DBITPRESS_WITH_CUDA", f'-DBITPRESS_CUDA_ARCHS="{",".join(shipped)}"']
    nvcc = [
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-lineinfo",  # source lines in SASS dumps and profilers; no effect on the code
        "-Xfatbin=-compress-all",
    ]
    sources = [s for s in sources if not s.endswith("_cuda_stubs.cpp")]
    ext = cpp_extension.CUDAExtension(
        "bitpress._C",
        sources,
        include_dirs=include_dirs + cuda_header_dirs(),
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        extra_link_args=["-fopenmp"],
    )
    ext.cuda_arch_groups = groups
    return ext


# Guarded so that tests can import the arch helpers above; `python setup.py ...` and pip's
# setuptools backend run this file as __main__.
if __name__ == "__main__":
    setup(
        packages=[
            *find_packages("python"),  # bitpress and its feature packages
            "bitpress.triton_kernels",
        ],
        package_dir={"bitpress": "python/bitpress", "bitpress.triton_kernels": "triton_kernels"},
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
