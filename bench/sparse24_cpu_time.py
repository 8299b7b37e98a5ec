"""One-thread CPU-time variant of cold_compare.py for the 2:4 layers: F.linear bf16, Int4Linear
(group 128), Sparse24Linear and Sparse24Int4Linear (magnitude 2:4, group 128), bf16 x, cold (each
variant rotates > 1000 MiB of copies), interleaved per round, timed with time.thread_time() on one
thread, so that time slicing by other processes on a shared machine does not count (memory
bandwidth and caches still do). Prints min / median (ms) and the median ratio against F.linear,
and against Int4Linear for Sparse24Int4Linear.

  PYTHONPATH=python python bench/sparse24_cpu_time.py 4096 14336 1,16,128,512 [rounds]
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn as nn

import bitpress

LIMIT = 1000 * 2**20


def layer_bytes(m: nn.Module) -> int:
    ts = list(m.parameters()) + list(m.buffers())
    return sum(t.numel() * t.element_size() for t in ts)


def main(argv):
    K, N = int(argv[1]), int(argv[2])
    ms = [int(m) for m in argv[3].split(",")]
    rounds = int(argv[4]) if len(argv) > 4 else 4
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False).to(torch.bfloat16)
    layers = {
        "F.linear bf16": lin,
        "Int4Linear": bitpress.Int4Linear.from_linear(lin, group_size=128),
        "Sparse24Linear": bitpress.Sparse24Linear.from_linear(lin, "magnitude"),
        "Sparse24Int4Linear": bitpress.Sparse24Int4Linear.from_linear(lin, "magnitude"),
    }
    rot = {
        k: [copy.deepcopy(v) for _ in range(max(2, -(-LIMIT // layer_bytes(v))))]
        for k, v in layers.items()
    }
    print(f"\n{K} x {N}, 1 thread, CPU ms min / median (median ratio vs F.linear)")
    print("\n| M | " + " | ".join(layers) + " |")
    print("|---|" + "---|" * len(layers))
    with torch.inference_mode():
        for M in ms:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            ts = {k: [] for k in layers}
            for r in range(rounds + 1):
                for k in layers:
                    layer = rot[k][r % len(rot[k])]
                    t0 = time.thread_time()
                    layer(x)
                    if r:  # round 0 warms up
                        ts[k].append((time.thread_time() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in ts.items()}
            base = med["F.linear bf16"]
            cells = [f"{min(v):.2f} / {med[k]:.2f} ({base / med[k]:.2f}x)" for k, v in ts.items()]
            cells[-1] += f" [{med['Int4Linear'] / med['Sparse24Int4Linear']:.2f}x int4]"
            print(f"| {M} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv)
