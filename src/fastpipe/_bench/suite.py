"""``fastpipe bench``: every workload, the other twin and the idle memory,
then the text report and the JSON document."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TextIO

import fastpipe
from fastpipe._bench.common import BenchError, MiB
from fastpipe._bench.host import cpus_to_warm, new_scratch_dir
from fastpipe._bench.memory import PARKED_PROXIES, PARKED_RELAYS, measure_parked
from fastpipe._bench.report import format_report, header
from fastpipe._bench.runner import Result, build_cases, run_workload
from fastpipe._bench.small_relays import SMALL_IN_FLIGHT, SMALL_PAYLOAD, SMALL_RELAYS
from fastpipe._bench.twins import TWIN_NAMES, measure_other_twin, other_twin
from fastpipe._bench.verdict import MIN_ROUNDS, NOISE, verdicts
from fastpipe._bench.workloads import SPIN_BASELINE_DIVISOR

DEFAULT_SIZE_MIB = 64
#: Rounds per case: the fewest that give every workload a verdict.
DEFAULT_REPEAT = MIN_ROUNDS


def _progress_line(err: TextIO) -> Callable[[str], None]:
    def progress(text: str) -> None:
        err.write(f"\r\x1b[K{text}")
        err.flush()

    return progress


def run_bench(
    size_mib: int = DEFAULT_SIZE_MIB,
    repeat: int = DEFAULT_REPEAT,
    relays: int = SMALL_RELAYS,
    json_path: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``fastpipe bench``: run every workload, print the tables, maybe write JSON.

    Args:
        size_mib: bytes per bulk copy, in MiB.
        repeat: rounds per case; the tables show the median and the best,
            and a workload's verdict needs ``MIN_ROUNDS`` of them.
        relays: small relays per round, a multiple of ``SMALL_IN_FLIGHT``.
        json_path: a file for the machine-readable results; ``-`` for stdout.
        out: where the tables go (stdout; ``err`` when the JSON goes to stdout).
        err: where progress goes, when it is a terminal (stderr).

    Returns:
        The exit status: 0.

    Raises:
        BenchError: a copy moved the wrong bytes, or an endpoint failed.
        ValueError: ``relays`` is not a positive multiple of ``SMALL_IN_FLIGHT``.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    tables = err if json_path == "-" else out
    if json_path not in (None, "-"):
        # Fail before the run, not after it.
        where = os.path.dirname(os.path.abspath(json_path))
        if not os.access(where, os.W_OK):
            raise BenchError(f"cannot write the JSON file {json_path!r}: {where} is not writable")
    size = size_mib * MiB
    progress = _progress_line(err) if err.isatty() else None
    started = time.perf_counter()
    directory = new_scratch_dir(size)
    results: list[Result] = []
    try:
        for cases in build_cases(size, relays, directory):
            results += run_workload(cases, repeat, progress)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if progress is not None:
            progress("")
    twin = other_twin()
    if twin is not None:
        if progress is not None:
            progress(f"fastpipe ({TWIN_NAMES[twin]}): every workload, in a child process")
        try:
            results += measure_other_twin(size, relays, repeat, twin)
        finally:
            if progress is not None:
                progress("")
    if progress is not None:
        progress("parked relays and connections, in fresh processes")
    parked_relays = measure_parked("relay", PARKED_RELAYS)
    parked_proxies = measure_parked("proxy", PARKED_PROXIES)
    if progress is not None:
        progress("")
    elapsed = time.perf_counter() - started
    report = format_report(results, header(size, relays, repeat, directory))
    memory = "\n".join(
        (
            "parked (each measured in a fresh process):",
            _parked_line(parked_relays, "relays parked on idle pipes", "relay"),
            _parked_line(
                parked_proxies, "proxy() connections parked on idle sockets", "connection"
            ),
        )
    )
    tables.write(f"{report}\n{memory}\n(total {elapsed:.1f} s)\n")
    if json_path is not None:
        idle = {
            "relays": parked_relays["n"],
            "rss_kib_per_relay": round(parked_relays["rss_kib_each"], 2),
            "threads": parked_relays["threads"],
            "workers": parked_relays["workers"],
            "buffers_in_use": parked_relays["buffers_in_use"],
            "pipes_in_use": parked_relays["pipes_in_use"],
            "proxies": parked_proxies["n"],
            "rss_kib_per_proxy": round(parked_proxies["rss_kib_each"], 2),
            "proxy_threads": parked_proxies["threads"],
            "proxy_buffers_in_use": parked_proxies["buffers_in_use"],
            "proxy_pipes_in_use": parked_proxies["pipes_in_use"],
            "proxies_echoed": parked_proxies["ok"],
        }
        _write_json(json_path, results, size, relays, repeat, idle, out)
    return 0


def _parked_line(m: dict[str, int | float], what: str, each: str) -> str:
    ended = "all ended right" if m["ok"] == m["n"] else f"only {m['ok']} ended right"
    echo = ", every one echoed" if "connections" in what and m["ok"] == m["n"] else ""
    return (
        f"  {m['n']} {what}: {m['rss_kib_each']:.2f} KiB of RSS per {each}, {m['threads']} threads"
        f" in the process, {m['buffers_in_use']} buffers and {m['pipes_in_use']} pipes held;"
        f" {ended}{echo}"
    )


def _write_json(
    path: str,
    results: Sequence[Result],
    size: int,
    relays: int,
    repeat: int,
    idle_memory: dict[str, float | int],
    out: TextIO,
) -> None:
    doc = {
        "fastpipe": fastpipe.__version__,
        "implementation": fastpipe.IMPLEMENTATION,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "size_bytes": size,
        "small_relays": relays,
        "small_payload": SMALL_PAYLOAD,
        "small_in_flight": SMALL_IN_FLIGHT,
        "spin_baseline_divisor": SPIN_BASELINE_DIVISOR,
        "repeat": repeat,
        "warm_page_lists": bool(cpus_to_warm()),
        "results": [
            asdict(r)
            | {
                "median_s": r.median,
                "best_s": r.best,
                "MiB_per_s": r.mib_s,
                "relay_cpu_s": r.cpu,
                "cpu_s_per_GiB": r.cpu_per_gib,
            }
            for r in results
        ],
        "idle_memory": idle_memory,
        "verdict_rule": {"noise": NOISE, "min_rounds": MIN_ROUNDS},
        "verdicts": [asdict(v) for v in verdicts(results)],
    }
    text = json.dumps(doc, indent=2) + "\n"
    if path == "-":
        out.write(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
