"""Cold, interleaved timing of bitpress's compressed Linear layers against F.linear bf16 on one
shape, bf16 activations: Int4Linear (RTN, group 128), Fp8Linear weight-only and W8A8 dynamic
(per-channel scales), Sparse24Linear and Sparse24Int4Linear (magnitude 2:4, group 128): the
tables of bench/NOTES.md for issues 11 and 12.

Every variant rotates its own copies of the layer (more than 1000 MiB per variant: over twice the
480 MiB L3 of the Intel machines), and each round calls every variant once, so a burst of load
from other processes hits all of them alike. Prints min / median per variant (ms), and each
variant's read floor (its weight bytes / the read bandwidth measured in this run).

  PYTHONPATH=python python bench/cold_compare.py 4096 14336 1,16,128,512 [--rounds 6]
      [--only Sparse24Linear,Int4Linear]   (F.linear bf16, the baseline, always runs)
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
from bench_util import read_bandwidth

import bitpress

LIMIT = 1000 * 2**20


def layer_bytes(m: nn.Module) -> int:
    ts = list(m.parameters()) + list(m.buffers())
    return sum(t.numel() * t.element_size() for t in ts)


def main(argv):
    K, N = int(argv[1]), int(argv[2])
    ms = [int(m) for m in argv[3].split(",")]
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 6
    bw = read_bandwidth()
    print(f"read bandwidth {bw / 1e9:.1f} GB/s, threads {torch.get_num_threads()}", flush=True)
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False).to(torch.bfloat16)
    layers = {
        "F.linear bf16": lin,
        "Int4Linear": bitpress.Int4Linear.from_linear(lin, group_size=128),
        "Fp8Linear w-only": bitpress.Fp8Linear.from_linear(lin, "channel", None),
        "Fp8Linear W8A8": bitpress.Fp8Linear.from_linear(lin, "channel", "dynamic"),
        "Sparse24Linear": bitpress.Sparse24Linear.from_linear(lin, "magnitude"),
        "Sparse24Int4Linear": bitpress.Sparse24Int4Linear.from_linear(lin, "magnitude"),
    }
    if "--only" in argv:
        keep = set(argv[argv.index("--only") + 1].split(",")) | {"F.linear bf16"}
        layers = {k: v for k, v in layers.items() if k in keep}
    rot, floor = {}, {}
    for name, layer in layers.items():
        size = layer_bytes(layer)
        floor[name] = size / bw * 1e3
        rot[name] = [copy.deepcopy(layer) for _ in range(max(2, -(-LIMIT // size)))]
    print("\n| M | " + " | ".join(layers) + " |")
    print("|---|" + "---|" * len(layers))
    with torch.inference_mode():
        for M in ms:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            ts = {k: [] for k in layers}
            for r in range(rounds + 1):
                for k in layers:
                    layer = rot[k][r % len(rot[k])]
                    t0 = time.perf_counter()
                    layer(x)
                    if r:  # round 0 warms up
                        ts[k].append((time.perf_counter() - t0) * 1e3)
            base = statistics.median(ts["F.linear bf16"])
            cells = [
                f"{min(v):.2f} / {statistics.median(v):.2f} ({base / statistics.median(v):.2f}x)"
                for v in ts.values()
            ]
            print(f"| {M} | " + " | ".join(cells) + " |", flush=True)
    print("\nread floors (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in floor.items()))


if __name__ == "__main__":
    main(sys.argv)
