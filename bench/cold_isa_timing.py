"""int4_gemm on each CPU kernel path against F.linear bf16 and torch's int4 op, cold and
interleaved (the AMX tables of bench/NOTES.md).

Every variant rotates its own copies of the weights (more than 1000 MiB per variant: over twice
the 480 MiB L3 of the Intel machines); each round calls every variant once, so a burst of load
from other processes hits all of them alike. Prints min and median per variant, and the read
floor (packed int4 bytes / bandwidth measured in this run).

  PYTHONPATH=python python bench/cold_isa_timing.py 4096 14336 1,16,128,512 amx,avx512 --tq
  THREADS=1 ...   (torch.set_num_threads(1))
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from bench_int4_gemm import _weights
from bench_util import read_bandwidth

from bitpress import _ext, ops


def main(argv):
    K, N = int(argv[1]), int(argv[2])
    ms = [int(m) for m in argv[3].split(",")]
    isas = [i for i in argv[4].split(",") if i] if len(argv) > 4 else []
    want_tq = "--tq" in argv
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 6
    if os.environ.get("THREADS"):
        torch.set_num_threads(int(os.environ["THREADS"]))
    bw = read_bandwidth()
    print(f"read bandwidth {bw / 1e9:.1f} GB/s, threads {torch.get_num_threads()}", flush=True)
    packed, dense, tq, sz = _weights(K, N)
    lim = 1000 * 2**20

    def copies(make, nbytes):
        return [make() for _ in range(max(2, -(-lim // nbytes)))]

    def copy_packed():
        return dataclasses.replace(
            packed, qweight=packed.qweight.clone(), scales=packed.scales.clone()
        )

    rot = {isa: copies(copy_packed, packed.nbytes) for isa in isas}
    dense_r = copies(dense.clone, dense.numel() * 2)
    tq_r = copies(lambda: (tq.clone(), sz.clone()), tq.numel() + sz.numel() * 2) if want_tq else []
    for M in ms:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        fns = {}
        for isa in isas:
            if isa == "avx512" and M > 128:
                continue  # 5-7x slower than the AMX path there: minutes per shape

            def f(i, isa=isa, x=x):
                _ext.C.set_cpu_isa(isa)
                ops.int4_gemm(x, rot[isa][i % len(rot[isa])])

            fns[isa] = f
        fns["F.linear"] = lambda i, x=x: F.linear(x, dense_r[i % len(dense_r)])
        if want_tq and M <= 16:

            def int4pack(i, x=x):
                w, s = tq_r[i % len(tq_r)]
                torch._weight_int4pack_mm_for_cpu(x, w, 128, s)

            fns["int4pack"] = int4pack
        ts = {k: [] for k in fns}
        for r in range(rounds + 1):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(r)
                if r:  # round 0 warms up
                    ts[k].append((time.perf_counter() - t0) * 1e3)
        _ext.C.set_cpu_isa(None)
        out = [f"{k} min {min(v):.2f} med {statistics.median(v):.2f}" for k, v in ts.items()]
        out.append(f"floor {packed.nbytes / bw * 1e3:.2f} (packed {packed.nbytes / 1e6:.1f} MB)")
        print(f"K={K} N={N} M={M} | " + " | ".join(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv)
