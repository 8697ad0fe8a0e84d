"""RSS per relay and total time at 2,000 concurrent relays, in a fresh process.

Runs the scale workload of ``tests/test_soak_scale.py`` (that file, as a
script) in a fresh interpreter: N relays between unix sockets and pipes, each
started on an idle source so that all N are parked at once (holding no
thread), then fed and drained at the same time, every byte compared.  Optionally the soak workload
too (sequential relays, growth of fds, threads and RSS after a warm-up).

    PYTHONPATH=src python bench/scale_report.py                 # 2,000 relays
    PYTHONPATH=src python bench/scale_report.py --relays 5000 --soak 100000
    FASTPIPE_NO_EXTENSIONS=1 PYTHONPATH=src python bench/scale_report.py   # the twin

RLIMIT_NOFILE is raised in the child up to the hard limit; it needs about
6 fds per relay.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKLOADS = Path(__file__).resolve().parent.parent / "tests" / "test_soak_scale.py"


def run(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(WORKLOADS), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: the child failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def report_scale(relays: int, stack_kib: int) -> dict[str, Any]:
    r = run("scale", str(relays), str(stack_kib))
    n = r["relays"]
    kib = 1024
    print(f"scale, {n} concurrent relays [{r['implementation']}]")
    print(f"  bytes moved           {r['bytes'] / 2**20:.0f} MiB, {r['methods']}")
    print(f"  wrong relays          {r['wrong_count']}")
    print(f"  all {n} parked after  {r['seconds_to_park']:.2f} s, {r['threads_parked']} threads")
    print(f"  total time            {r['seconds']:.2f} s (start, feed, drain, verify)")
    print(f"  RSS before            {r['rss_before'] / 2**20:.1f} MiB")
    print(f"  RSS per relay parked  {(r['rss_parked'] - r['rss_before']) / n / kib:.1f} KiB")
    print(f"  RSS per relay at peak {(r['peak_rss'] - r['rss_before']) / n / kib:.1f} KiB")
    print(f"  virtual per relay     {r['vm_parked'] / n / 2**20:.2f} MiB")
    print(f"  maps per relay        {r['maps_parked'] / n:.2f}")
    print(f"  buffers peak          {r['buffers']['peak']}, pipes peak {r['pipes']['peak']}")
    stack = f"{r['stack_size'] // 1024} KiB" if r["stack_size"] else "default (RLIMIT_STACK)"
    print(f"  thread stack size     {stack}")
    print(f"  RLIMIT_NOFILE         {r['nofile']}")
    return r


def report_soak(relays: int) -> dict[str, Any]:
    warmup = min(5000, relays // 10)
    r = run("soak", str(relays), str(warmup))
    warm, end = r["warm"], r["end"]
    print(f"soak, {relays} sequential relays [{r['implementation']}], after {warmup} of warm-up")
    print(f"  time                  {r['seconds']:.1f} s ({relays / r['seconds']:.0f} relays/s)")
    print(f"  methods               {r['methods']}")
    for key in ("fds", "threads", "tasks", "workers"):
        print(f"  {key:<21} {warm[key]} -> {end[key]}")
    for key in ("buffers", "pipes"):
        print(f"  {key + ' allocated':<21} {warm[key]['allocated']} -> {end[key]['allocated']}")
    growth = (end["rss"] - warm["rss"]) / warm["rss"]
    print(
        f"  RSS                   {warm['rss'] / 1024:.0f} -> {end['rss'] / 1024:.0f} KiB "
        f"({growth:+.2%})"
    )
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relays", type=int, default=2000, help="concurrent relays (2000)")
    parser.add_argument(
        "--stack-kib", type=int, default=0, help="threading.stack_size() in KiB (default: none)"
    )
    parser.add_argument("--soak", type=int, default=0, metavar="N", help="also N sequential relays")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures to FILE")
    args = parser.parse_args()
    figures = {"scale": report_scale(args.relays, args.stack_kib)}
    if args.soak:
        figures["soak"] = report_soak(args.soak)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
