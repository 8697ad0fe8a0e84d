"""``fastpipe forward`` against real forwarders on loopback, side by side.

Compares ``python -m fastpipe forward`` (from whatever fastpipe the running
Python imports, and optionally a second interpreter's with
``--fastpipe-python``) with HAProxy (``mode tcp``, ``nbthread 2``), socat
and an asyncio-streams forwarder, on these workloads (see workloads.py):

    churn      ab (or wrk) against nginx, a connection per request
    idle       N idle connections: threads, RSS per connection, every one
               echoes; then the after-close and bring-up tables
    shutdown   SIGTERM with N open, and with N just closed
    bulk       iperf3, one stream; and a transfer checked byte for byte
    latency    100-byte round trips, everything pinned to one CPU
    faults     targets that refuse, reset or never answer; the fd limit

It installs nothing: the peers and tools it finds are used (setup.sh
installs them on Debian), and it says which are missing and what is
skipped.  Forwarders take turns round by round; each table gives medians
and ranges.  Every process it starts is killed when it ends, also on
Ctrl-C or SIGTERM.

    python bench/forward_peers/run.py                      # everything (long)
    python bench/forward_peers/run.py --smoke              # under a minute
    python bench/forward_peers/run.py -w idle --conns 1000 --rounds 1
    python bench/forward_peers/run.py --fastpipe-python new=/path/venv/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import peers
import procs
import report
import workloads
from peers import ASYNCIO, FASTPIPE, HAPROXY, KINDS, SOCAT, Peer, PeerError, Settings
from workloads import Options, Skip

#: Sizes of a smoke run: every workload in seconds.
SMOKE = {
    "conns": 40,
    "rounds": 1,
    "settle": 1.0,
    "requests": 300,
    "wrk_seconds": 1.0,
    "bulk_seconds": 1.0,
    "verify_mib": 4,
    "trips": 200,
    "fault_attempts": 6,
    "fault_batch": 6,
    "emfile_window": 1.0,
    "grace": 0.5,
    "connect_timeout": 0.5,
    "fault_wait": 3.0,
    "emfile_recover": 3.0,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument(
        "-w",
        "--workloads",
        default=",".join(workloads.WORKLOADS),
        help="comma-separated, from: %(default)s",
    )
    p.add_argument(
        "--peers",
        default=",".join(KINDS),
        help="forwarders to compare, from: %(default)s (missing ones are skipped)",
    )
    p.add_argument(
        "--fastpipe-python",
        action="append",
        default=[],
        metavar="[LABEL=]PYTHON",
        help="also run `PYTHON -m fastpipe forward` (another venv or build); repeatable",
    )
    p.add_argument(
        "--fastpipe-args",
        default="",
        metavar="ARGS",
        help="extra arguments for every fastpipe forward (one string, shell-split)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes: " + str(SMOKE))
    p.add_argument("--rounds", type=int, default=3, help="rounds per forwarder (%(default)s)")
    p.add_argument("--conns", type=int, default=9000, help="idle connections N (%(default)s)")
    p.add_argument(
        "--client-procs", type=int, default=0, help="client processes (default: one per 3000)"
    )
    p.add_argument(
        "--connect-window",
        type=int,
        default=0,
        help="connects in flight per client process at bring-up (default 0: no limit)",
    )
    p.add_argument("--bringup-deadline", type=float, default=60.0, help="seconds (%(default)s)")
    p.add_argument(
        "--settle", type=float, default=10.0, help="seconds after closing N (%(default)s)"
    )
    p.add_argument("--grace", type=float, default=1.0, help="fastpipe's --grace (%(default)s)")
    p.add_argument(
        "--connect-timeout", type=float, default=2.0, help="every forwarder's (%(default)s)"
    )
    p.add_argument("--requests", type=int, default=20000, help="churn: ab -n (%(default)s)")
    p.add_argument("--concurrency", type=int, default=50, help="churn: -c (%(default)s)")
    p.add_argument("--http-client", choices=("auto", "ab", "wrk"), default="auto")
    p.add_argument("--wrk-seconds", type=float, default=10.0, help="churn with wrk: -d")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--bulk-seconds", type=float, default=5.0, help="iperf3 -t (%(default)s)")
    p.add_argument("--verify-mib", type=int, default=64, help="bulk: MiB checked (%(default)s)")
    p.add_argument("--trips", type=int, default=2000, help="latency: round trips (%(default)s)")
    p.add_argument("--pin-cpu", type=int, help="latency: the CPU (default: the last one)")
    p.add_argument("--fault-attempts", type=int, default=200, help="per dead target")
    p.add_argument("--fault-batch", type=int, default=100, help="attempts at a time")
    p.add_argument(
        "--fault-wait",
        type=float,
        default=0.0,
        help="seconds a client waits to be closed (default: 4 x connect-timeout + 5)",
    )
    p.add_argument("--emfile-limit", type=int, default=256, help="RLIMIT_NOFILE at the limit")
    p.add_argument("--emfile-window", type=float, default=3.0, help="seconds at the limit")
    p.add_argument(
        "--emfile-recover",
        type=float,
        default=10.0,
        help="seconds for the waiting clients to be served once fds free up (%(default)s)",
    )
    p.add_argument(
        "--socat-max-conns",
        type=int,
        default=1000,
        help="idle/shutdown: leave socat out above this N (a process per connection)",
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as markdown too")
    p.add_argument("--keep-logs", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    if args.smoke:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    return args


def _fastpipe(python: str, label: str, extra: tuple[str, ...]) -> Peer | str:
    """A fastpipe peer, or why that interpreter cannot run one."""
    probe = (
        "import fastpipe, os; "
        "print(os.path.dirname(fastpipe.__file__), fastpipe.IMPLEMENTATION, "
        "getattr(fastpipe, '__version__', '?'))"
    )
    try:
        out = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/"
        )
    except OSError as exc:
        return f"{label}: {python}: {exc.strerror}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"{label}: {python} cannot import fastpipe: {last}"
    where, impl, version = out.stdout.split()
    return Peer(label, FASTPIPE, python, extra, f"fastpipe {version} [{impl}] from {where}")


def find_peers(args: argparse.Namespace, missing: list[str]) -> list[Peer]:
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(wanted) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown peers: {sorted(unknown)} (known: {', '.join(KINDS)})")
    extra = tuple(shlex.split(args.fastpipe_args))
    found: list[Peer] = []
    for kind in wanted:
        if kind == FASTPIPE:
            entries = [("fastpipe", sys.executable)]
            for i, spec in enumerate(args.fastpipe_python, start=2):
                label, sep, path = spec.partition("=")
                entries.append((label, path) if sep else (f"fastpipe-{i}", spec))
            for label, python in entries:
                peer = _fastpipe(python, label, extra)
                if isinstance(peer, str):
                    missing.append(peer)
                else:
                    found.append(peer)
        elif kind in (HAPROXY, SOCAT):
            if peers.which(kind):
                found.append(Peer(kind, kind))
            else:
                missing.append(f"{kind}: not installed (bench/forward_peers/setup.sh)")
        elif kind == ASYNCIO:
            found.append(Peer(ASYNCIO, ASYNCIO))
    return found


def _tool_version(cmd: list[str], first: bool = False) -> str:
    """The line of ``cmd``'s output that gives its version (else its first)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout + out.stderr).strip().splitlines()
    if first and lines:
        return lines[0]
    return next((ln for ln in lines if "version" in ln.lower()), lines[0] if lines else "?")


def describe(args: argparse.Namespace, found: list[Peer], missing: list[str]) -> list[str]:
    lines = [
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()},"
        f" load average {os.getloadavg()[0]:.2f} at the start",
        f"N = {args.conns:,} connections, {args.rounds} round(s), forwarders taking turns",
    ]
    for peer in found:
        lines.append(f"{peer.name}: {peer.describe()}")
    for tool, flag in (("haproxy", "-v"), ("socat", "-V"), ("nginx", "-v"), ("iperf3", "-v")):
        if peers.which(tool):
            lines.append(f"{tool}: {_tool_version([tool, flag])}")
    if peers.which("ab"):
        lines.append(f"ab: {_tool_version(['ab', '-V'])}")
    if peers.which("wrk"):  # its version is the first line of its usage
        lines.append(f"wrk: {_tool_version(['wrk', '-v'], first=True)}")
    for why in missing:
        lines.append(f"MISSING {why}")
    return lines


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _summary(figures: dict[str, dict[str, Any]]) -> str:
    parts = []
    for table in figures.values():
        for key, value in list(table.items())[:3]:
            if isinstance(value, float):
                parts.append(f"{key}={value:.3g}")
            elif value is not None:
                parts.append(f"{key}={value}")
    return " ".join(parts)


def run_workload(
    wl: workloads.Workload, found: list[Peer], rounds: int, results: report.Results
) -> None:
    columns: list[Peer | None] = [None] if wl.with_direct else []
    columns += found
    skipped: set[str] = set()
    wl.setup()
    try:
        for r in range(rounds):
            k = r % len(columns)
            for peer in columns[k:] + columns[:k]:
                name = peer.name if peer is not None else peers.DIRECT
                if name in skipped:
                    continue
                t0 = time.monotonic()
                try:
                    figures = wl.measure(peer)
                except Skip as why:
                    skipped.add(name)
                    for table in wl.tables:
                        results.note(table, str(why))
                    _say(f"[{wl.name}] {name}: skipped: {why}")
                    continue
                except PeerError as exc:
                    _say(f"[{wl.name}] round {r + 1} {name}: FAILED: {exc}")
                    for table in wl.tables:
                        results.note(table, f"round {r + 1}, {name}: {exc}")
                    # A failed round shows as "failed" in every metric of its tables.
                    figures = {
                        table: {m.key: report.FAILED for m in report.TABLE_BY_KEY[table].metrics}
                        for table in wl.tables
                    }
                for table, values in figures.items():
                    results.record(table, name, r, values)
                took = time.monotonic() - t0
                _say(
                    f"[{wl.name}] round {r + 1}/{rounds} {name} ({took:.1f} s): {_summary(figures)}"
                )
        wl.finish()
    finally:
        wl.teardown()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(chosen) - set(workloads.WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads: {sorted(unknown)} (known: {workloads.WORKLOADS})")
    missing: list[str] = []
    found = find_peers(args, missing)
    if not found:
        raise SystemExit("no forwarder to measure: " + "; ".join(missing))
    for tool in ("nginx", "ab", "wrk", "iperf3", "taskset"):
        if not peers.which(tool):
            missing.append(f"{tool}: not installed (bench/forward_peers/setup.sh)")
    opts = Options(
        conns=args.conns,
        client_procs=args.client_procs,
        connect_window=args.connect_window,
        bringup_deadline=args.bringup_deadline,
        settle=args.settle,
        requests=args.requests,
        concurrency=args.concurrency,
        http_client=args.http_client,
        wrk_seconds=args.wrk_seconds,
        nginx_workers=args.nginx_workers,
        bulk_seconds=args.bulk_seconds,
        verify_mib=args.verify_mib,
        trips=args.trips,
        pin_cpu=args.pin_cpu,
        fault_attempts=args.fault_attempts,
        fault_batch=args.fault_batch,
        emfile_limit=args.emfile_limit,
        emfile_window=args.emfile_window,
        emfile_recover=args.emfile_recover,
        fault_wait=args.fault_wait,
        socat_max_conns=args.socat_max_conns,
    )
    results = report.Results(args.rounds)
    workdir = tempfile.mkdtemp(prefix="fastpipe-forward-peers-")
    settings = Settings(workdir, connect_timeout=args.connect_timeout, grace=args.grace)
    meta: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": argv,
        "conns": args.conns,
        "rounds": args.rounds,
        "grace": args.grace,
        "fault_attempts": args.fault_attempts,
        "peers": {p.name: p.describe() for p in found},
        "missing": missing,
        "skipped": [],
    }
    meta["describe"] = describe(args, found, missing)
    for line in meta["describe"]:
        _say(line)

    # Idle and shutdown share their bursts: one workload object does both.
    plan: list[workloads.Workload] = []
    classes = {
        "churn": workloads.Churn,
        "bulk": workloads.Bulk,
        "latency": workloads.Latency,
        "faults": workloads.Faults,
    }
    for name in chosen:
        if name in ("idle", "shutdown"):
            if any(isinstance(w, workloads.Idle) for w in plan):
                continue
            plan.append(
                workloads.Idle(
                    opts,
                    settings,
                    results,
                    idle="idle" in chosen,
                    shutdown="shutdown" in chosen,
                )
            )
        else:
            plan.append(classes[name](opts, settings, results))

    procs.install_signal_handlers()
    status = 0
    try:
        for wl in plan:
            lacking = ["/".join(alts) for alts in wl.needs if not any(peers.which(t) for t in alts)]
            if lacking:
                why = f"{wl.name}: skipped, needs {' and '.join(lacking)}"
                meta["skipped"].append(why)
                _say(why)
                continue
            try:
                run_workload(wl, found, args.rounds, results)
            except PeerError as exc:
                why = f"{wl.name}: could not run: {exc}"
                meta["skipped"].append(why)
                _say(why)
                status = 1
    except (KeyboardInterrupt, procs.Interrupted) as exc:
        _say(f"interrupted ({str(exc) or 'SIGINT'}): stopping every process, reporting what ran")
        status = 130
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        procs.kill_all()
    fastpipes = [p.name for p in found if p.kind == FASTPIPE]
    for why in meta["skipped"]:
        meta["describe"].append(f"SKIPPED {why}")
    text = report.markdown(results, meta, fastpipes)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_json(results, meta, fastpipes), f, indent=2)
            f.write("\n")
    if args.keep_logs:
        _say(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
