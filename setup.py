"""Builds the torch extension bitpress._C (CPU kernels always; CUDA kernels when possible).

Environment:
  BITPRESS_CUDA=0|1       0: CPU-only build. 1: CUDA required (error if no toolkit/CUDA torch).
                          Unset: CUDA when torch is a CUDA build and nvcc is found.
  TORCH_CUDA_ARCH_LIST    CUDA archs; default "8.0;9.0a" (Ampere mma.sync, Hopper wgmma).
  CUDA_HOME               CUDA toolkit; default /usr/local/cuda when it exists.
  MAX_JOBS                parallel compile jobs (ninja).
"""

import glob
import os
import site
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;9.0a"


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


def sm_names(arch_list: str) -> str:
    out = []
    for a in arch_list.replace(" ", ";").split(";"):
        a = a.strip().replace("+PTX", "")
        if a:
            out.append("sm_" + a.replace(".", ""))
    return ",".join(out)


def extension():
    with_cuda = want_cuda()
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: torch is built with OpenMP and at::parallel_for is a header template whose
    # `#pragma omp parallel` is compiled into this extension; without the flag it runs serially.
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "torch", "*.cpp")))
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not with_cuda:
        return cpp_extension.CppExtension(
            "bitpress._C",
            sources + cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    defines = ["-DBITPRESS_WITH_CUDA", f'-DBITPRESS_CUDA_ARCHS="{sm_names(arch_list)}"']
    nvcc = [
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-lineinfo",  # source lines in SASS dumps and profilers; no effect on the code
        "-Xfatbin=-compress-all",
    ]
    cpu_sources = [s for s in cpu_sources if not s.endswith("cuda_stubs.cpp")]
    return cpp_extension.CUDAExtension(
        "bitpress._C",
        sources + cpu_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
        include_dirs=include_dirs + cuda_header_dirs(),
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=[
        *find_packages("python"),  # bitpress and its feature packages
        "bitpress.triton_kernels",
    ],
    package_dir={"bitpress": "python/bitpress", "bitpress.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
