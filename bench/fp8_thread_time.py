"""CPU time of one call on one thread: F.linear bf16 against fp8_weight_gemm (per-channel
scales), cold weights, interleaved rounds; prints min / median ms and the median ratio.

On a machine shared with other jobs, wall times of 2-thread calls swing with the load (other
processes take the cores); the CPU time of the calling thread with torch.set_num_threads(1)
counts only the time the call ran, so ratios between variants stay comparable (memory
bandwidth taken by the other jobs still slows both). bench/cold_compare.py gives the 2-thread
wall times that the issue's targets are stated in; use this one to compare variants under load.

  PYTHONPATH=python python bench/fp8_thread_time.py 4096 14336 16,512 [--rounds 8]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import bitpress

LIMIT = 1000 * 2**20  # bytes rotated per variant: over twice the L3 of the Intel machines


def main(argv):
    K, N = int(argv[1]), int(argv[2])
    ms = [int(m) for m in argv[3].split(",")]
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 8
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = torch.randn(N, K, dtype=torch.bfloat16) / K**0.5
    q, s = bitpress.ops.fp8_quantize(w, granularity="channel")
    wr = [w.clone() for _ in range(max(2, -(-LIMIT // (w.numel() * 2))))]
    qr = [(q.clone(), s.clone()) for _ in range(max(2, -(-LIMIT // q.numel())))]
    with torch.inference_mode():
        for M in ms:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            ts = {"F.linear bf16": [], "fp8_weight_gemm": []}
            for r in range(rounds + 1):
                t0 = time.thread_time()
                F.linear(x, wr[r % len(wr)])
                t1 = time.thread_time()
                bitpress.ops.fp8_weight_gemm(x, *qr[r % len(qr)])
                t2 = time.thread_time()
                if r:  # round 0 warms up
                    ts["F.linear bf16"].append((t1 - t0) * 1e3)
                    ts["fp8_weight_gemm"].append((t2 - t1) * 1e3)
            base = statistics.median(ts["F.linear bf16"])
            cells = [
                f"{k} {min(v):.2f} / {statistics.median(v):.2f} "
                f"({base / statistics.median(v):.2f}x)"
                for k, v in ts.items()
            ]
            print(f"K={K} N={N} M={M}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv)
