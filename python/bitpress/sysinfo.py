"""The machine and build, as ``python -m bitpress info`` prints them (and the report names)."""

from __future__ import annotations

import platform

import torch

import bitpress
from bitpress._core import backends, registry
from bitpress._core import ext as _ext


def info_lines() -> list[tuple[str, str]]:
    """What ``python -m bitpress info`` prints: versions, CPU features and kernel path, CUDA
    archs, backends, and the usable backends of every op per device, as (name, value) pairs."""

    lines = [
        ("bitpress", bitpress.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
    ]
    try:
        import triton

        lines.append(("triton", triton.__version__))
    except ImportError:
        lines.append(("triton", "not installed"))
    lines += [
        ("CPU", _cpu_name()),
        ("CPU features", _ext.C.cpu_features() or "(none detected)"),
        ("CPU kernel path", f"{_ext.C.cpu_isa()} (best: {_ext.C.best_cpu_isa()})"),
        (
            "int4_gemm CPU path",
            f"{_ext.C.int4_cpu_path(None)} (fused kernel or decode + dense GEMM, measured per "
            "M bucket at first use; BITPRESS_INT4_CPU_PATH=auto|fused|dense)",
        ),
        ("threads", str(torch.get_num_threads())),
        ("CUDA kernels", ", ".join(_ext.cuda_archs()) if _ext.with_cuda() else "not compiled"),
        ("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("backends", ", ".join(backends.available_backends())),
        ("forced backend", backends.forced_backend() or "none (best per device)"),
    ]
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    for name, spec in registry.ops().items():
        per_device = []
        for dev in devices:
            order = backends.default_order(dev)
            ranked = sorted(
                backends.implementations(name),
                key=lambda b: order.index(b) if b in order else len(order),
            )
            usable = [b for b in ranked if not backends.refusal(name, b, dev)]
            per_device.append(f"{dev}: {' > '.join(usable) or 'none'}")
        lines.append((f"op {name}", f"[{spec.feature}] " + "; ".join(per_device)))
    return lines


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()
