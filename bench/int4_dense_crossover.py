"""Where int4_gemm's dense CPU path (decode into a reused workspace + oneDNN GEMM) overtakes the
fused kernel, on this CPU: the data behind the auto mode of csrc/int4/int4_gemm_dense_torch.cpp.

For each Llama-3-8B shape and M: the fused path, the dense path and F.linear bf16 (the dense GEMM
alone, without the decode), interleaved one call each per round, min over rounds; then what the
auto mode chose for the same calls (it measures at the first call of each M bucket). Weights are
warm (one copy): from M = 64 on both paths are compute-bound, and the 29 MB weight read costs
~1 ms, the same for both. Prints a markdown table. Usage: python bench/int4_dense_crossover.py
[rounds] [M,M,...]."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from bitpress import ops
from bitpress._core import ext
from bitpress.int4 import layout as int4_layout
from bitpress.int4.rtn import rtn_quantize

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    ms = (
        [int(m) for m in sys.argv[2].split(",")]
        if len(sys.argv) > 2
        else [64, 128, 256, 512, 1024, 2048]
    )
    torch.set_num_threads(2)
    print(f"CPU path: {ext.C.cpu_isa()}; threads: {torch.get_num_threads()}\n")
    print("| K x N | M | fused ms | dense ms | F.linear bf16 ms | dense / fused | auto picks |")
    print("|---|---|---|---|---|---|---|")
    for K, N in SHAPES:
        w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
        p = int4_layout.pack(rtn_quantize(w, 128, sym=True))
        for M in ms:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            best = {"fused": 1e9, "dense": 1e9, "linear": 1e9}
            for _ in range(rounds + 1):  # the first round warms the workspaces up
                for mode in ("fused", "dense", "linear"):
                    if mode != "linear":
                        ext.C.int4_cpu_path(mode)
                    t0 = time.perf_counter()
                    if mode == "linear":
                        F.linear(x, w)
                    else:
                        ops.int4_gemm(x, p)
                    best[mode] = min(best[mode], time.perf_counter() - t0)
            ext.C.int4_cpu_path("auto")
            ext.C.int4_cpu_path_choices(True)
            ops.int4_gemm(x, p)
            pick = ext.C.int4_cpu_path_choices(True)
            pick = pick[0].split(": ")[1].split(" ")[0] if pick else "fused (M < 64)"
            f, d, lin = (best[k] * 1e3 for k in ("fused", "dense", "linear"))
            print(f"| {K} x {N} | {M} | {f:.2f} | {d:.2f} | {lin:.2f} | {d / f:.2f} | {pick} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
