"""Shared benchmark utilities: the machine's read bandwidth (measured once per run), timing of
baselines, the bytes/FLOPs floor, and the result table (markdown on stdout, CSV in
bench/results/).

CPU figures are ratios against what this machine measures in the same run. GPU figures are
printed beside the H100 floor (3.35 TB/s HBM3, ~990 TFLOP/s dense bf16, ~1980 fp8).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch

from bitpress.report.measure import last_level_cache_bytes

H100_BYTES_PER_S = 3.35e12
H100_BF16_FLOPS = 990e12
H100_FP8_FLOPS = 1980e12

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def sync(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Rotating:
    """Cycles through copies of the arguments of a call so that, in total, they exceed twice the
    last-level cache (``min_bytes``, by default from sysfs; at least 256 MiB): each call then
    streams its operands from DRAM, as a decode step does with weights no other layer has touched
    since the previous token. (The earlier default, 16 copies and 256 MiB, stayed inside the 480
    MiB L3 of the Intel machines: warm, not cold.)"""

    def __init__(self, make, nbytes: int, min_bytes: int | None = None, max_copies: int = 4096):
        if min_bytes is None:
            min_bytes = max(256 * 2**20, 2 * last_level_cache_bytes() + 64 * 2**20)
        n = max(1, min(max_copies, -(-min_bytes // max(nbytes, 1))))
        self.items = [make() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def timeit(fn: Callable[[], object], device="cpu", min_time=0.2, min_reps=5, warmup=2) -> float:
    """Median seconds per call of ``fn`` (after warm-up), over at least ``min_reps`` calls and
    ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_timeit(fn: Callable[[], object], reps: int = 50, rounds: int = 5) -> float:
    """Median over ``rounds`` of (CUDA-event time of ``reps`` back-to-back calls) / ``reps``.

    Kernels of a few microseconds are shorter than a launch + host sync, so timing single calls
    with a host clock measures the launch path; back-to-back launches keep the GPU busy and the
    events time the GPU alone (launch overhead hidden when a call is longer than its launch)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e-3 / reps)
    return statistics.median(per_call)


@functools.cache
def read_bandwidth(device: str = "cpu") -> float:
    """Bytes per second this machine reads with torch's threads (a reduction over 1 GiB, far
    beyond the caches; best of 5)."""
    x = torch.ones(2**28, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best


@dataclasses.dataclass
class Row:
    bench: str
    case: str
    seconds: float
    bytes: int
    flops: int
    baseline: str
    baseline_seconds: float
    device: str = "cpu"

    @property
    def floor_seconds(self) -> float:
        if self.device == "cuda":
            return max(self.bytes / H100_BYTES_PER_S, self.flops / H100_BF16_FLOPS)
        return self.bytes / read_bandwidth("cpu")

    def as_dict(self) -> dict[str, object]:
        return {
            "bench": self.bench,
            "case": self.case,
            "device": self.device,
            "time_ms": round(self.seconds * 1e3, 4),
            "MB": round(self.bytes / 1e6, 3),
            "GFLOP": round(self.flops / 1e9, 3),
            "GB/s": round(self.bytes / self.seconds / 1e9, 2),
            "floor_ms": round(self.floor_seconds * 1e3, 4),
            "of_floor": f"{self.floor_seconds / self.seconds:.0%}",
            "baseline": self.baseline,
            "baseline_ms": round(self.baseline_seconds * 1e3, 4),
            "speedup": f"{self.baseline_seconds / self.seconds:.2f}x",
        }


ROWS: list[Row] = []


def record(row: Row, benchmark=None) -> Row:
    ROWS.append(row)
    if benchmark is not None:
        benchmark.extra_info.update(row.as_dict())
    return row


def table(rows: list[Row]) -> str:
    if not rows:
        return ""
    dicts = [r.as_dict() for r in rows]
    keys = list(dicts[0])
    widths = {k: max(len(k), *(len(str(d[k])) for d in dicts)) for k in keys}
    lines = [
        "| " + " | ".join(k.ljust(widths[k]) for k in keys) + " |",
        "|" + "|".join("-" * (widths[k] + 2) for k in keys) + "|",
    ]
    lines += ["| " + " | ".join(str(d[k]).ljust(widths[k]) for k in keys) + " |" for d in dicts]
    return "\n".join(lines)


def write_results(rows: list[Row]) -> list[str]:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    paths = []
    for bench in sorted({r.bench for r in rows}):
        path = os.path.join(RESULTS_DIR, f"{bench}.csv")
        sel = [r.as_dict() for r in rows if r.bench == bench]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(sel[0]))
            w.writeheader()
            w.writerows(sel)
        paths.append(path)
    return paths


def seconds_of(benchmark) -> float:
    """Median seconds per call measured by pytest-benchmark."""
    return benchmark.stats.stats.median
