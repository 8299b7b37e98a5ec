"""Small cases of every registered op, for compute-sanitizer (``make gpu-check``).

Each case runs once on the chosen backend(s) and is compared with the op's reference; one line
per case, then ``N cases ok, M failed``. Exit status 1 if a case fails, or if a registered op has
no case that ran on a requested backend (a new op joins by itself: see :func:`cases`).

Where the cases come from, per registered op (bitpress._core.registry):
  1. ``spec.sanitizer_cases()`` where the OpSpec has that hook (small cases chosen for the
     sanitizer: every kernel path at the smallest shapes that reach it);
  2. otherwise its selftest cases (``spec.cases()`` and ``spec.gpu_cases()``) whose work
     (``Case.size``) is at most ``--max-work`` elements;
  3. plus the extra cases below (EXTRA), which cover the int4_gemm dispatch regimes of the CUDA
     glue at small shapes: split-K GEMV, the tiled kernel without split, 1/2/4 m16 tiles, the
     dense fallback (M > 64 and float32 x), act-order (perm) on each.

Run under the sanitizer on a GPU:
  compute-sanitizer --tool memcheck python scripts/sanitizer_cases.py --device cuda
and on the CPU (CI) to check that every case builds and agrees with the reference:
  python scripts/sanitizer_cases.py --device cpu --backends cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback

import torch

import bitpress
from bitpress import ops as _ops  # noqa: F401  (every op registers itself)
from bitpress._core import backends, registry
from bitpress._core import ext as _ext
from bitpress._core.registry import Case
from bitpress.testing import rel_err

DEFAULT_MAX_WORK = 2**20


def _int4_gemm_extra() -> list[Case]:
    """int4_gemm at small shapes, one per dispatch regime of csrc/int4/int4_gemm_cuda_torch.cpp
    (H100/H200: 132 SMs; S = int4_gemm_cuda_splits)."""
    from bitpress.int4 import cases as c

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    return [
        # split-K GEMV: 8 stages of 128 K-rows, 2 column blocks -> S = 4
        c._gemm_case(1, 1024, 256, f16, True, False, False),
        c._gemm_case(1, 1024, 256, bf16, False, True, True),  # + act-order gather, bias
        # two m16 tiles, split-K S = 2, ragged N
        c._gemm_case(20, 512, 129, bf16, False, False, True),
        # four m16 tiles (M = 64, the largest kernel M), K too short to split (S = 1)
        c._gemm_case(64, 256, 300, f16, True, True, True),
        c._gemm_case(33, 256, 72, f16, False, False, False),
        # dense fallback: M > 64 (dequantize + cuBLAS), and float32 x at any M
        c._gemm_case(65, 256, 129, f16, False, True, True),
        c._gemm_case(3, 384, 64, f32, True, False, True),
    ]


def _spec_verify_extra() -> list[Case]:
    from bitpress.speculative import cases as c

    return [c._case(3, 4, 5003, torch.bfloat16, False, True)]  # one-hot q, filters, odd V


# Extra small cases per op name (the registry's cases are chosen for speed, not for paths).
EXTRA = {"int4_gemm": _int4_gemm_extra, "spec_verify": _spec_verify_extra}


def cases(max_work: int = DEFAULT_MAX_WORK) -> dict[str, list[Case]]:
    """Small cases of every registered op, by op name (see the module docstring)."""
    out: dict[str, list[Case]] = {}
    for name, spec in registry.ops().items():
        hook = getattr(spec, "sanitizer_cases", None)
        if hook is not None:
            chosen = list(hook())
        else:
            chosen = [c for c in (*spec.cases(), *spec.gpu_cases()) if c.size <= max_work]
        if name in EXTRA:
            chosen += EXTRA[name]()
        seen, unique = set(), []
        for c in chosen:
            if c.name not in seen:
                seen.add(c.name)
                unique.append(dataclasses.replace(c, gpu_only=False))
        out[name] = unique
    return out


def _check(got, want, tol: float) -> tuple[bool, float]:
    if isinstance(want, tuple):  # several outputs (spec_verify): exact
        ok = all(torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want, strict=True))
        return ok, 0.0 if ok else float("nan")
    err = rel_err(got, want)
    ok = got.shape == want.shape and got.dtype == want.dtype
    ok = ok and (torch.equal(got.cpu(), want.cpu()) if tol == 0 else err <= tol)
    return ok, err


def run(device: torch.device, wanted: list[str], max_work: int, seed: int = 0) -> int:
    by_op = cases(max_work)
    archs = ", ".join(_ext.cuda_archs()) if _ext.with_cuda() else "not compiled"
    print(f"bitpress {bitpress.__file__} (torch {torch.__version__}; CUDA kernels: {archs})")
    n_ok = n_bad = 0
    for name, op_cases in by_op.items():
        ran = 0
        for backend in wanted:
            if backend not in backends.implementations(name):
                continue
            why = backends.refusal(name, backend, device)
            if why is not None:
                print(f"{name} [{backend}]: refused on {device}: {why}")
                continue
            impl = backends.select(name, device, backend)[1]
            for case in op_cases:
                args = case.make(device, torch.Generator().manual_seed(seed), backend)
                t0 = time.perf_counter()
                try:
                    got = impl(*args)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    want = case.ref(*args)
                    ok, err = _check(got, want, case.tol)
                    note = f"rel err {err:.2e}"
                except Exception as e:  # report and go on: the sanitizer reports the rest
                    traceback.print_exc()
                    ok, note = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                ms = (time.perf_counter() - t0) * 1e3
                print(
                    f"case {name} [{backend}] {case.name}: {'ok' if ok else 'FAIL'} "
                    f"({note}, {ms:.0f} ms)",
                    flush=True,
                )
                n_ok += ok
                n_bad += not ok
                ran += 1
        if ran == 0:
            print(f"{name}: no case ran on {', '.join(wanted)} ({device}): FAIL")
            n_bad += 1
    print(f"{n_ok} cases ok, {n_bad} failed")
    return 1 if n_bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="cuda", help="comma list (default cuda)")
    ap.add_argument("--max-work", type=int, default=DEFAULT_MAX_WORK)
    ap.add_argument("--list", action="store_true", help="list the cases, run nothing")
    args = ap.parse_args(argv)
    if args.list:
        for name, op_cases in cases(args.max_work).items():
            for c in op_cases:
                print(f"{name}: {c.name} (work {c.size})")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    return run(device, wanted, args.max_work)


if __name__ == "__main__":
    sys.exit(main())
