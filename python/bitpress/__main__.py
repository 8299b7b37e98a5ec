"""``python -m bitpress info | selftest``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import bitpress
from bitpress import demo as demo_mod
from bitpress import selftest
from bitpress._core import backends, registry
from bitpress._core import ext as _ext


def info() -> int:

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
        ("CPU", platform.processor() or platform.machine()),
        ("CPU features", _ext.C.cpu_features() or "(none detected)"),
        ("CPU kernel path", f"{_ext.C.cpu_isa()} (best: {_ext.C.best_cpu_isa()})"),
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
            usable = [
                b for b in backends.implementations(name) if not backends.refusal(name, b, dev)
            ]
            per_device.append(f"{dev}: {' > '.join(usable) or 'none'}")
        lines.append((f"op {name}", f"[{spec.feature}] " + "; ".join(per_device)))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitpress")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, CPU features, CUDA archs, available backends")
    sub.add_parser("selftest", help="every op on every available backend against the reference")
    demo = sub.add_parser("demo", help="INT4 quantization of a small Llama model, end to end")
    demo.add_argument("--steps", type=int, default=300, help="training steps of the demo model")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return info()
    if args.cmd == "demo":
        return demo_mod.main(args.steps)
    return selftest.main()


if __name__ == "__main__":
    sys.exit(main())
