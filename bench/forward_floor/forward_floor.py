"""What a forwarder adds to a small round trip on this machine, whoever writes it.

100-byte request/response round trips (``_bench_proxy_peers``' echo server
and ``rr-latency`` client, each its own process) through:

* ``direct``: no forwarder;
* ``fastpipe``: ``python -m fastpipe forward``;
* ``socat``: ``socat TCP-LISTEN:... TCP:...`` (skipped if not installed);
* ``minfwd``: ``minfwd.c``, two threads with blocking recv/send, the leanest
  forwarder there is (built with gcc into a temporary directory);
* ``minfwd-spinN``: the same, busy-polling ``recv(MSG_DONTWAIT)`` for N µs
  before blocking.

Methods alternate round by round; the table has the median of the rounds'
median round trips and the best.  Usage::

    PYTHONPATH=src python bench/forward_floor/forward_floor.py [ROUNDS] [TRIPS]
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEERS = os.path.join(ROOT, "src", "fastpipe", "_bench_proxy_peers.py")
MESSAGE = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, timeout: float = 10.0) -> None:
    # Not a probe connection: it would be the forwarder's one and only
    # client.  The listening socket shows in /proc/net/tcp instead.
    deadline = time.monotonic() + timeout
    while not _listening(port):
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on port {port}")
        time.sleep(0.02)


def _listening(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            # local address "0100007F:PORT" in hex, state 0A = LISTEN
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return True
    return False


def one_round(method: str, minfwd: str | None) -> float:
    """One client's median round trip through ``method``, in µs."""
    server = subprocess.Popen(
        [sys.executable, "-I", "-S", PEERS, "echo-server", str(MESSAGE)], stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    server_port = int(server.stdout.readline().split()[1])
    forwarder = None
    port = server_port
    if method == "fastpipe":
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        target = f"127.0.0.1:{server_port}"
        forwarder = subprocess.Popen(
            [sys.executable, "-m", "fastpipe", "forward", "-q", "127.0.0.1:0", target],
            stderr=subprocess.PIPE,
            env=env,
        )
        assert forwarder.stderr is not None
        line = forwarder.stderr.readline().decode()
        found = re.search(r"listening on [\d.]+:(\d+)", line)
        if not found:
            raise SystemExit(f"fastpipe forward said {line!r}")
        port = int(found.group(1))
    elif method == "socat":
        port = free_port()
        listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"
        forwarder = subprocess.Popen(["socat", listen, f"TCP:127.0.0.1:{server_port},nodelay"])
        wait_listening(port)
    elif method.startswith("minfwd"):
        assert minfwd is not None
        port = free_port()
        spin = method.removeprefix("minfwd-spin") if "spin" in method else "0"
        forwarder = subprocess.Popen([minfwd, str(port), str(server_port), spin])
        wait_listening(port)
    client = subprocess.Popen(
        [sys.executable, "-I", "-S", PEERS, "rr-latency", str(port), str(TRIPS), str(MESSAGE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    if client.stdout.readline() != b"ready\n":
        raise SystemExit(f"{method}: the client did not connect")
    client.stdin.write(b"go\n")
    client.stdin.flush()
    done = client.stdout.readline().split()
    if client.wait(60) != 0 or len(done) != 5 or int(done[1]) != TRIPS:
        raise SystemExit(f"{method}: the client failed: {done!r}")
    server.wait(60)
    if forwarder is not None:
        forwarder.terminate()
        forwarder.wait(60)
    return int(done[2]) / 1000


def build_minfwd(directory: str) -> str | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = os.path.join(directory, "minfwd")
    subprocess.run([gcc, "-O2", "-pthread", "-o", out, os.path.join(HERE, "minfwd.c")], check=True)
    return out


ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
TRIPS = int(sys.argv[2]) if len(sys.argv) > 2 else 2000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        minfwd = build_minfwd(tmp)
        methods = ["direct", "fastpipe"]
        if shutil.which("socat"):
            methods.append("socat")
        if minfwd:
            methods += ["minfwd", "minfwd-spin30"]
        results: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(ROUNDS):
            for method in methods:
                results[method].append(one_round(method, minfwd))
    direct = statistics.median(results["direct"])
    print(f"{MESSAGE}-byte round trips, {TRIPS} per round, {ROUNDS} rounds, median [best] µs")
    for method, values in results.items():
        median = statistics.median(values)
        added = "" if method == "direct" else f"  +{(median / direct - 1) * 100:.0f}%"
        print(f"  {method:16s} {median:7.1f} [{min(values):6.1f}]{added}")


if __name__ == "__main__":
    main()
