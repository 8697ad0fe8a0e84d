"""What a waiting relay costs: relays parked on idle pipes and ``proxy()``
connections parked on idle sockets, each measured in a fresh process: RSS
per relay or connection, the process's threads, and the buffers and pipes
held while they wait."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from fastpipe._bench.common import BenchError

_PARKED_SCRIPT = r"""
import json, os, socket, sys, time
import fastpipe

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])

kind, n = sys.argv[1], int(sys.argv[2])
pool = fastpipe.default_pool()
null = os.open(os.devnull, os.O_WRONLY)

def wait(predicate, what):
    deadline = time.monotonic() + 120
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"{what}: {pool.stats()}")
        time.sleep(0.01)

# Warm up, and make every fd before the first look: what is measured is the
# relays' own cost.  Ends are raw fds (no Python socket objects).
r, w = os.pipe()
os.write(w, b"x" * 60000)
os.close(w)
pool.relay(r, null, close=False).result()
os.close(r)
a, b = socket.socketpair()
c, d = socket.socketpair()
warm = pool.proxy(b, c)
a.sendall(b"ping"); d.recv(4); a.shutdown(socket.SHUT_WR); d.shutdown(socket.SHUT_WR)
warm.result(); a.close(); d.close()
if kind == "relay":
    ends = [os.pipe() for _ in range(n)]
else:
    ends = []
    for _ in range(n):
        client, a = socket.socketpair()
        b, server = socket.socketpair()
        ends.append((client, a.detach(), b.detach(), server))
time.sleep(0.2)
before = status("VmRSS")
if kind == "relay":
    relays = [pool.relay(rr, null, close=False) for rr, _ in ends]
    wait(lambda: pool.stats()["parked"] == n, "the relays never all parked")
else:
    relays = [pool.proxy(a, b) for _, a, b, _ in ends]
    wait(lambda: pool.stats()["parked"] == 2 * n, "the proxies never all parked")
time.sleep(0.3)
after = status("VmRSS")
out = {
    "n": n,
    "rss_kib_each": (after - before) / n,
    "threads": status("Threads"),
    "workers": pool.stats()["workers"],
    "buffers_in_use": fastpipe.buffer_stats()["in_use"],
    "pipes_in_use": fastpipe.pipe_stats()["in_use"],
}
if kind == "relay":
    for _, w in ends:
        os.write(w, b"bye")
        os.close(w)
    out["ok"] = sum(x.result(timeout=120) == 3 for x in relays)
else:
    # Every connection still works: a request one way, its reply the other.
    echoed = 0
    for i, (client, _, _, server) in enumerate(ends):
        msg = i.to_bytes(8, "big")
        client.sendall(msg)
        if server.recv(8, socket.MSG_WAITALL) == msg:
            server.sendall(msg[::-1])
            echoed += client.recv(8, socket.MSG_WAITALL) == msg[::-1]
    for client, _, _, server in ends:
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
    out["ok"] = sum(x.result(timeout=120) == (8, 8) for x in relays) if echoed == n else echoed
print(json.dumps(out))
"""


def measure_parked(kind: str, n: int) -> dict[str, Any]:
    """Park ``n`` relays (``kind="relay"``, on idle pipes) or ``n`` proxied
    connections (``kind="proxy"``, on idle socketpairs) in a fresh process.

    Returns:
        ``n``; ``rss_kib_each``, KiB of RSS per relay or connection;
        ``threads`` in the process and the pool's ``workers`` while they
        are parked; ``buffers_in_use`` and ``pipes_in_use`` meanwhile; and
        ``ok``, how many then ended right (every proxied connection echoes
        a request and its reply first).

    Raises:
        BenchError: the child failed.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _PARKED_SCRIPT, kind, str(n)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"parked-{kind} child failed: {proc.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


PARKED_RELAYS = 1000
PARKED_PROXIES = 1000
