"""``python -m bitpress demo --fast``: the whole report, end to end, as CI runs it (fresh caches:
the models are trained here)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

METHODS = [
    "fp32",
    "bf16",
    "FP8 weight-only",
    "FP8 W8A8 dynamic",
    "INT4 RTN",
    "INT4 GPTQ",
    "INT4 GPTQ, W4A8",
    "2:4 magnitude",
    "2:4 Wanda",
    "2:4 SparseGPT",
    "2:4 SparseGPT + recovery",
    "2:4 + INT4 GPTQ",
    "distilled student (1/2 depth)",
    "student + INT4 GPTQ",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    out, cache = tmp / "report", tmp / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "bitpress", "demo", "--fast", "--out", str(out)]
        + ["--cache", str(cache)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "BITPRESS_PROGRESS_INTERVAL": "30"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, cache, proc.stdout, proc.stderr


@pytest.mark.slow
def test_demo_fast_writes_every_file(report):
    out, cache, stdout, stderr = report
    for name in ("methods.csv", "speculative.csv", "report.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 200, name
    for name in ("pareto.png", "speedup.png", "speculative.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(os.listdir(cache)) == sorted(
        ["llama-bytes-40.pt", "student-40-20.pt", "sparsegpt-recovered-40-10.pt"]
    )
    assert "| fp32 |" in stdout and "2:4 + INT4 GPTQ" in stdout  # the markdown table
    assert "100%" in stderr  # progress bars (not quiet)


@pytest.mark.slow
def test_demo_fast_report_is_consistent(report):
    out = report[0]
    data = json.loads((out / "report.json").read_text())
    rows = {m["method"]: m for m in data["methods"]}
    assert list(rows) == METHODS
    fp32 = rows["fp32"]
    assert fp32["size_reduction"] == 1.0 and fp32["retention"] == 1.0 and fp32["agreement"] == 1.0
    b = {k: v["weight_bytes"] for k, v in rows.items()}
    assert b["bf16"] * 2 == b["fp32"]
    assert b["INT4 RTN"] == b["INT4 GPTQ"] == b["INT4 GPTQ, W4A8"] < b["FP8 weight-only"]
    assert b["FP8 weight-only"] < b["bf16"] and b["2:4 magnitude"] < b["bf16"]
    assert b["2:4 + INT4 GPTQ"] < b["INT4 GPTQ"] and b["student + INT4 GPTQ"] < b["INT4 GPTQ"]
    for m in rows.values():
        assert m["size_reduction"] == pytest.approx(b["fp32"] / m["weight_bytes"])
        assert 0.5 < m["retention"] <= 1.5 and 0.3 < m["agreement"] <= 1.0, m
        assert m["decode_ms"] > 0 and m["prefill_ms"] > 0, m
    assert rows["bf16"]["decode_speedup"] == 1.0 and rows["bf16"]["prefill_speedup"] == 1.0
    # Rows that share kernels share one measurement.
    assert rows["INT4 RTN"]["decode_ms"] == rows["INT4 GPTQ"]["decode_ms"]
    assert rows["2:4 Wanda"]["prefill_ms"] == rows["2:4 SparseGPT"]["prefill_ms"]
    spec = {s["drafter"]: s for s in data["speculative"]}
    assert spec["plain generation"]["speedup"] == 1.0 and len(spec) == 5
    for s in spec.values():
        if s["mean_accepted"] is not None:
            assert 1.0 <= s["mean_accepted"] <= 5.0
            assert "tokens identical to plain" in s["note"], s
    with open(out / "methods.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == METHODS
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and all(m in html for m in METHODS)
