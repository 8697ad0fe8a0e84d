"""``fastpipe bench --plot FILE.png``: the benchmark's results as a bar chart.

It draws the document that ``fastpipe bench --json`` writes (see
``suite._write_json``), nothing else, so what the chart shows and what the
JSON says cannot drift apart, and a saved JSON file can be drawn again with
``plot_file()``.

One row of panels per workload, one horizontal bar per method: throughput
(MiB/s, higher is better) on the left and the relay's CPU seconds per GiB
(lower is better) on the right.  Each baseline's bar is labelled with how
fastpipe compares to it, in the direction where above 1 favours fastpipe in
both panels, as in the text tables.  Horizontal bars keep every method's
name and label readable however many baselines a workload has.

matplotlib is an optional extra (``pip install '.[plot]'`` from a checkout).
It is imported only here, and the figure is drawn on an Agg canvas without
pyplot: no GUI backend, no global state, nothing that needs a display.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastpipe._bench.methods import (
    COPYFILEOBJ,
    COPYFILEOBJ_POOL,
    FASTPIPE,
    FASTPIPE_IDLE,
    METHOD_TITLES,
)

#: Labels for the methods' axis: the text tables' titles, spelt out where a
#: table's column header says the rest.  A method not listed shows under its
#: own name.  In the small-relays workload "copyfileobj" is a thread per relay.
_LABELS = {
    **METHOD_TITLES,
    COPYFILEOBJ_POOL: "copyfileobj, thread pool",
    FASTPIPE_IDLE: "fastpipe.relay, main idle",
}
_SMALL_LABELS = {COPYFILEOBJ: "copyfileobj, thread/relay"}

#: Inches per bar, and per panel for its title and axis.
_BAR_HEIGHT = 0.3
_PANEL_EXTRA = 0.85

_FASTPIPE_COLOR = "#1f6fb4"
_REFERENCE_COLOR = "#9cc3e6"  # fastpipe in another setting: a reference, not a rival
_BASELINE_COLORS = ["#e8833a", "#4aa05a", "#b65fa8", "#c9b53c", "#7f7f7f"]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (the ``plot`` extra)."""


def check_available() -> None:
    """Fail early, before a benchmark is run for nothing.

    Raises:
        PlotUnavailable: matplotlib cannot be imported.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib (the 'plot' extra): pip install matplotlib"
        ) from None


def plot_file(json_path: str, png_path: str) -> None:
    """Draw a JSON file written by ``fastpipe bench --json`` into ``png_path``."""
    with open(json_path, encoding="utf-8") as f:
        plot(json.load(f), png_path)


def plot(doc: Mapping[str, Any], png_path: str) -> None:
    """Draw ``doc`` (the ``fastpipe bench --json`` document) as a PNG at ``png_path``.

    Raises:
        PlotUnavailable: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    check_available()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    workloads = _by_workload(doc["results"])
    sizes = [len(rows) for rows in workloads.values()]
    height = sum(_BAR_HEIGHT * n + _PANEL_EXTRA for n in sizes) + 0.9
    fig = Figure(figsize=(12.5, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(workloads), 2, squeeze=False, gridspec_kw={"height_ratios": sizes})
    colors = _colors([r["method"] for rows in workloads.values() for r in rows])
    for row, (workload, rows) in enumerate(workloads.items()):
        left, right = axes[row]
        labels = [_label(workload, r["method"]) for r in rows]
        bar_colors = [colors[r["method"]] for r in rows]
        fast = next((r for r in rows if r["method"] == FASTPIPE), None)
        places = list(range(len(rows)))

        speeds = [r["MiB_per_s"] for r in rows]
        low, high = zip(*(_speed_range(r) for r in rows), strict=True)
        left.barh(
            places,
            speeds,
            color=bar_colors,
            xerr=[
                [s - lo for s, lo in zip(speeds, low, strict=True)],
                [hi - s for s, hi in zip(speeds, high, strict=True)],
            ],
            error_kw={"elinewidth": 0.8, "capsize": 2.5, "ecolor": "#444444"},
        )
        # Labels right of the whisker, not the bar, so that the two never cross.
        for place, hi, r in zip(places, high, rows, strict=True):
            left.annotate(
                _value_and_ratio(r, fast, "MiB_per_s", fastpipe_over_baseline=True),
                (hi, place),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        left.set_xlim(0, max(high) * 1.45)
        title = rows[0]["title"].replace("->", "\N{RIGHTWARDS ARROW}")
        left.set_title(title + _size_note(rows), fontsize=10, fontweight="bold", loc="left")

        cpus = [r["cpu_s_per_GiB"] for r in rows]
        bars = right.barh(places, cpus, color=bar_colors)
        right.bar_label(
            bars,
            [
                _value_and_ratio(r, fast, "cpu_s_per_GiB", fastpipe_over_baseline=False)
                for r in rows
            ],
            padding=4,
            fontsize=8,
        )
        right.set_xlim(0, max(cpus) * 1.45 or 1)
        for ax in (left, right):
            ax.set_yticks(places, labels if ax is left else [""] * len(rows))
            ax.invert_yaxis()  # fastpipe on top
            ax.tick_params(axis="y", labelsize=8.5, length=0)
            ax.tick_params(axis="x", labelsize=8)
            ax.spines[["top", "right"]].set_visible(False)
            ax.grid(axis="x", color="#dddddd", linewidth=0.6)
            ax.set_axisbelow(True)
    axes[0][0].set_xlabel("MiB/s, median (longer is better)", fontsize=9)
    axes[0][0].xaxis.set_label_position("top")
    axes[0][1].set_xlabel("relay CPU s per GiB, median (shorter is better)", fontsize=9)
    axes[0][1].xaxis.set_label_position("top")
    fig.suptitle(_title(doc), fontsize=11)
    fig.supxlabel(
        "Whiskers: best and worst run.  Next to a baseline's bar: fastpipe's throughput as a "
        "multiple of the baseline's (left), the baseline's CPU as a multiple of fastpipe's "
        "(right); above 1 favours fastpipe.",
        fontsize=8,
        color="#444444",
    )
    fig.savefig(png_path, format="png")


def _by_workload(results: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Results grouped by workload in run order, fastpipe first; setup-only rows left out."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        if r["nbytes"] > 0:  # "setup-only" moves no bytes: no throughput to draw
            grouped.setdefault(r["workload"], []).append(r)
    for rows in grouped.values():
        rows.sort(key=lambda r: r["method"] != FASTPIPE)
    return grouped


def _colors(methods: Sequence[str]) -> dict[str, str]:
    colors: dict[str, str] = {}
    baselines = iter(_BASELINE_COLORS * len(methods))
    for method in methods:
        if method in colors:
            continue
        if method == FASTPIPE:
            colors[method] = _FASTPIPE_COLOR
        elif method.startswith(FASTPIPE):
            colors[method] = _REFERENCE_COLOR
        else:
            colors[method] = next(baselines)
    return colors


def _label(workload: str, method: str) -> str:
    if workload == "small-relays" and method in _SMALL_LABELS:
        return _SMALL_LABELS[method]
    return _LABELS.get(method, method)


def _speed_range(r: Mapping[str, Any]) -> tuple[float, float]:
    """MiB/s of the worst and the best run."""
    mib = r["nbytes"] / (1 << 20)
    walls = r["walls"]
    return mib / max(walls), mib / min(walls)


def _value_and_ratio(
    r: Mapping[str, Any],
    fast: Mapping[str, Any] | None,
    key: str,
    *,
    fastpipe_over_baseline: bool,
) -> str:
    value = _number(r[key])
    if fast is None or r["method"].startswith(FASTPIPE) or not r[key] or not fast[key]:
        return value
    if fastpipe_over_baseline:
        return f"{value}  (fastpipe {fast[key] / r[key]:.2f}x)"
    return f"{value}  ({r[key] / fast[key]:.2f}x fastpipe's)"


def _number(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _size_note(rows: Sequence[Mapping[str, Any]]) -> str:
    first = rows[0]
    extra = first.get("extra", {})
    if "relays" in extra:
        return f", {extra['relays']:,} x {extra['payload'] // 1024} KiB"
    return f", {first['nbytes'] / (1 << 20):g} MiB per copy"


def _title(doc: Mapping[str, Any]) -> str:
    runs = doc.get("repeat", "?")
    return (
        f"fastpipe {doc.get('fastpipe', '?')} ({doc.get('implementation', '?')} core) vs "
        f"shutil.copyfileobj: CPython {doc.get('python', '?')}, {doc.get('cpus', '?')} CPUs, "
        f"median of {runs} run{'s' if runs != 1 else ''}, every byte verified"
    )
