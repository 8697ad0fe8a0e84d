"""``fastpipe bench --plot FILE.png``: the benchmark's results as a bar chart.

It draws the document that ``fastpipe bench --json`` writes (see
``_bench._write_json``), nothing else, so what the chart shows and what the
JSON says cannot drift apart, and a saved JSON file can be drawn again with
``plot_file()``.

One column of panels per workload, one bar per method, in two rows:
throughput (MiB/s, higher is better) and the relay's CPU seconds per GiB
(lower is better).  Each baseline's bar is labelled with how fastpipe
compares to it, in the direction where above 1 favours fastpipe in both rows,
as in the text tables.

matplotlib is an optional extra (``pip install '.[plot]'`` from a checkout).
It is imported only here, and the figure is drawn on an Agg canvas without
pyplot: no GUI backend, no global state, nothing that needs a display.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

#: The method that the others are compared with.
FASTPIPE = "fastpipe"

#: Short labels for the x axis; a method not listed shows under its own name.
#: In the small-relays workload "copyfileobj" is a thread per relay.
_LABELS = {
    "fastpipe": "fastpipe.relay",
    "copyfileobj": "copyfileobj",
    "copyfileobj-pool": "copyfileobj\nthread pool",
    "fastpipe-idle-main": "fastpipe.relay\n(main idle)",
}
_SMALL_LABELS = {"copyfileobj": "copyfileobj\nthread/relay"}

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
    columns = len(workloads)
    fig = Figure(figsize=(2.9 * columns + 0.8, 7.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, columns, squeeze=False)
    colors = _colors([r["method"] for rows in workloads.values() for r in rows])
    for column, (workload, rows) in enumerate(workloads.items()):
        top, bottom = axes[0][column], axes[1][column]
        labels = [_label(workload, r["method"]) for r in rows]
        bar_colors = [colors[r["method"]] for r in rows]
        fast = next((r for r in rows if r["method"] == FASTPIPE), None)

        speeds = [r["MiB_per_s"] for r in rows]
        low, high = zip(*(_speed_range(r) for r in rows), strict=True)
        bars = top.bar(
            labels,
            speeds,
            color=bar_colors,
            yerr=[
                [s - lo for s, lo in zip(speeds, low, strict=True)],
                [hi - s for s, hi in zip(speeds, high, strict=True)],
            ],
            error_kw={"elinewidth": 0.8, "capsize": 3, "ecolor": "#444444"},
        )
        # Labels above the whisker, not the bar, so that the two never cross.
        for bar, hi, r in zip(bars, high, rows, strict=True):
            top.annotate(
                _value_and_ratio(r, fast, "MiB_per_s", fastpipe_over_baseline=True),
                (bar.get_x() + bar.get_width() / 2, hi),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        top.set_ylim(0, max(high) * 1.25)
        title = rows[0]["title"].replace("->", "\N{RIGHTWARDS ARROW}")
        top.set_title(title + _size_note(rows), fontsize=10, fontweight="bold")

        cpus = [r["cpu_s_per_GiB"] for r in rows]
        bars = bottom.bar(labels, cpus, color=bar_colors)
        bottom.bar_label(
            bars,
            [
                _value_and_ratio(r, fast, "cpu_s_per_GiB", fastpipe_over_baseline=False)
                for r in rows
            ],
            padding=2,
            fontsize=8,
        )
        for ax in (top, bottom):
            ax.tick_params(axis="x", labelsize=7.5, length=0)
            ax.tick_params(axis="y", labelsize=8)
            ax.spines[["top", "right"]].set_visible(False)
            ax.grid(axis="y", color="#dddddd", linewidth=0.6)
            ax.set_axisbelow(True)
        # Room above the tallest bar for its two-line label.
        bottom.set_ylim(0, max(cpus) * 1.22 or 1)
    axes[0][0].set_ylabel("MiB/s, median (higher is better)", fontsize=9)
    axes[1][0].set_ylabel("relay CPU s per GiB (lower is better)", fontsize=9)
    fig.suptitle(_title(doc), fontsize=11)
    fig.supxlabel(
        "Whiskers: best and worst run.  On a baseline's bar: fastpipe's throughput as a "
        "multiple of the baseline's (top), the baseline's CPU as a multiple of fastpipe's "
        "(bottom); above 1 favours fastpipe.",
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
        return f"{value}\nfastpipe {fast[key] / r[key]:.2f}x"
    return f"{value}\n{r[key] / fast[key]:.2f}x fastpipe's"


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
        return f"\n{extra['relays']:,} x {extra['payload'] // 1024} KiB"
    return f"\n{first['nbytes'] / (1 << 20):g} MiB per copy"


def _title(doc: Mapping[str, Any]) -> str:
    runs = doc.get("repeat", "?")
    return (
        f"fastpipe {doc.get('fastpipe', '?')} ({doc.get('implementation', '?')} core) vs "
        f"shutil.copyfileobj: CPython {doc.get('python', '?')}, {doc.get('cpus', '?')} CPUs, "
        f"median of {runs} run{'s' if runs != 1 else ''}, every byte verified"
    )
