"""Rendering of the compression report: the results as data (JSON, CSV), as a markdown table,
as pictures (PNG, matplotlib) and as one self-contained HTML page.

The data is plain dataclasses (:class:`Report` holding :class:`MethodResult` and
:class:`SpecResult` rows); this module measures nothing. matplotlib is needed for the pictures
only and is imported by the functions that draw (with the Agg canvas, without pyplot, so that the
caller's matplotlib backend is left alone): the rest works without it.

Number formats (markdown and HTML): weight bytes in MiB with 2 decimals, size reduction ``8.0x``,
perplexity with 3 decimals, retention and agreement ``99.6%``, times ``61.2 (1.00x)`` (ms and
the speedup against bf16 in the same run), ``–`` where a value was not measured.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

MISSING = "\u2013"  # en dash: a value that was not measured
MIB = float(1 << 20)

# Family -> colour in the pictures (matplotlib's tab10 hues); other families get the rest.
FAMILY_COLORS = {
    "baseline": "#4d4d4d",
    "fp8": "#1f77b4",
    "int4": "#ff7f0e",
    "sparse24": "#2ca02c",
    "distill": "#9467bd",
}
_SPARE_COLORS = ("#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")

DPI = 110
FIGSIZE = (9.0, 6.0)


@dataclass
class MethodResult:
    """One row of the methods table."""

    method: str  # row label, e.g. "INT4 GPTQ", "2:4 SparseGPT + recovery"
    family: str  # "baseline" | "fp8" | "int4" | "sparse24" | "distill"
    weight_bytes: int  # bytes of the quality model's weights as stored
    size_reduction: float  # fp32 weight bytes / weight_bytes
    perplexity: float  # held-out perplexity
    retention: float  # quality retention vs fp32 = ppl_fp32 / ppl (1.0 = 100 %)
    agreement: float  # next-token argmax agreement with fp32 (fraction)
    decode_ms: float | None  # ms per token on the speed model (None: not measured)
    prefill_ms: float | None  # ms per prompt on the speed model
    decode_speedup: float | None  # bf16 decode_ms / decode_ms (same run)
    prefill_speedup: float | None
    note: str = ""


@dataclass
class SpecResult:
    """One row of the speculative-decoding table."""

    drafter: str  # "plain generation", "prompt lookup", "layer skip", ...
    tokens_per_s: float
    mean_accepted: float | None  # mean accepted draft length per verify step (None for plain)
    speedup: float  # tokens/s / plain tokens/s (same run)
    note: str = ""


@dataclass
class Report:
    """Everything the report shows. ``to_json`` / ``from_json`` round-trip it exactly (floats
    included; NaN and infinity are written as JSON's common ``NaN`` / ``Infinity`` extension)."""

    title: str
    created: str  # ISO timestamp
    # e.g. {"CPU": ..., "CPU kernel path": ..., "threads": ..., "torch": ...}
    machine: dict[str, str]
    quality_model: str  # one-line description
    speed_model: str  # one-line description
    methods: list[MethodResult]
    speculative: list[SpecResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # step name -> seconds
    notes: list[str] = field(default_factory=list)  # footnotes printed under the tables

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> Report:
        data = json.loads(s)
        if not isinstance(data, dict):
            raise ValueError(f"Report.from_json: expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"Report.from_json: unknown fields {sorted(unknown)}")
        data["methods"] = [_build(MethodResult, m) for m in data.get("methods", [])]
        data["speculative"] = [_build(SpecResult, r) for r in data.get("speculative", [])]
        return cls(**data)


def _build(cls: type, row: dict) -> Any:
    try:
        return cls(**row)
    except TypeError as e:
        raise ValueError(f"Report.from_json: a {cls.__name__} row: {e}") from e


# ---- numbers as text -------------------------------------------------------------------------


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.2f}"


def _ratio(x: float | None) -> str:
    return MISSING if x is None else f"{x:.1f}x"


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100.0 * x:.1f}%"


def _ppl(x: float | None) -> str:
    return MISSING if x is None else f"{x:.3f}"


def _ms(x: float) -> str:
    # Three significant digits for the usual range: 61.2 ms, 4.37 ms, 0.412 ms, 1234 ms.
    if not math.isfinite(x) or abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _time_and_speedup(ms: float | None, speedup: float | None) -> str:
    if ms is None:
        return MISSING
    if speedup is None:
        return _ms(ms)
    return f"{_ms(ms)} ({speedup:.2f}x)"


def _seconds(s: float) -> str:
    return f"{s:.1f} s"


METHOD_COLUMNS = (
    "method",
    "weight MiB",
    "size reduction",
    "perplexity",
    "quality retention",
    "next-token agreement",
    "decode ms/token (vs bf16)",
    "prefill ms (vs bf16)",
)
SPEC_COLUMNS = ("drafter", "tokens/s", "mean accepted length", "speedup vs plain")


def method_cells(m: MethodResult) -> list[str]:
    """The formatted cells of one methods-table row (as in :data:`METHOD_COLUMNS`)."""
    return [
        m.method,
        _mib(m.weight_bytes),
        _ratio(m.size_reduction),
        _ppl(m.perplexity),
        _pct(m.retention),
        _pct(m.agreement),
        _time_and_speedup(m.decode_ms, m.decode_speedup),
        _time_and_speedup(m.prefill_ms, m.prefill_speedup),
    ]


def spec_cells(s: SpecResult) -> list[str]:
    """The formatted cells of one speculative-table row (as in :data:`SPEC_COLUMNS`)."""
    return [
        s.drafter,
        f"{s.tokens_per_s:.1f}",
        MISSING if s.mean_accepted is None else f"{s.mean_accepted:.2f}",
        MISSING if s.speedup is None else f"{s.speedup:.2f}x",
    ]


def _with_notes(header: tuple[str, ...], rows: list[list[str]], notes: list[str]):
    """Adds a note column when any row has a note."""
    if any(notes):
        return (*header, "note"), [[*r, n] for r, n in zip(rows, notes, strict=True)]
    return header, rows


def _machine_line(machine: dict[str, str]) -> str:
    return " · ".join(f"{k}: {v}" for k, v in machine.items())


# ---- markdown --------------------------------------------------------------------------------


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(header, rows, right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "--:" for i in range(len(header))]
    if header and header[-1] == "note":
        align[-1] = "---"
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    out.append("|" + "|".join(align) + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out


def markdown(report: Report) -> str:
    """The report as GitHub-flavoured markdown: the methods table, the speculative table (when
    there are rows), the models, the notes as a list, the machine and the timings as short
    lines. ``–`` marks a value that was not measured."""
    lines = [f"## {report.title}", ""]
    header, rows = _with_notes(
        METHOD_COLUMNS,
        [method_cells(m) for m in report.methods],
        [m.note for m in report.methods],
    )
    lines += _md_table(header, rows)
    lines.append("")
    if report.speculative:
        lines += ["### Speculative decoding", ""]
        header, rows = _with_notes(
            SPEC_COLUMNS,
            [spec_cells(s) for s in report.speculative],
            [s.note for s in report.speculative],
        )
        lines += _md_table(header, rows)
        lines.append("")
    if report.quality_model:
        lines.append(f"Quality model: {report.quality_model}  ")
    if report.speed_model:
        lines.append(f"Speed model: {report.speed_model}")
    if report.quality_model or report.speed_model:
        lines.append("")
    if report.notes:
        lines += [f"- {n}" for n in report.notes]
        lines.append("")
    if report.machine:
        lines.append(f"Machine: {_machine_line(report.machine)}  ")
    if report.timings:
        total = sum(report.timings.values())
        steps = ", ".join(f"{k} {_seconds(v)}" for k, v in report.timings.items())
        lines.append(f"Time: {_seconds(total)} ({steps})  ")
    if report.created:
        lines.append(f"Created: {report.created}")
    return "\n".join(lines).rstrip() + "\n"


# ---- CSV -------------------------------------------------------------------------------------


def _csv(rows: list, cls: type) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        # None -> an empty cell; a float is written as its shortest repr, which parses back to
        # the same value.
        w.writerow(["" if v is None else v for v in (getattr(r, n) for n in names)])
    return buf.getvalue()


def methods_csv(report: Report) -> str:
    """One row per method, the columns named as the fields of :class:`MethodResult`, unformatted
    (bytes, fractions, ms); an empty cell for None."""
    return _csv(report.methods, MethodResult)


def speculative_csv(report: Report) -> str:
    """One row per drafter, the columns named as the fields of :class:`SpecResult`."""
    return _csv(report.speculative, SpecResult)


# ---- Pareto front ----------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, sorted by x (then y, then index).

    Smaller is better in both coordinates: ``q`` dominates ``p`` when ``q.x <= p.x`` and
    ``q.y <= p.y`` and one of them is strictly smaller. Equal points dominate neither each other,
    so all copies of a point on the front are kept; of points with the same x only the smallest
    y can be on the front (and of the same y the smallest x). Points with a NaN coordinate are
    never on the front and dominate nothing.
    """
    valid = [
        i for i, (x, y) in enumerate(points) if not (math.isnan(float(x)) or math.isnan(float(y)))
    ]
    front = []
    for i in valid:
        xi, yi = points[i]
        dominated = any(
            points[j][0] <= xi and points[j][1] <= yi and (points[j][0] < xi or points[j][1] < yi)
            for j in valid
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1], i))


# ---- pictures --------------------------------------------------------------------------------


def _figure(figsize=FIGSIZE):
    """A matplotlib Figure on the Agg canvas, made without pyplot (no global state, no GUI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _family_colors(families: list[str]) -> dict[str, str]:
    colors, spare = {}, iter(_SPARE_COLORS * (1 + len(families) // len(_SPARE_COLORS)))
    for f in families:
        if f not in colors:
            colors[f] = FAMILY_COLORS.get(f) or next(spare)
    return colors


def fp32_perplexity(report: Report) -> float | None:
    """The fp32 perplexity: the row named ``fp32`` (any case), else what the retentions imply
    (``ppl * retention``, the median over the rows)."""
    for m in report.methods:
        if m.method.strip().lower() == "fp32" and _finite(m.perplexity):
            return float(m.perplexity)
    implied = sorted(
        m.perplexity * m.retention
        for m in report.methods
        if _finite(m.perplexity) and _finite(m.retention) and m.retention > 0
    )
    return implied[len(implied) // 2] if implied else None


def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(b) for b in boxes)


# Label offsets in points, tried in order until the label overlaps neither another label nor a
# marker (a greedy placement: cheap, and enough for the ~15 points of a report).
_LABEL_OFFSETS = (
    (7, 5, "left", "bottom"),
    (7, -5, "left", "top"),
    (-7, 5, "right", "bottom"),
    (-7, -5, "right", "top"),
    (0, 10, "center", "bottom"),
    (0, -10, "center", "top"),
    (9, 16, "left", "bottom"),
    (9, -16, "left", "top"),
    (-9, 16, "right", "bottom"),
    (-9, -16, "right", "top"),
    (0, 24, "center", "bottom"),
    (0, -24, "center", "top"),
)


def _place_labels(fig, ax, xs, ys, labels, colors, avoid=()) -> None:
    """Annotate each point with its label at the first offset of :data:`_LABEL_OFFSETS` where
    the label stays inside the axes and overlaps no other label, marker or box of ``avoid``
    (display-space Bboxes: the legend); the first offset when none fits."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    markers = [
        Bbox.from_extents(px - 4, py - 4, px + 4, py + 4)
        for px, py in (ax.transData.transform((x, y)) for x, y in zip(xs, ys, strict=True))
    ]
    axes_box = ax.get_window_extent(renderer)
    placed = list(avoid)
    for k, (x, y, label, color) in enumerate(zip(xs, ys, labels, colors, strict=True)):
        others = markers[:k] + markers[k + 1 :]
        chosen = first = None
        for dx, dy, ha, va in _LABEL_OFFSETS:
            t = ax.annotate(
                label,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=8,
                color=color,
            )
            box = t.get_window_extent(renderer)
            inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1
            inside = inside and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
            if inside and not _overlaps(box, placed) and not _overlaps(box, others):
                chosen = (t, box)
                break
            if first is None:
                first = (t, box)  # kept if no offset fits
            else:
                t.remove()
        if chosen is None:
            chosen = first
        elif first is not None:
            first[0].remove()
        placed.append(chosen[1])


def _plain_log_ticks(ax, lo: float, hi: float) -> None:
    """Tick labels as plain numbers (``2``, ``5``, ``10``, ``20``), not ``2x10^0``, on a log x
    axis; more intermediate ticks the fewer decades the axis spans."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(hi / lo)
    subs = (2.0, 3.0, 4.0, 5.0, 7.0) if decades < 1.2 else (2.0, 5.0) if decades < 3 else ()
    ax.xaxis.set_major_locator(LogLocator(base=10.0))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if subs:
        ax.xaxis.set_minor_locator(LogLocator(base=10.0, subs=subs))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def plot_pareto(report: Report, path: str | os.PathLike) -> str | None:
    """Perplexity (y) against weight bytes (x, MiB, log scale): a point per method, coloured by
    family and labelled with its name, the Pareto front (fewer bytes and lower perplexity both
    better) as a step line, the fp32 perplexity as a dashed line. PNG at ``path``; returns the
    path, or None (no file) when no method has a finite positive size and perplexity."""
    rows = [
        m
        for m in report.methods
        if _finite(m.weight_bytes) and m.weight_bytes > 0 and _finite(m.perplexity)
    ]
    if not rows:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    xs = [m.weight_bytes / MIB for m in rows]
    ys = [float(m.perplexity) for m in rows]
    colors = _family_colors([m.family for m in rows])

    front = pareto_front(list(zip(xs, ys, strict=True)))
    if len(front) > 1:
        ax.step(
            [xs[i] for i in front],
            [ys[i] for i in front],
            where="post",
            color="#999999",
            lw=1.2,
            zorder=1,
            label="Pareto front",
        )
    ref = fp32_perplexity(report)
    if ref is not None:
        ax.axhline(
            ref,
            ls="--",
            lw=1.0,
            color=FAMILY_COLORS["baseline"],
            zorder=1,
            label=f"fp32 perplexity ({ref:.3f})",
        )
    for fam, color in colors.items():
        idx = [i for i, m in enumerate(rows) if m.family == fam]
        ax.scatter(
            [xs[i] for i in idx],
            [ys[i] for i in idx],
            s=46,
            color=color,
            zorder=3,
            edgecolors="white",
            linewidths=0.8,
            label=fam,
        )
    if front:  # the points on the front ringed
        ax.scatter(
            [xs[i] for i in front],
            [ys[i] for i in front],
            s=120,
            facecolors="none",
            edgecolors="#555555",
            linewidths=1.0,
            zorder=2,
        )
    ax.set_xscale("log")
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.35, hi * 1.35)  # room for the labels at both ends
    _plain_log_ticks(ax, lo / 1.35, hi * 1.35)
    ylo, yhi = min(ys + ([ref] if ref else [])), max(ys + ([ref] if ref else []))
    pad = 0.08 * (yhi - ylo) if yhi > ylo else 0.05 * abs(yhi) + 0.1
    ax.set_ylim(ylo - pad, yhi + pad)
    ax.set_xlabel("weight bytes (MiB, log scale)")
    ax.set_ylabel("perplexity on held-out text (lower is better)")
    ax.set_title(f"{report.title}: quality against size")
    ax.grid(True, which="both", alpha=0.25)
    legend = ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.canvas.draw()  # lay out the legend, so that the labels can avoid it
    _place_labels(
        fig,
        ax,
        xs,
        ys,
        [m.method for m in rows],
        [colors[m.family] for m in rows],
        avoid=[legend.get_window_extent(fig.canvas.get_renderer())],
    )
    fig.savefig(path, dpi=DPI)
    return str(path)


def plot_speedup(report: Report, path: str | os.PathLike) -> str | None:
    """Horizontal grouped bars per method: decode and prefill speedup against bf16 (same run),
    a line at 1.0, each value written at its bar's end. Methods without speed numbers are left
    out; returns None (no file) when none has any."""
    rows = [
        m for m in report.methods if m.decode_speedup is not None or m.prefill_speedup is not None
    ]
    if not rows:
        return None
    n = len(rows)
    fig = _figure((FIGSIZE[0], max(3.0, 0.55 * n + 1.6)))
    ax = fig.add_subplot()
    h = 0.38
    series = (
        ("decode (ms/token)", "decode_speedup", -h / 2, "#1f77b4"),
        ("prefill (ms/prompt)", "prefill_speedup", h / 2, "#ff7f0e"),
    )
    top = 1.0
    for label, attr, off, color in series:
        ys = [i + off for i, m in enumerate(rows) if getattr(m, attr) is not None]
        vals = [float(getattr(m, attr)) for m in rows if getattr(m, attr) is not None]
        if not vals:
            continue
        bars = ax.barh(ys, vals, height=h, color=color, label=label, zorder=2)
        texts = ax.bar_label(bars, labels=[f"{v:.2f}x" for v in vals], padding=3, fontsize=8)
        for t in texts:  # readable where a value sits on the 1.0 line
            t.set_bbox(dict(facecolor="white", edgecolor="none", pad=0.6, alpha=0.85))
            t.set_zorder(4)
        top = max(top, *vals)
    ax.axvline(1.0, color="black", lw=1.0, ls="--", zorder=3, label="bf16 (1.0x)")
    ax.set_yticks(range(n), [m.method for m in rows], fontsize=9)
    ax.invert_yaxis()  # the first method on top, as in the table
    ax.set_xlim(0, top * 1.18)  # room for the values at the bar ends
    ax.set_xlabel("speedup against bf16 (higher is better)")
    ax.set_title(f"{report.title}: speed against bf16")
    ax.grid(True, axis="x", alpha=0.25)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return str(path)


def plot_speculative(report: Report, path: str | os.PathLike) -> str | None:
    """Bars of tokens/s per drafter, each annotated with its mean accepted draft length and its
    speedup over plain generation. Returns None (no file) when ``report.speculative`` is
    empty."""
    rows = report.speculative
    if not rows:
        return None
    fig = _figure((FIGSIZE[0], 5.0))
    ax = fig.add_subplot()
    colors = [FAMILY_COLORS["baseline"] if r.mean_accepted is None else "#1f77b4" for r in rows]
    bars = ax.bar(range(len(rows)), [r.tokens_per_s for r in rows], color=colors, zorder=2)
    labels = []
    for r in rows:
        text = f"{r.tokens_per_s:.1f} tok/s, {r.speedup:.2f}x"
        if r.mean_accepted is not None:
            text += f"\naccepted {r.mean_accepted:.2f}"
        labels.append(text)
    ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
    tilt = len(rows) > 5  # long rows of names would run into each other
    ax.set_xticks(
        range(len(rows)),
        [r.drafter for r in rows],
        fontsize=9,
        rotation=15 if tilt else 0,
        ha="right" if tilt else "center",
    )
    ax.set_ylim(0, max(r.tokens_per_s for r in rows) * 1.25)
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title(f"{report.title}: speculative decoding")
    ax.grid(True, axis="y", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return str(path)


# ---- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fbfbfb; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _html_table(header, rows, right_from: int = 1) -> str:
    e = html.escape
    out = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            num = right_from <= i and not (header[i] == "note")
            cells.append(f'<td class="num">{e(str(c))}</td>' if num else f"<td>{e(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_html(report: Report, images: dict[str, bytes] | None = None) -> str:
    """The report as one self-contained HTML page: inline CSS, the tables, the pictures
    (``images``: name -> PNG bytes for ``pareto``, ``speedup``, ``speculative``, embedded as
    base64 data URIs), notes, machine and timings. Nothing is loaded from elsewhere."""
    images = images or {}
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(report.title)}</title>",
        f"<style>{_CSS}</style></head>",
        "<body>",
        f"<h1>{e(report.title)}</h1>",
    ]
    meta = []
    if report.created:
        meta.append(f"Created {e(report.created)}")
    if report.machine:
        meta.append(e(_machine_line(report.machine)))
    if meta:
        parts.append(f'<p class="meta">{"<br>".join(meta)}</p>')
    if report.quality_model or report.speed_model:
        parts.append('<p class="meta">')
        if report.quality_model:
            parts.append(f"Quality model: {e(report.quality_model)}<br>")
        if report.speed_model:
            parts.append(f"Speed model: {e(report.speed_model)}")
        parts.append("</p>")

    parts.append("<h2>Methods</h2>")
    header, rows = _with_notes(
        METHOD_COLUMNS, [method_cells(m) for m in report.methods], [m.note for m in report.methods]
    )
    parts.append(_html_table(header, rows))
    if "pareto" in images:
        parts.append(
            _img(
                images["pareto"],
                "perplexity against weight bytes",
                "Perplexity against weight bytes; the step line is the Pareto front.",
            )
        )
    if "speedup" in images:
        parts.append(
            _img(
                images["speedup"],
                "speedup per method",
                "Decode and prefill speedup against bf16, measured in the same run.",
            )
        )

    if report.speculative:
        parts.append("<h2>Speculative decoding</h2>")
        header, rows = _with_notes(
            SPEC_COLUMNS,
            [spec_cells(s) for s in report.speculative],
            [s.note for s in report.speculative],
        )
        parts.append(_html_table(header, rows))
        if "speculative" in images:
            parts.append(
                _img(
                    images["speculative"],
                    "tokens/s per drafter",
                    "Tokens/s per drafter, with the mean accepted draft length.",
                )
            )

    if report.notes:
        parts.append("<h2>Notes</h2>")
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>")
    if report.machine:
        parts.append("<h2>Machine</h2>")
        parts.append(_html_table(("", ""), [[k, v] for k, v in report.machine.items()], 9))
    if report.timings:
        parts.append("<h2>Timings</h2>")
        rows = [[k, _seconds(v)] for k, v in report.timings.items()]
        rows.append(["total", _seconds(sum(report.timings.values()))])
        parts.append(_html_table(("step", "time"), rows))
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# ---- everything ------------------------------------------------------------------------------

PLOTS = (("pareto", plot_pareto), ("speedup", plot_speedup), ("speculative", plot_speculative))


def write_report(report: Report, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write the report under ``out_dir`` (created if needed): ``methods.csv``,
    ``speculative.csv`` (a header only when there are no rows), ``report.json``, ``report.md``,
    ``pareto.png``, ``speedup.png``, ``speculative.png`` and ``report.html`` (one
    self-contained page). Returns file name -> path of what was written.

    A picture with nothing to show is not written (``speculative.png`` without speculative rows,
    ``speedup.png`` without speed numbers); without matplotlib no picture is written (a warning
    says so) and the page holds the tables only.
    """
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}

    def put(name: str, text: str) -> None:
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        written[name] = path

    put("methods.csv", methods_csv(report))
    put("speculative.csv", speculative_csv(report))
    put("report.json", report.to_json())
    put("report.md", markdown(report))

    images: dict[str, bytes] = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(
            "write_report: matplotlib is not installed; the pictures are left out",
            stacklevel=2,
        )
    else:
        for name, plot in PLOTS:
            path = os.path.join(out_dir, f"{name}.png")
            if plot(report, path) is not None:
                with open(path, "rb") as f:
                    images[name] = f.read()
                written[f"{name}.png"] = path
    put("report.html", render_html(report, images))
    return written
