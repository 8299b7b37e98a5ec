"""Report rendering (bitpress.report.render): JSON round trip, CSV, markdown, the Pareto front,
the pictures and the self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import math
import re

import pytest

from bitpress.report import render
from bitpress.report.render import (
    MethodResult,
    Report,
    SpecResult,
    markdown,
    pareto_front,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FP32_BYTES = 64 << 20
FP32_PPL = 12.3456


def _method(name, family, reduction, ppl, decode=None, prefill=None, note=""):
    bf16_decode, bf16_prefill = 61.2, 310.0
    return MethodResult(
        method=name,
        family=family,
        weight_bytes=int(FP32_BYTES / reduction),
        size_reduction=reduction,
        perplexity=ppl,
        retention=FP32_PPL / ppl,
        agreement=min(1.0, 0.5 + 0.5 * FP32_PPL / ppl),
        decode_ms=decode,
        prefill_ms=prefill,
        decode_speedup=None if decode is None else bf16_decode / decode,
        prefill_speedup=None if prefill is None else bf16_prefill / prefill,
        note=note,
    )


def make_report(speculative: bool = True) -> Report:
    methods = [
        _method("fp32", "baseline", 1.0, FP32_PPL, note="the reference"),
        _method("bf16", "baseline", 2.0, 12.3501, 61.2, 310.0),
        _method("FP8 weight-only", "fp8", 3.94, 12.401, 35.1, 300.0),
        _method("INT4 GPTQ", "int4", 7.53, 12.9, 20.3, 332.0),
        _method("INT4 RTN", "int4", 7.53, 13.9, 20.1, 330.0),
        _method("2:4 SparseGPT + recovery", "sparse24", 3.56, 14.6, 41.0, None),
        _method("distilled student | 2x smaller", "distill", 2.0, 14.1),
        _method("student + GPTQ <small>", "distill", 15.0, 14.9),
    ]
    spec = [
        SpecResult("plain generation", 20.1, None, 1.0),
        SpecResult("prompt lookup", 35.2, 2.31, 35.2 / 20.1, note="repetitive prompt"),
        SpecResult("layer skip", 28.0, 1.62, 28.0 / 20.1),
    ]
    return Report(
        title="bitpress compression report",
        created="2026-12-02T06:30:00+00:00",
        machine={"CPU": "Intel Xeon (AMX)", "CPU kernel path": "amx", "threads": "2"},
        quality_model="Llama-architecture, 4 layers, hidden 256",
        speed_model="random weights, Llama-3-8B layer shapes, 2 layers",
        methods=methods,
        speculative=spec if speculative else [],
        timings={"train": 120.5, "calibrate": 33.25},
        notes=["speed measured on a shared machine", "student: 2x fewer layers"],
    )


# ---- data --------------------------------------------------------------------------------------


def test_json_round_trip_is_exact():
    rep = make_report()
    back = Report.from_json(rep.to_json())
    assert back == rep
    assert isinstance(back.methods[0], MethodResult) and isinstance(back.speculative[0], SpecResult)
    assert back.methods[3].retention == rep.methods[3].retention  # every float digit kept
    assert json.loads(rep.to_json())["methods"][6]["decode_ms"] is None


def test_json_round_trip_changes_are_seen():
    rep = make_report()
    other = Report.from_json(rep.to_json())
    other.methods[2].perplexity += 1e-9
    assert other != rep


def test_from_json_rejects_unknown_fields():
    data = json.loads(make_report().to_json())
    data["methods"][0]["bogus"] = 1
    with pytest.raises(ValueError, match="MethodResult"):
        Report.from_json(json.dumps(data))
    data = json.loads(make_report().to_json())
    data["extra"] = 1
    with pytest.raises(ValueError, match="extra"):
        Report.from_json(json.dumps(data))


def _parse_method_row(row: dict) -> MethodResult:
    kinds = {f.name: f.type for f in dataclasses.fields(MethodResult)}
    values = {}
    for name, text in row.items():
        kind = kinds[name]
        if text == "":
            values[name] = "" if kind == "str" else None
        elif kind == "str":
            values[name] = text
        elif kind == "int":
            values[name] = int(text)
        else:
            values[name] = float(text)
    return MethodResult(**values)


def test_methods_csv_parses_back_to_every_row():
    rep = make_report()
    rows = list(csv.DictReader(io.StringIO(render.methods_csv(rep))))
    assert len(rows) == len(rep.methods)
    assert list(rows[0]) == [f.name for f in dataclasses.fields(MethodResult)]
    assert [_parse_method_row(r) for r in rows] == rep.methods
    assert rows[6]["decode_ms"] == "" and rows[6]["method"] == "distilled student | 2x smaller"


def test_speculative_csv_parses_back():
    rep = make_report()
    rows = list(csv.DictReader(io.StringIO(render.speculative_csv(rep))))
    assert [r["drafter"] for r in rows] == [s.drafter for s in rep.speculative]
    for r, s in zip(rows, rep.speculative, strict=True):
        assert float(r["tokens_per_s"]) == s.tokens_per_s
        assert float(r["speedup"]) == s.speedup
        assert (None if r["mean_accepted"] == "" else float(r["mean_accepted"])) == s.mean_accepted
    assert rows[1]["note"] == "repetitive prompt"


# ---- markdown ----------------------------------------------------------------------------------


def _table_rows(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def test_markdown_methods_table():
    rep = make_report()
    md = markdown(rep)
    rows = _table_rows(md, "method")
    assert [r[0] for r in rows] == [m.method for m in rep.methods]
    by_name = {r[0]: r for r in rows}
    fp32, bf16, gptq = by_name["fp32"], by_name["bf16"], by_name["INT4 GPTQ"]
    assert fp32[1:6] == ["64.00", "1.0x", "12.346", "100.0%", "100.0%"]
    assert fp32[6] == fp32[7] == "\u2013"  # not measured
    assert fp32[-1] == "the reference"  # a note column when any row has a note
    assert bf16[6] == "61.2 (1.00x)" and bf16[7] == "310 (1.00x)"
    assert gptq[1] == f"{FP32_BYTES / 7.53 / 2**20:.2f}" and gptq[2] == "7.5x"
    assert gptq[3] == "12.900" and gptq[4] == f"{100 * FP32_PPL / 12.9:.1f}%"
    assert gptq[6] == f"20.3 ({61.2 / 20.3:.2f}x)"
    assert by_name["2:4 SparseGPT + recovery"][7] == "\u2013"
    assert by_name["distilled student | 2x smaller"][6] == "\u2013"
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    for col in ("weight MiB", "size reduction", "perplexity", "quality retention",
                "next-token agreement", "decode ms/token", "prefill ms"):  # fmt: skip
        assert col in header


def test_markdown_speculative_notes_machine():
    rep = make_report()
    md = markdown(rep)
    rows = _table_rows(md, "drafter")
    assert [r[0] for r in rows] == [s.drafter for s in rep.speculative]
    assert rows[0][1:4] == ["20.1", "\u2013", "1.00x"]
    assert rows[1][1:4] == ["35.2", "2.31", f"{35.2 / 20.1:.2f}x"]
    for n in rep.notes:
        assert f"- {n}" in md
    assert "CPU: Intel Xeon (AMX)" in md and "threads: 2" in md
    assert md.index("| method |") < md.index("| drafter |") < md.index("- speed measured")


def test_markdown_without_speculative_or_notes():
    rep = make_report(speculative=False)
    rep.notes = []
    for m in rep.methods:
        m.note = ""
    md = markdown(rep)
    assert "| drafter |" not in md and "\n- " not in md
    assert "| note |" not in md.splitlines()[2]


# ---- Pareto front ------------------------------------------------------------------------------


def test_pareto_front_hand_made():
    pts = [
        (4.0, 15.0),  # 0 front: the smallest
        (8.0, 13.0),  # 1 front
        (8.0, 14.0),  # 2 dominated by 1 (same x, larger y)
        (16.0, 12.5),  # 3 front
        (17.0, 12.5),  # 4 dominated by 3 (same y, larger x)
        (32.0, 12.3),  # 5 front
        (64.0, 12.3),  # 6 dominated by 5
        (20.0, 40.0),  # 7 dominated by everything smaller
        (3.0, 50.0),  # 8 front: the smallest x
    ]
    assert pareto_front(pts) == [8, 0, 1, 3, 5]


def test_pareto_front_ties_and_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    # Exact copies dominate neither each other: all are kept, in index order.
    assert pareto_front([(2.0, 2.0), (1.0, 3.0), (2.0, 2.0)]) == [1, 0, 2]
    # One point better in both: the only one.
    assert pareto_front([(5.0, 5.0), (1.0, 1.0), (3.0, 1.0), (1.0, 3.0)]) == [1]
    # Sorted by x whatever the input order.
    assert pareto_front([(3.0, 1.0), (1.0, 3.0), (2.0, 2.0)]) == [1, 2, 0]
    # NaN is never on the front and dominates nothing.
    assert pareto_front([(1.0, math.nan), (2.0, 2.0), (math.nan, 0.0)]) == [1]


# ---- pictures and the page ---------------------------------------------------------------------


def _is_png(path, min_bytes: int = 10_000) -> bool:
    with open(path, "rb") as f:
        data = f.read()
    return data.startswith(PNG_SIGNATURE) and len(data) >= min_bytes


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rep = make_report()
    for name, plot in render.PLOTS:
        path = tmp_path / f"{name}.png"
        assert plot(rep, path) == str(path)
        assert _is_png(path), name
    w, h = _png_size(tmp_path / "pareto.png")
    assert (w, h) == (round(9 * render.DPI), round(6 * render.DPI))


def test_plots_with_nothing_to_show_write_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    rep = make_report(speculative=False)
    for m in rep.methods:
        m.decode_speedup = m.prefill_speedup = None
    assert render.plot_speculative(rep, tmp_path / "s.png") is None
    assert render.plot_speedup(rep, tmp_path / "p.png") is None
    assert not list(tmp_path.iterdir())


def test_speedup_plot_leaves_out_methods_without_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    rep = make_report()
    few = dataclasses.replace(rep, methods=rep.methods[:3])  # fp32 has no speed numbers
    render.plot_speedup(few, tmp_path / "few.png")
    render.plot_speedup(rep, tmp_path / "all.png")
    # One row per method with numbers: the figure grows with the rows drawn.
    assert _png_size(tmp_path / "few.png")[1] < _png_size(tmp_path / "all.png")[1]


def test_fp32_perplexity():
    rep = make_report()
    assert render.fp32_perplexity(rep) == FP32_PPL
    rep.methods = rep.methods[1:]  # no fp32 row: implied by the retentions
    assert render.fp32_perplexity(rep) == pytest.approx(FP32_PPL)


def _assert_self_contained(page: str) -> None:
    assert "http" not in page.lower()
    srcs = re.findall(r"""src\s*=\s*["']([^"']*)""", page)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), srcs
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_write_report_writes_everything(tmp_path):
    pytest.importorskip("matplotlib")
    rep = make_report()
    out = tmp_path / "report"
    paths = write_report(rep, out)
    expected = {
        "methods.csv", "speculative.csv", "report.json", "report.md",
        "pareto.png", "speedup.png", "speculative.png", "report.html",
    }  # fmt: skip
    assert set(paths) == expected
    assert {p.name for p in out.iterdir()} == expected
    for name in ("pareto.png", "speedup.png", "speculative.png"):
        assert _is_png(paths[name]), name
    assert Report.from_json(open(paths["report.json"]).read()) == rep
    assert open(paths["report.md"], encoding="utf-8").read() == markdown(rep)
    assert len(list(csv.DictReader(open(paths["methods.csv"])))) == len(rep.methods)

    page = open(paths["report.html"], encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for m in rep.methods:
        assert render.html.escape(m.method) in page
    assert "student + GPTQ &lt;small&gt;" in page  # escaped, not markup
    for s in rep.speculative:
        assert s.drafter in page
    for n in rep.notes:
        assert n in page
    assert "Intel Xeon (AMX)" in page and "calibrate" in page and "153.8 s" in page
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 3
    pngs = {open(paths[n], "rb").read() for n in ("pareto.png", "speedup.png", "speculative.png")}
    assert {base64.b64decode(u) for u in uris} == pngs  # the files themselves, embedded
    _assert_self_contained(page)


def test_write_report_without_speculative(tmp_path):
    pytest.importorskip("matplotlib")
    rep = make_report(speculative=False)
    paths = write_report(rep, tmp_path)
    assert "speculative.png" not in paths and not (tmp_path / "speculative.png").exists()
    assert list(csv.DictReader(open(paths["speculative.csv"]))) == []
    page = open(paths["report.html"], encoding="utf-8").read()
    assert page.count("data:image/png;base64,") == 2
    assert "Speculative decoding" not in page
    _assert_self_contained(page)


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rep = make_report()
    with pytest.warns(UserWarning, match="matplotlib"):
        paths = write_report(rep, tmp_path)
    assert set(paths) == {"methods.csv", "speculative.csv", "report.json", "report.md",
                          "report.html"}  # fmt: skip
    page = open(paths["report.html"], encoding="utf-8").read()
    assert "data:image" not in page and "INT4 GPTQ" in page
    _assert_self_contained(page)


def test_library_imports_without_matplotlib():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import bitpress.report.render as r\n"
        "assert 'matplotlib' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
