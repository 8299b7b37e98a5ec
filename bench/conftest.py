"""pytest-benchmark configuration: run with `make bench` (pytest bench --benchmark-only -s).

At the end of the session the rows recorded by the benchmarks are printed as a markdown table
with the read bandwidth measured in this run, and written as CSV to bench/results/.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

import bench_util  # noqa: E402


def pytest_configure(config):
    # Benchmarks run with the machine's threads as a user would; report what that was.
    config.bitpress_threads = torch.get_num_threads()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = bench_util.ROWS
    if not rows:
        return
    tr = terminalreporter
    bw = bench_util.read_bandwidth("cpu")
    tr.write_line("")
    tr.write_line(
        f"bitpress benchmarks: {torch.get_num_threads()} threads, "
        f"measured read bandwidth {bw / 1e9:.1f} GB/s"
    )
    tr.write_line(bench_util.table(rows))
    for p in bench_util.write_results(rows):
        tr.write_line(f"wrote {p}")
