#!/usr/bin/env python3
"""Two builds of fastpipe side by side: the engine before a change and after it.

Each build is an interpreter that imports its own fastpipe (a venv with it
installed, or a source tree's python with PYTHONPATH set), given as
``LABEL=PYTHON``.  Every round runs each build once, in a fresh child
process, the order alternating from round to round (A B, B A, ...) so that a
noisy neighbour falls on both alike.  A child runs ``fastpipe bench``'s
workloads with the ``fastpipe`` method only, ``proxy()`` bulk and 100-byte
round trips (beside two plain threads running ``copyfileobj``, the latency
baseline), and, once per build, relays and proxies parked on idle fds
(threads and RSS each, through the public API only, so any build can run it).

    python bench/compare_builds.py --build before=/path/to/old/python \\
        --build after=.venv/bin/python --size 512 --rounds 5

The table gives, per case, each build's median wall time and relay CPU time
over the rounds, and after/before ratios (below 1.0: the later build is
faster).  Nothing is installed or built here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from typing import Any

# Run by each build's interpreter: the workloads, one round each, as JSON.
CHILD = r"""
import json, shutil, sys
from fastpipe._bench.host import new_scratch_dir
from fastpipe._bench.runner import build_cases, run_workload
from fastpipe._bench import proxy as P

size, relays, trips = (int(a) for a in sys.argv[1:4])
directory = new_scratch_dir(size)
out = []
try:
    workloads = build_cases(size, relays, directory, only=["fastpipe"])
    workloads.append([P.ProxyBulk(P.FASTPIPE_PROXY, size)])
    methods = (P.FASTPIPE_PROXY, P.COPYFILEOBJ_THREADS)
    workloads.append([P.ProxyRoundTrips(m, trips) for m in methods])
    for cases in workloads:
        for r in run_workload(cases, 1):
            out.append({"title": r.title, "method": r.method, "nbytes": r.nbytes,
                        "wall": r.walls[0], "cpu": r.cpus[0]})
finally:
    shutil.rmtree(directory, ignore_errors=True)
print(json.dumps(out))
"""

# Parked relays (pipes) or proxies (socketpairs): threads and RSS each.
PARKED = r"""
import gc, json, os, socket, sys, threading, time
import fastpipe

kind, n = sys.argv[1], int(sys.argv[2])

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def settled(expected):
    s = fastpipe.default_pool().stats()
    return s.get("parked", 0) + s["busy"] >= expected and s["queued"] == 0

ends = []
fastpipe.relay(*os.pipe()).cancel()  # the pool and its threads exist before the baseline
gc.collect()
before = rss()
relays = []
for _ in range(n):
    if kind == "relay":
        r, w = os.pipe()
        out_r, out_w = os.pipe()
        relays.append(fastpipe.relay(r, out_w, close=False))
        ends += [r, w, out_r, out_w]
    else:
        a, a_peer = socket.socketpair()
        b, b_peer = socket.socketpair()
        relays.append(fastpipe.proxy(a, b, close=False))
        ends += [a, a_peer, b, b_peer]
expected = n if kind == "relay" else 2 * n
deadline = time.monotonic() + 300
while not settled(expected):
    if time.monotonic() > deadline:
        raise SystemExit(f"never settled: {fastpipe.default_pool().stats()}")
    time.sleep(0.05)
time.sleep(0.5)
gc.collect()
result = {"kib_each": (rss() - before) / n / 1024, "threads": threading.active_count(),
          "tasks": len(os.listdir("/proc/self/task"))}
for relay in relays:
    relay.cancel()
print(json.dumps(result))
os._exit(0)
"""


def run_child(python: str, code: str, *args: object, timeout: float = 3600) -> Any:
    proc = subprocess.run(
        [python, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{python} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="append", required=True, metavar="LABEL=PYTHON")
    parser.add_argument("--size", type=int, default=512, help="MiB per bulk copy")
    parser.add_argument("--relays", type=int, default=2048, help="small relays per round")
    parser.add_argument("--trips", type=int, default=2000, help="proxy round trips per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parked", type=int, default=2000, help="relays (and proxies) parked")
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    args = parser.parse_args()
    builds = [tuple(b.split("=", 1)) for b in args.build]
    if len(builds) != 2 or any(len(b) != 2 for b in builds):
        parser.error("give exactly two --build LABEL=PYTHON")
    (a, _), (b, _) = builds

    samples: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    order: list[tuple[str, str]] = []
    for i in range(args.rounds):
        for label, python in builds if i % 2 == 0 else builds[::-1]:
            print(f"round {i + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
            for doc in run_child(python, CHILD, args.size * 2**20, args.relays, args.trips):
                key = (doc["title"], doc["method"])
                if key not in order:
                    order.append(key)
                samples[key][label].append((doc["wall"], doc["cpu"]))

    print(f"\n{args.rounds} rounds, alternating; medians; ratio = {b} / {a}\n")
    print(
        f"{'case':58} {'wall ' + a:>11} {'wall ' + b:>11} {'ratio':>6}  "
        f"{'cpu ' + a:>10} {'cpu ' + b:>10} {'ratio':>6}"
    )
    for key in order:
        by = samples[key]
        if not by[a] or not by[b]:
            continue
        wa, wb = (statistics.median(w for w, _ in by[x]) for x in (a, b))
        ca, cb = (statistics.median(c for _, c in by[x]) for x in (a, b))
        name = f"{key[0]} [{key[1]}]"
        print(
            f"{name[:58]:58} {wa:11.4f} {wb:11.4f} {wb / wa:6.2f}  "
            f"{ca:10.4f} {cb:10.4f} {cb / ca if ca else float('nan'):6.2f}"
        )
    # The latency target: proxy() round trips against two plain threads.
    titles = {t for t, m in order if m == "copyfileobj-threads"}
    for title in titles:
        for label in (a, b):
            proxy = [w for w, _ in samples[(title, "fastpipe-proxy")][label]]
            threads = [w for w, _ in samples[(title, "copyfileobj-threads")][label]]
            if proxy and threads:
                ratio = statistics.median(proxy) / statistics.median(threads)
                print(f"{title}, {label}: proxy() / two plain threads = {ratio:.2f}x (medians)")

    parked: dict[str, dict[str, Any]] = {}
    print(f"\nparked on idle fds ({args.parked} each, fresh processes):")
    for label, python in builds:
        parked[label] = {
            kind: run_child(python, PARKED, kind, args.parked) for kind in ("relay", "proxy")
        }
        for kind, m in parked[label].items():
            print(f"  {label:8} {kind}: {m['kib_each']:.2f} KiB RSS each, {m['threads']} threads")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "samples": {f"{t} [{m}]": v for (t, m), v in samples.items()},
                    "parked": parked,
                    "args": vars(args),
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
