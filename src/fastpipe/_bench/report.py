"""The text report of ``fastpipe bench``: tables with the workloads down and
the methods across, the extra baselines, both twins, and the footnotes."""

from __future__ import annotations

import os
import platform
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import fastpipe
from fastpipe._bench import verdict
from fastpipe._bench.common import GiB, MiB
from fastpipe._bench.host import cpus_to_warm
from fastpipe._bench.methods import (
    COPYFILE,
    COPYFILEOBJ,
    COPYFILEOBJ_POOL,
    FASTPIPE,
    FASTPIPE_IDLE,
    FASTPIPE_RW,
    FASTPIPE_TWIN,
    METHOD_TITLES,
    READWRITE_LOOP,
    SETUP_ONLY,
    SOCKET_SENDFILE,
    SPLICE_LOOP,
)
from fastpipe._bench.runner import Result
from fastpipe._bench.small_relays import SMALL_IN_FLIGHT, SMALL_PAYLOAD, SmallRelays
from fastpipe._bench.twins import TWIN_NAMES
from fastpipe._bench.workloads import SPIN_BASELINE_DIVISOR, SPIN_SUSTAINED, TcpMainSpins


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def _fmt_size(nbytes: int) -> str:
    if nbytes >= MiB and nbytes % MiB == 0:
        return f"{nbytes // MiB} MiB"
    return f"{nbytes / MiB:.1f} MiB"


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if x > 0 and y > 0 else "-"


_COLUMNS = (FASTPIPE, COPYFILEOBJ, COPYFILEOBJ_POOL)
_WIDTHS = (26, 17, 17, 18)  # the label, then one per method; the last column is free


@dataclass
class _Row:
    """One table row: a workload's results, or the same net of setup."""

    label: str
    cases: dict[str, Result]
    #: Subtracted from every case (the setup-only figures, for the net row).
    minus_wall: float = 0.0
    minus_cpu: float = 0.0

    def wall(self, method: str) -> float:
        return self.cases[method].median - self.minus_wall

    def mib_s(self, method: str) -> float:
        wall = self.wall(method)
        return self.cases[method].nbytes / MiB / wall if wall > 0 else 0.0

    def cpu(self, method: str) -> float:
        return max(0.0, self.cases[method].cpu - self.minus_cpu)

    def cpu_per_byte(self, method: str) -> float:
        return self.cpu(method) / self.cases[method].nbytes

    def ratios(self, value: Callable[[str], float], *, baseline_over_fastpipe: bool) -> str:
        parts = []
        for method in _COLUMNS[1:]:
            if method in self.cases:
                fp, base = value(FASTPIPE), value(method)
                parts.append(_ratio(base, fp) if baseline_over_fastpipe else _ratio(fp, base))
        return " | ".join(parts)


def _line(cells: Sequence[str]) -> str:
    padded = [c.ljust(w) for c, w in zip(cells, _WIDTHS, strict=False)]
    return "".join(padded + list(cells[len(_WIDTHS) :])).rstrip()


def _label(fp: Result) -> str:
    """A workload's name in the first column, from its fastpipe result."""
    if fp.workload == SmallRelays.workload:
        return f"small relays {fp.extra['relays']}x{fp.extra['payload'] // 1024} KiB"
    return f"{fp.title:<16} {_fmt_size(fp.nbytes)}"


def _rows(grouped: dict[str, dict[str, Result]]) -> list[_Row]:
    rows = []
    for cases in grouped.values():
        rows.append(_Row(_label(cases[FASTPIPE]), cases))
        if SETUP_ONLY in cases:
            setup = cases[SETUP_ONLY]
            rows.append(_Row("  net of setup", cases, setup.median, setup.cpu))
    return rows


def _wall_table(rows: list[_Row]) -> list[str]:
    head = [METHOD_TITLES[m] for m in _COLUMNS]
    lines = [_line(["wall ms: median [best]", *head, "reference"])]
    for row in rows:
        cells = [row.label]
        for method in _COLUMNS:
            r = row.cases.get(method)
            if r is None:
                cells.append("-")
            elif row.minus_wall:
                cells.append(_fmt_ms(row.wall(method)))
            else:
                # The spinning copyfileobj moves fewer bytes: flag its time.
                mark = "*" if r.workload == TcpMainSpins.workload and method != FASTPIPE else ""
                cells.append(f"{_fmt_ms(r.median)} [{_fmt_ms(r.best)}]{mark}")
        ref = ""
        for method, what in ((SETUP_ONLY, "setup only"), (FASTPIPE_IDLE, "fastpipe, main idle")):
            r = row.cases.get(method)
            if r is not None and not row.minus_wall:
                ref = f"{_fmt_ms(r.median)} [{_fmt_ms(r.best)}] {what}"
        lines.append(_line([*cells, ref]))
    return lines


def _throughput_table(rows: list[_Row]) -> list[str]:
    head = [METHOD_TITLES[m] for m in _COLUMNS]
    pool = any(COPYFILEOBJ_POOL in row.cases for row in rows)
    title = "speed-up" + (" (vs copyfileobj | +pool)" if pool else "")
    lines = [_line(["MiB/s (median)", *head, title])]
    for row in rows:
        cells = [row.label]
        cells += [f"{row.mib_s(m):.0f}" if m in row.cases else "-" for m in _COLUMNS]
        lines.append(_line([*cells, row.ratios(row.mib_s, baseline_over_fastpipe=False)]))
    return lines


def _cpu_table(rows: list[_Row]) -> list[str]:
    head = [METHOD_TITLES[m] for m in _COLUMNS]
    lines = [_line(["relay CPU s [s/GiB]", *head, "CPU/byte: baseline/fastpipe"])]
    for row in rows:
        cells = [row.label]
        for method in _COLUMNS:
            if method in row.cases:
                per_gib = row.cpu_per_byte(method) * GiB
                cells.append(f"{row.cpu(method):.3f} [{per_gib:.2f}]")
            else:
                cells.append("-")
        lines.append(_line([*cells, row.ratios(row.cpu_per_byte, baseline_over_fastpipe=True)]))
    return lines


_EXTRA_METHODS = (FASTPIPE_RW, SPLICE_LOOP, READWRITE_LOOP, COPYFILE, SOCKET_SENDFILE)


def _baselines_table(grouped: dict[str, dict[str, Result]]) -> list[str]:
    """Each bulk workload's fastpipe row next to the kernel-path baselines.

    Total CPU adds the endpoint processes' CPU to the relay's: a kernel path
    can move work onto them (splice leaves the copying to the receiver).
    """
    widths = (26, 28, 16, 8, 10, 10, 0)  # 28: "fastpipe (copy_file_range)"
    lines = [
        "".join(
            c.ljust(w)
            for c, w in zip(
                (
                    "more baselines",
                    "method",
                    "ms: med [best]",
                    "MiB/s",
                    "CPU s/GiB",
                    "+ends",
                    "fastpipe: speed-up, CPU/byte",
                ),
                widths,
                strict=True,
            )
        ).rstrip()
    ]
    for cases in grouped.values():
        extra = [m for m in _EXTRA_METHODS if m in cases]
        if not extra or FASTPIPE not in cases:
            continue
        fp = cases[FASTPIPE]
        label = _label(fp)
        for i, method in enumerate((FASTPIPE, COPYFILEOBJ, *extra)):
            r = cases.get(method)
            if r is None:
                continue
            total = r.extra.get("total_cpu_s")
            per_gib = GiB / r.nbytes if r.nbytes else 0.0
            vs = ""
            if method != FASTPIPE:
                vs = f"{_ratio(fp.mib_s, r.mib_s)}, {_ratio(r.cpu, fp.cpu)}"
                if total and fp.extra.get("total_cpu_s"):
                    vs += f" (total {_ratio(total, fp.extra['total_cpu_s'])})"
            name = METHOD_TITLES[method]
            if method == FASTPIPE and fp.extra.get("method_used"):
                name = f"fastpipe ({fp.extra['method_used']})"
            cells = (
                label if i == 0 else "",
                name,
                f"{_fmt_ms(r.median)} [{_fmt_ms(r.best)}]",
                f"{r.mib_s:.0f}",
                f"{r.cpu_per_gib:.2f}",
                f"{total * per_gib:.2f}" if total else "-",
                vs,
            )
            lines.append("".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    if len(lines) == 1:
        return []
    lines.append(
        "  speed-up = baseline's time / fastpipe's; CPU/byte = baseline's relay CPU / fastpipe's "
        "(above 1 is fastpipe cheaper); +ends = relay and endpoint processes together, s/GiB."
    )
    return lines


def _twins_table(grouped: dict[str, dict[str, Result]]) -> list[str]:
    """fastpipe.relay on this process's implementation and on the other twin."""
    pairs = [
        (cases[FASTPIPE], cases[FASTPIPE_TWIN])
        for cases in grouped.values()
        if FASTPIPE in cases and FASTPIPE_TWIN in cases
    ]
    if not pairs:
        return []
    twin = pairs[0][1].extra["implementation"]
    this = TWIN_NAMES["c" if twin == "py" else "py"]
    other = TWIN_NAMES[twin]
    widths = (26, 24, 10, 24, 10, 0)
    head = ("both twins", f"{this}: ms", "MiB/s", f"{other}: ms", "MiB/s", "time ratio")
    lines = ["".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    for fp, tw in pairs:
        cells = (
            _label(fp),
            f"{_fmt_ms(fp.median)} [{_fmt_ms(fp.best)}]",
            f"{fp.mib_s:.0f}",
            f"{_fmt_ms(tw.median)} [{_fmt_ms(tw.best)}]",
            f"{tw.mib_s:.0f}",
            _ratio(tw.median, fp.median),
        )
        lines.append("".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    note = (
        f"time ratio = {other}'s / {this}'s. Both run fastpipe.relay through the same "
        f"WorkerPool, the {other} in a child process (FASTPIPE_NO_EXTENSIONS="
        f"{'1' if twin == 'py' else '0'}) that runs the same cases and verifies every byte."
    )
    lines += textwrap.wrap(note, width=98, initial_indent="  ", subsequent_indent="    ")
    return lines


def _footnotes(grouped: dict[str, dict[str, Result]]) -> list[str]:
    # Paragraphs; one starting with "  " continues the one before it.
    paragraphs = [
        "copyfileobj = shutil.copyfileobj (64 KiB chunks) from open(fd, 'rb', buffering=0) to "
        "open(fd, 'wb'), in the calling thread for the bulk rows; fastpipe = relay(...).result() "
        "(a pool worker copies). Both close the same ends. The endpoints run in other processes: "
        "CPU is this process's, i.e. the relay's (plus the main thread's when it only waits).",
    ]
    small = grouped.get(SmallRelays.workload)
    if small:
        n = small[FASTPIPE].extra["in_flight"]
        paragraphs += [
            f"small relays: AF_UNIX socketpairs, {n} in flight; copyfileobj = a new "
            f"threading.Thread per relay, +pool = ThreadPoolExecutor({n}); setup only = the same "
            "socketpairs, writes, closes and drain without a relay.",
        ]
    spin = grouped.get(TcpMainSpins.workload)
    if spin:
        paragraphs.append(
            "TCP, main spins: the main thread runs a Python loop until the copy is done; "
            "relay CPU excludes it."
        )
        if COPYFILEOBJ in spin:
            loops = ", ".join(
                f"{METHOD_TITLES[m]} {spin[m].extra.get('main_loops_per_s', 0):,}"
                for m in (FASTPIPE, COPYFILEOBJ)
            )
            paragraphs += [
                f"  * copyfileobj runs in a thread and moves {_fmt_size(spin[COPYFILEOBJ].nbytes)}"
                f" (1/{SPIN_BASELINE_DIVISOR}): compare MiB/s and s/GiB, not ms.",
                f"  Main-thread loops/s meanwhile: {loops}.",
            ]
            if spin[COPYFILEOBJ].nbytes < SPIN_SUSTAINED:
                # On a 2-CPU machine copyfileobj moves 2 MiB in 7-29 ms, each
                # read and write taking 0.01-0.25 ms, and 16 MiB in 3-4 s,
                # 5 ms (the GIL's switch interval) for each.
                paragraphs.append(
                    f"  At this size the sender has put most of copyfileobj's bytes in the socket"
                    f" buffers before it starts: its reads do not block, so it seldom waits for"
                    f" the GIL. Its sustained rate is the one with --size"
                    f" {SPIN_SUSTAINED * SPIN_BASELINE_DIVISOR // MiB} or more."
                )
        if FASTPIPE_IDLE in spin:
            ratio = _ratio(spin[FASTPIPE].median, spin[FASTPIPE_IDLE].median)
            paragraphs.append(
                f"  fastpipe spinning/idle wall time: {ratio} (the spinning thread also takes "
                f"one of the {os.cpu_count()} CPUs from the relay and the endpoints)."
            )
    lines = []
    for text in paragraphs:
        indent = "  " if text.startswith("  ") else ""
        lines += textwrap.wrap(
            text.strip(), width=98, initial_indent=indent, subsequent_indent=indent + "  "
        )
    return lines


def _verdict_lines(grouped: dict[str, dict[str, Result]]) -> list[str]:
    """One line per workload: fastpipe against the fastest standard-library way."""
    found = verdict.verdicts(r for cases in grouped.values() for r in cases.values())
    if not found:
        return []
    width = _WIDTHS[0]
    lines = [f"{'verdict':<{width}}fastpipe.relay vs the fastest standard-library way"]
    for v in found:
        lines.append(f"{_label(grouped[v.workload][FASTPIPE]):<{width}}{verdict.describe(v)}")
    lines += textwrap.wrap(
        verdict.EXPLANATION, width=98, initial_indent="  ", subsequent_indent="    "
    )
    return lines


def format_report(results: Sequence[Result], header: str) -> str:
    """The verdicts, then the side-by-side tables: workloads down, methods across.

    Args:
        results: what ``run_workload`` returned, for any of the workloads.
        header: the lines to print first.

    Returns:
        One verdict line per workload (``verdict``), three tables (wall
        time, throughput, relay CPU), the extra baselines and both twins,
        and the footnotes.
    """
    grouped: dict[str, dict[str, Result]] = {}
    for r in results:
        grouped.setdefault(r.workload, {})[r.method] = r
    rows = _rows(grouped)
    lines = [header, ""]
    verdicts = _verdict_lines(grouped)
    if verdicts:
        lines += [*verdicts, ""]
    for table in (_wall_table, _throughput_table, _cpu_table):
        lines += [*table(rows), ""]
    for extra_table in (_baselines_table, _twins_table):
        extra_lines = extra_table(grouped)
        if extra_lines:
            lines += [*extra_lines, ""]
    lines += _footnotes(grouped)
    return "\n".join(lines)


def header(size: int, relays: int, repeat: int, directory: str) -> str:
    """The report's first lines: versions, machine, sizes and where the files went."""
    rounds = "1 round" if repeat == 1 else f"{repeat} rounds"
    return (
        f"fastpipe {fastpipe.__version__} ({fastpipe.IMPLEMENTATION} core) vs shutil.copyfileobj"
        f" | {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs\n"
        f"bulk: {_fmt_size(size)} per copy; small: {relays} relays x {SMALL_PAYLOAD // 1024} "
        f"KiB, {SMALL_IN_FLIGHT} in flight; {rounds} each, every byte verified"
        + f"\nfiles in {os.path.dirname(directory)}"
        + (
            "; the host takes free pages back: every CPU frees a file's worth of pages"
            " before a file round"
            if cpus_to_warm()
            else ""
        )
    )
