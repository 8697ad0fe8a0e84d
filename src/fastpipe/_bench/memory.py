"""What an idle relay costs: the RSS of relays parked on idle pipes, measured
in a fresh process."""

from __future__ import annotations

import subprocess
import sys

from fastpipe._bench.common import BenchError

_IDLE_RSS_SCRIPT = r"""
import os, sys, time
import fastpipe

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

n = int(sys.argv[1])
pipes = [os.pipe() for _ in range(n)]
null = os.open(os.devnull, os.O_WRONLY)
pool = fastpipe.WorkerPool()
# Warm up: the completer, one worker and a few buffers exist before we look.
r, w = os.pipe()
os.write(w, b"x" * 60000)
os.close(w)
pool.relay(r, null, close=False).result()
os.close(r)
time.sleep(0.1)
before = rss_kib()
relays = [pool.relay(rr, null, close=False) for rr, _ in pipes]
deadline = time.monotonic() + 60
while pool.stats()["busy"] < n:
    if time.monotonic() > deadline:
        sys.exit("the relays never all started")
    time.sleep(0.01)
time.sleep(0.3)
after = rss_kib()
workers = pool.stats()["workers"]
in_use = fastpipe.buffer_stats()["in_use"]
for _, w in pipes:
    os.write(w, b"bye")
    os.close(w)
assert all(x.result(timeout=60) == 3 for x in relays)
print(after - before, workers, in_use)
"""


def measure_idle_rss(relays: int = 1000) -> tuple[float, int, int]:
    """RSS per relay parked on an idle pipe, measured in a fresh process.

    Returns:
        (KiB of RSS per relay, workers started, buffers in use while parked).

    Raises:
        BenchError: the child failed.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _IDLE_RSS_SCRIPT, str(relays)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"idle-memory child failed: {proc.stderr.strip()[-500:]}")
    delta, workers, in_use = (int(x) for x in proc.stdout.split())
    return delta / relays, workers, in_use


IDLE_RELAYS = 1000
