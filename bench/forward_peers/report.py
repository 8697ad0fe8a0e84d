"""The figures of a run: what each table holds, the markdown and JSON, the targets.

A table's rows are its metrics, its columns the forwarders.  A cell is the
median over the rounds and, with more than one round, the range
``[min–max]``; a round in which a forwarder failed (did not exit in time,
an error) is counted below the median as "k failed".  Under each table, one
line per metric says which forwarder leads, and where a peer is ahead of
fastpipe, by how much.  The targets are the figures the forwarder is meant
to reach (``TARGETS``), checked against each fastpipe in the run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HIGHER = "higher"
LOWER = "lower"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str | None = None  # HIGHER, LOWER, or None: not a race
    fmt: str = ".1f"


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    metrics: tuple[Metric, ...]


def _fault_metrics() -> tuple[Metric, ...]:
    out = []
    for kind, what in (
        ("refused", "target refuses"),
        ("reset", "target resets"),
        ("silent", "target never answers"),
    ):
        out += [
            Metric(f"{kind}_closed_pct", f"{what}: clients closed, %", HIGHER, ".0f"),
            Metric(f"{kind}_close_s", f"{what}: median time to close, s", LOWER, ".2f"),
            Metric(
                f"{kind}_error_lines",
                f"{what}: end=error lines per attempt (1 expected)",
                None,
                ".2f",
            ),
            Metric(f"{kind}_threads_left", f"{what}: threads left after", LOWER, ".0f"),
            Metric(f"{kind}_fds_left", f"{what}: fds left after", LOWER, ".0f"),
            Metric(f"{kind}_kib_left", f"{what}: RSS left per attempt, KiB", LOWER, ".2f"),
        ]
    return tuple(out)


TABLES: tuple[Table, ...] = (
    Table(
        "churn",
        "Churn: HTTP requests to nginx, one connection each",
        (
            Metric("req_s", "requests/s", HIGHER, ",.0f"),
            Metric("cpu_us_conn", "forwarder CPU per connection, µs", LOWER, ",.0f"),
            Metric("failed", "failed requests", LOWER, ".0f"),
            Metric("threads", "forwarder threads after the run", LOWER, ",.0f"),
            Metric("rss_mib", "forwarder RSS after the run, MiB", LOWER, ".1f"),
        ),
    ),
    Table(
        "idle",
        "Idle: N idle connections held open",
        (
            Metric("threads", "threads with N open", LOWER, ",.0f"),
            Metric("kib_per_conn", "RSS per connection, KiB", LOWER, ".2f"),
            Metric("rss_start_mib", "RSS at idle start, MiB", None, ".1f"),
            Metric("rss_idle_mib", "RSS with N open, MiB", LOWER, ".1f"),
            Metric("fds", "fds with N open", None, ",.0f"),
            Metric("echo_failed", "connections that did not echo, of N", LOWER, ".0f"),
        ),
    ),
    Table(
        "bring-up",
        "Bring-up: N clients connect at once, each sends a ping",
        (
            Metric("bringup_s", "until all N echo, s", LOWER, ".3f"),
            Metric("problems", "not up by the deadline (failed, closed, pending)", LOWER, ".0f"),
            Metric("bringup2_s", "the second burst: until all N echo, s", LOWER, ".3f"),
        ),
    ),
    Table(
        "after-close",
        "After close: the N connections closed, then a second burst of N",
        (
            Metric("threads_after", "threads after the settle time", LOWER, ",.0f"),
            Metric("rss_after_mib", "RSS after the settle time, MiB", LOWER, ".1f"),
            Metric("rss_after_pct", "RSS after, over the idle start, %", LOWER, "+.0f"),
            Metric(
                "burst2_growth_pct", "second burst: peak RSS over the first's, %", LOWER, "+.1f"
            ),
            Metric("burst2_echo_failed", "second burst: did not echo, of N", LOWER, ".0f"),
        ),
    ),
    Table(
        "shutdown",
        "Shutdown: SIGTERM to the forwarder",
        (
            Metric("exit_open_s", "with N open: time to exit, s", LOWER, ".2f"),
            Metric("status_open", "with N open: exit status", None, ".0f"),
            Metric("exit_closed_s", "N just closed: time to exit, s", LOWER, ".2f"),
            Metric("status_closed", "N just closed: exit status", None, ".0f"),
        ),
    ),
    Table(
        "bulk",
        "Bulk: iperf3, one stream through the forwarder",
        (
            Metric("gbit_s", "Gbit/s", HIGHER, ".2f"),
            Metric("cpu_s_gib", "forwarder CPU s/GiB", LOWER, ".2f"),
            Metric("verify_bad", "checked transfer: bytes wrong or missing", LOWER, ".0f"),
        ),
    ),
    Table(
        "latency",
        "Latency: 100-byte round trips, everything pinned to one CPU",
        (
            Metric("rtt_us", "median round trip, µs", LOWER, ".1f"),
            Metric("added_us", "added over direct, µs", LOWER, "+.1f"),
            Metric("p99_us", "p99 round trip, µs", LOWER, ".1f"),
        ),
    ),
    Table("faults", "Faults: attempts to a dead target", _fault_metrics()),
    Table(
        "emfile",
        "At the fd limit (EMFILE): more clients than fds",
        (
            Metric("served", "clients served at the limit", None, ".0f"),
            Metric("closed", "clients closed at the limit", None, ".0f"),
            Metric("pending", "clients left waiting (backlog)", None, ".0f"),
            Metric("cpu_pct", "CPU while at the limit, % of a core", LOWER, ".1f"),
            Metric("accept_lines_s", "log lines about accept per second", LOWER, ".1f"),
            Metric(
                "backlog_served_pct",
                "waiting ones served once fds free (up to the room freed), %",
                HIGHER,
                ".0f",
            ),
            Metric("fresh_ok_pct", "new clients served after, %", HIGHER, ".0f"),
        ),
    ),
)

TABLE_BY_KEY = {table.key: table for table in TABLES}


class _Failed:
    """The value of a measurement that failed (a forwarder that did not exit in time...)."""

    def __repr__(self) -> str:
        return "FAILED"


#: Recorded in place of a value when its measurement failed; None means "not applicable".
FAILED: Any = _Failed()


@dataclass
class Results:
    """Per table, metric and forwarder: one value per round.

    A value is None where it does not apply or was not measured; ``failed``
    counts the rounds in which it was tried and failed.
    """

    rounds: int
    values: dict[str, dict[str, dict[str, list[float | None]]]] = field(default_factory=dict)
    failed: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    columns: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def record(self, table: str, peer: str, round_index: int, figures: dict[str, Any]) -> None:
        cols = self.columns.setdefault(table, [])
        if peer not in cols:
            cols.append(peer)
        metrics = self.values.setdefault(table, {})
        for key, value in figures.items():
            per_peer = metrics.setdefault(key, {})
            row = per_peer.setdefault(peer, [None] * self.rounds)
            if value is FAILED:
                row[round_index] = None
                counts = self.failed.setdefault(table, {}).setdefault(key, {})
                counts[peer] = counts.get(peer, 0) + 1
            else:
                row[round_index] = None if value is None else float(value)

    def failures(self, table: str, key: str, peer: str) -> int:
        return self.failed.get(table, {}).get(key, {}).get(peer, 0)

    def note(self, table: str, text: str) -> None:
        notes = self.notes.setdefault(table, [])
        if text not in notes:
            notes.append(text)

    def series(self, table: str, key: str, peer: str) -> list[float]:
        row = self.values.get(table, {}).get(key, {}).get(peer, [])
        return [v for v in row if v is not None]

    def median(self, table: str, key: str, peer: str) -> float | None:
        got = self.series(table, key, peer)
        return statistics.median(got) if got else None


def _fmt(value: float, fmt: str) -> str:
    return format(value, fmt)


def _cell(results: Results, table: str, metric: Metric, peer: str) -> str:
    row = results.values.get(table, {}).get(metric.key, {}).get(peer)
    if row is None:
        return "-"
    got = [v for v in row if v is not None]
    missing = results.failures(table, metric.key, peer)
    if not got:
        return "failed" if missing else "-"
    text = _fmt(statistics.median(got), metric.fmt)
    if len(got) > 1:
        text += f" [{_fmt(min(got), metric.fmt)}–{_fmt(max(got), metric.fmt)}]"
    if missing:
        text += f" ({missing} failed)"
    return text


def _ratio(a: float, b: float, fmt: str) -> str:
    """ ", 3.2x" between two figures, unless one of them shows as zero."""
    if float(_fmt(a, fmt).replace(",", "")) == 0 or float(_fmt(b, fmt).replace(",", "")) == 0:
        return ""
    if a * b < 0:
        return ""
    r = max(abs(a), abs(b)) / min(abs(a), abs(b))
    return f", {r:.1f}x" if r >= 1.1 else ""


def verdicts(results: Results, table: Table, fastpipes: list[str]) -> list[str]:
    """One line per raced metric: who leads, and who is ahead of each fastpipe."""
    lines = []
    cols = [c for c in results.columns.get(table.key, []) if c != "direct"]
    for metric in table.metrics:
        if metric.better is None:
            continue
        medians = {c: results.median(table.key, metric.key, c) for c in cols}
        have = {c: m for c, m in medians.items() if m is not None}
        if len(have) < 2:
            continue
        sign = 1 if metric.better == HIGHER else -1
        leader = max(have, key=lambda c: sign * have[c])
        parts = [f"{metric.label}: {leader} leads ({_fmt(have[leader], metric.fmt)})"]
        for fp in fastpipes:
            if fp not in have or fp == leader:
                continue
            ahead = sorted(
                (c for c in have if c != fp and sign * have[c] > sign * have[fp]),
                key=lambda c: -sign * have[c],
            )
            if not ahead:
                continue
            desc = ", ".join(
                f"{c} {_fmt(have[c], metric.fmt)}{_ratio(have[c], have[fp], metric.fmt)}"
                for c in ahead
            )
            parts.append(f"ahead of {fp} ({_fmt(have[fp], metric.fmt)}): {desc}")
        lines.append("; ".join(parts))
    return lines


# -- targets ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A figure fastpipe is meant to reach: ``check(results, fastpipe)`` says how it did."""

    workload: str
    text: str
    check: Callable[[Results, str], tuple[str, bool | None]]


def _limit(table: str, key: str, limit: float, fmt: str, at_most: bool = True) -> Any:
    def check(results: Results, fp: str) -> tuple[str, bool | None]:
        value = results.median(table, key, fp)
        if value is None:
            return "not measured", None
        ok = value <= limit if at_most else value >= limit
        return format(value, fmt), ok

    return check


def _against(table: str, key: str, peer: str, factor: float, higher: bool, fmt: str) -> Any:
    """fastpipe's median against ``factor`` times ``peer``'s."""

    def check(results: Results, fp: str) -> tuple[str, bool | None]:
        value = results.median(table, key, fp)
        other = results.median(table, key, peer)
        if value is None or other is None:
            return ("not measured" if value is None else f"{value:{fmt}}; no {peer}"), None
        bound = factor * other
        ok = value >= bound if higher else value <= bound
        return f"{value:{fmt}} against {peer} {other:{fmt}}", ok

    return check


def _after_close(results: Results, fp: str) -> tuple[str, bool | None]:
    back = results.median("after-close", "rss_after_pct", fp)
    growth = results.median("after-close", "burst2_growth_pct", fp)
    if back is None and growth is None:
        return "not measured", None
    text = f"RSS {back:+.0f}% over idle start" if back is not None else "RSS after: -"
    text += f", second burst {growth:+.1f}%" if growth is not None else ""
    ok = (back is not None and back <= 10) or (growth is not None and growth <= 10)
    return text, ok


def _latency(results: Results, fp: str) -> tuple[str, bool | None]:
    value = results.median("latency", "added_us", fp)
    others = {
        p: results.median("latency", "added_us", p)
        for p in results.columns.get("latency", [])
        if p in ("haproxy", "socat")
    }
    others = {p: v for p, v in others.items() if v is not None}
    if value is None or not others:
        return ("not measured" if value is None else f"{value:+.1f} µs; no peer"), None
    text = f"{value:+.1f} µs against " + ", ".join(f"{p} {v:+.1f}" for p, v in others.items())
    return text, value <= min(others.values())


def _faults(attempts: int) -> Any:
    # A few more workers (a pool grown to the batch's concurrency) are not a
    # pile-up; one thread or fd per 20 attempts is.
    allowed = max(2, attempts // 20)

    def check(results: Results, fp: str) -> tuple[str, bool | None]:
        parts, ok, seen = [], True, False
        for kind in ("refused", "reset", "silent"):
            closed = results.median("faults", f"{kind}_closed_pct", fp)
            lines = results.median("faults", f"{kind}_error_lines", fp)
            threads = results.median("faults", f"{kind}_threads_left", fp) or 0
            fds = results.median("faults", f"{kind}_fds_left", fp) or 0
            if closed is None:
                continue
            seen = True
            parts.append(
                f"{kind}: {closed:.0f}% closed, {lines if lines is not None else 0:.2f} lines,"
                f" {threads:+.0f} threads, {fds:+.0f} fds"
            )
            ok = ok and closed == 100 and lines == 1 and threads <= allowed and fds <= allowed
        return ("; ".join(parts), ok) if seen else ("not measured", None)

    return check


def _emfile(results: Results, fp: str) -> tuple[str, bool | None]:
    cpu = results.median("emfile", "cpu_pct", fp)
    fresh = results.median("emfile", "fresh_ok_pct", fp)
    if cpu is None:
        return "not measured", None
    text = f"{cpu:.1f}% CPU at the limit, {fresh if fresh is not None else 0:.0f}% served after"
    return text, cpu <= 5 and fresh == 100


def _shutdown(grace: float) -> Any:
    def check(results: Results, fp: str) -> tuple[str, bool | None]:
        a = results.median("shutdown", "exit_open_s", fp)
        b = results.median("shutdown", "exit_closed_s", fp)
        if a is None and b is None:
            failed = results.failures("shutdown", "exit_open_s", fp) or results.failures(
                "shutdown", "exit_closed_s", fp
            )
            return ("failed (see the notes)", False) if failed else ("not measured", None)
        parts = [f"{name} {v:.2f} s" for name, v in (("open", a), ("closed", b)) if v is not None]
        worst = max(v for v in (a, b) if v is not None)
        return ", ".join(parts) + f" (grace {grace:g})", worst <= grace + 1

    return check


def targets(meta: dict[str, Any]) -> tuple[Target, ...]:
    grace = meta["grace"]
    attempts = meta["fault_attempts"]
    return (
        Target(
            "churn",
            "forwarder CPU per connection at most 100 µs",
            _limit("churn", "cpu_us_conn", 100, ".0f"),
        ),
        Target(
            "churn",
            "requests/s at least 2x the asyncio forwarder's",
            _against("churn", "req_s", "asyncio", 2.0, True, ",.0f"),
        ),
        Target(
            "churn",
            "aim: requests/s within 2x of HAProxy",
            _against("churn", "req_s", "haproxy", 0.5, True, ",.0f"),
        ),
        Target("idle", "at most 16 threads with N idle", _limit("idle", "threads", 16, ".0f")),
        Target(
            "idle",
            "at most 3 KiB of RSS per idle connection",
            _limit("idle", "kib_per_conn", 3, ".2f"),
        ),
        Target("idle", "aim: 1 KiB per idle connection", _limit("idle", "kib_per_conn", 1, ".2f")),
        Target("idle", "every connection still echoes", _limit("idle", "echo_failed", 0, ".0f")),
        Target(
            "after-close",
            "threads at most 16 after the settle time",
            _limit("after-close", "threads_after", 16, ".0f"),
        ),
        Target(
            "after-close",
            "RSS within 10% of idle start, or a second burst grows it at most 10%",
            _after_close,
        ),
        Target(
            "bring-up",
            "all N echo within 2x HAProxy's time",
            _against("bring-up", "bringup_s", "haproxy", 2.0, False, ".2f"),
        ),
        Target("shutdown", "exit within --grace + 1 s", _shutdown(grace)),
        Target(
            "bulk",
            "Gbit/s at least HAProxy's",
            _against("bulk", "gbit_s", "haproxy", 1.0, True, ".2f"),
        ),
        Target(
            "bulk",
            "CPU s/GiB at most HAProxy's",
            _against("bulk", "cpu_s_gib", "haproxy", 1.0, False, ".2f"),
        ),
        Target("bulk", "no lost or reordered byte", _limit("bulk", "verify_bad", 0, ".0f")),
        Target("latency", "pinned added latency no worse than HAProxy's or socat's", _latency),
        Target(
            "faults",
            "dead targets: every client closed, one end=error line each, nothing left"
            f" (threads and fds after within {max(2, attempts // 20)} of before)",
            _faults(attempts),
        ),
        Target("emfile", "at the fd limit: no spinning (≤ 5% CPU), serves again after", _emfile),
    )


# -- output -----------------------------------------------------------------------


def markdown(results: Results, meta: dict[str, Any], fastpipes: list[str]) -> str:
    out = [f"# fastpipe forward against its peers ({meta['started']})", ""]
    for line in meta["describe"]:
        out.append(f"- {line}")
    out.append("")
    for table in TABLES:
        cols = results.columns.get(table.key)
        if not cols:
            continue
        title = table.title.replace("N ", f"{meta['conns']:,} ")
        out += [f"## {title}", ""]
        out.append("| | " + " | ".join(cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for metric in table.metrics:
            if metric.key not in results.values.get(table.key, {}):
                continue
            cells = [_cell(results, table.key, metric, c) for c in cols]
            out.append(f"| {metric.label} | " + " | ".join(cells) + " |")
        out.append("")
        for line in verdicts(results, table, fastpipes):
            out.append(f"- {line}")
        for note in results.notes.get(table.key, []):
            out.append(f"- note: {note}")
        out.append("")
    checked = target_report(results, fastpipes, meta)
    if checked:
        out += ["## Targets", "", "| target | fastpipe | figure | met |", "|---|---|---|---|"]
        for row in checked:
            met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
            out.append(f"| {row['target']} | {row['fastpipe']} | {row['figure']} | {met} |")
        out.append("")
    return "\n".join(out)


def target_report(
    results: Results, fastpipes: list[str], meta: dict[str, Any]
) -> list[dict[str, Any]]:
    rows = []
    for target in targets(meta):
        if target.workload not in results.columns:
            continue
        for fp in fastpipes:
            figure, met = target.check(results, fp)
            rows.append({"target": target.text, "fastpipe": fp, "figure": figure, "met": met})
    return rows


def as_json(results: Results, meta: dict[str, Any], fastpipes: list[str]) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for table in TABLES:
        cols = results.columns.get(table.key)
        if not cols:
            continue
        metrics = []
        for metric in table.metrics:
            per_peer = results.values.get(table.key, {}).get(metric.key)
            if per_peer is None:
                continue
            metrics.append(
                {
                    "key": metric.key,
                    "label": metric.label,
                    "better": metric.better,
                    "rounds": per_peer,
                    "failed_rounds": results.failed.get(table.key, {}).get(metric.key, {}),
                    "median": {c: results.median(table.key, metric.key, c) for c in per_peer},
                }
            )
        tables[table.key] = {
            "title": table.title,
            "columns": cols,
            "metrics": metrics,
            "verdicts": verdicts(results, table, fastpipes),
            "notes": results.notes.get(table.key, []),
        }
    return {
        "meta": meta,
        "tables": tables,
        "targets": target_report(results, fastpipes, meta),
    }
