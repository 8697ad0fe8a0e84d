"""``fastpipe bench``: its arguments, and the run with an optional plot."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from typing import Any

from fastpipe._bench import common, suite
from fastpipe._bench import plot as _plot
from fastpipe._bench.small_relays import SMALL_IN_FLIGHT, SMALL_PAYLOAD, SMALL_RELAYS
from fastpipe._bench.verdict import EXPLANATION, MIN_ROUNDS
from fastpipe._cli.args import positive_int, positive_multiple_of


def add_parser(commands: Any, summary: str) -> None:
    """Add the ``bench`` subcommand to ``commands`` (an argparse subparsers action),
    with ``summary`` as its line in ``fastpipe --help``."""
    what = (
        "Compare fastpipe.relay with shutil.copyfileobj and the standard library's other "
        "ways on file->file, pipe->file, TCP->TCP, file->TCP and pipe->TCP copies "
        "(endpoints in other processes; one per kernel path), many small relays "
        f"({SMALL_PAYLOAD // 1024} KiB each, {SMALL_IN_FLIGHT} in flight), and a TCP relay "
        "while the main thread spins in Python. Every byte is verified; the tables show the "
        "median and best wall time, MiB/s and the relay's CPU time."
    )
    bench = commands.add_parser(
        "bench",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(textwrap.fill(text, 78) for text in (what, EXPLANATION)),
    )
    bench.add_argument(
        "--size",
        type=positive_int,
        default=suite.DEFAULT_SIZE_MIB,
        metavar="MiB",
        help="bytes per bulk copy, in MiB (default: %(default)s)",
    )
    bench.add_argument(
        "--repeat",
        type=positive_int,
        default=suite.DEFAULT_REPEAT,
        metavar="N",
        help=(
            "rounds per case; the tables show the median and the best, and a verdict "
            f"needs at least {MIN_ROUNDS} (default: %(default)s)"
        ),
    )
    bench.add_argument(
        "--relays",
        type=positive_multiple_of(SMALL_IN_FLIGHT),
        default=SMALL_RELAYS,
        metavar="N",
        help=f"small relays per round, a multiple of {SMALL_IN_FLIGHT} (default: %(default)s)",
    )
    bench.add_argument(
        "--json",
        metavar="FILE",
        help="also write the results as JSON to FILE ('-' for standard output)",
    )
    bench.add_argument(
        "--plot",
        metavar="FILE.png",
        help=(
            "also draw the results as a bar chart in FILE.png (needs matplotlib, the 'plot' extra)"
        ),
    )
    bench.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    if args.plot is not None:
        problem = _plot_problem(args.plot)
        if problem is not None:
            # Before the benchmark: a missing extra should not cost a run.
            print(f"fastpipe bench: error: {problem}", file=sys.stderr)
            return 2
    try:
        if args.plot is None:
            return suite.run_bench(
                size_mib=args.size, repeat=args.repeat, relays=args.relays, json_path=args.json
            )
        return _bench_and_plot(args)
    except (common.BenchError, OSError) as exc:
        # BenchError: wrong bytes or a failed endpoint; OSError: no room on
        # tmpfs, no fds left, or an error from a copy.
        what = str(exc) if isinstance(exc, common.BenchError) else f"{type(exc).__name__}: {exc}"
        print(f"fastpipe bench: error: {what}", file=sys.stderr)
        return 1


def _plot_problem(path: str) -> str | None:
    """Why ``--plot path`` cannot work, or None."""
    try:
        _plot.check_available()
    except _plot.PlotUnavailable as exc:
        return str(exc)
    where = os.path.dirname(os.path.abspath(path))
    if not os.access(where, os.W_OK):
        return f"cannot write the plot {path!r}: {where} is not writable"
    return None


def _bench_and_plot(args: argparse.Namespace) -> int:
    """``bench --plot``: the plot is drawn from the JSON document that the run wrote.

    Going through the JSON (a temporary file when --json did not name one)
    keeps the plot to exactly what ``--json`` reports and leaves the harness
    unaware of plotting.
    """
    to_stdout = args.json == "-"
    scratch = None
    json_path = args.json
    if json_path is None or to_stdout:
        fd, scratch = tempfile.mkstemp(prefix="fastpipe-bench-", suffix=".json")
        os.close(fd)
        json_path = scratch
    try:
        status = suite.run_bench(
            size_mib=args.size,
            repeat=args.repeat,
            relays=args.relays,
            json_path=json_path,
            # With the JSON on stdout, the tables go to stderr as without --plot.
            out=sys.stderr if to_stdout else None,
        )
        with open(json_path, encoding="utf-8") as f:
            text = f.read()
    finally:
        if scratch is not None:
            os.unlink(scratch)
    if to_stdout:
        sys.stdout.write(text)
    _plot.plot(json.loads(text), args.plot)
    print(f"plot: {args.plot}", file=sys.stderr)
    return status
