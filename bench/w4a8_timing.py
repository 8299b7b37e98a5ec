"""Cold same-run timing of W4A8 int4_gemm vs the exact (bf16-activation) int4 path vs F.linear bf16.

Each variant rotates its own weight copies, > 1000 MiB per variant (more than twice the reported
L3 of 480-504 MiB), rounds interleave one call per variant, min over rounds. Prints a markdown
table. Usage: python bench/w4a8_timing.py [rounds]."""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from bitpress import ops
from bitpress.int4 import layout as int4_layout
from bitpress.int4.rtn import rtn_quantize

MIB = 1 << 20


def copies_for(nbytes):
    return max(2, -(-1100 * MIB // nbytes))


def packed_bytes(p):
    return sum(t.numel() * t.element_size() for t in p.op_args() if isinstance(t, torch.Tensor))


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    torch.set_num_threads(2)
    big = torch.ones(256 * MIB // 2, dtype=torch.bfloat16)
    big.sum()
    t0 = time.perf_counter()
    big.sum()
    bw = big.numel() * 2 / (time.perf_counter() - t0) / 1e9
    print(f"read bandwidth probe (bf16 sum of 256 MiB): {bw:.1f} GB/s\n")
    print(
        "| K x N | M | W4A8 ms | int4 bf16 ms | F.linear bf16 ms | W4A8 vs F.linear | "
        "W4A8 vs int4 bf16 |"
    )
    print("|---|---|---|---|---|---|---|")
    for K, N in [(4096, 4096), (4096, 14336)]:
        w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
        p = int4_layout.pack(rtn_quantize(w, 128, sym=True))
        nq, nd = copies_for(packed_bytes(p)), copies_for(w.numel() * 2)

        def cp(p=p):
            return dataclasses.replace(p, qweight=p.qweight.clone(), scales=p.scales.clone())

        qs = [cp() for _ in range(nq)]
        q8 = [cp() for _ in range(nq)]
        ds = [w.clone() for _ in range(nd)]
        for M in (1, 16, 128):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            fns = {
                "w4a8": (q8, lambda wt, x=x: ops.int4_gemm(x, wt, act_dtype=torch.int8)),
                "int4": (qs, lambda wt, x=x: ops.int4_gemm(x, wt)),
                "dense": (ds, lambda wt, x=x: F.linear(x, wt)),
            }
            best = {k: float("inf") for k in fns}
            idx = {k: 0 for k in fns}
            for ws, f in fns.values():
                f(ws[0])
            for _ in range(rounds):
                for k, (ws, f) in fns.items():
                    wt = ws[idx[k] % len(ws)]
                    idx[k] += 1
                    t0 = time.perf_counter()
                    f(wt)
                    best[k] = min(best[k], time.perf_counter() - t0)
            b = {k: v * 1e3 for k, v in best.items()}
            print(
                f"| {K} x {N} | {M} | {b['w4a8']:.2f} | {b['int4']:.2f} | {b['dense']:.2f} | "
                f"{b['dense'] / b['w4a8']:.2f}x | {b['int4'] / b['w4a8']:.2f}x |",
                flush=True,
            )
        del qs, q8, ds


if __name__ == "__main__":
    main()
