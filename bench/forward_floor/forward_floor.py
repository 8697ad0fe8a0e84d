"""What a forwarder adds to a small round trip on this machine, whoever writes it.

``fastpipe._bench.forward``'s ``forward-round-trips`` workload (100-byte
request/response round trips between two peer processes, every answer
checked, methods taking turns round by round) with two more forwarders:

* ``socat``: ``socat TCP-LISTEN:... TCP:...`` (skipped if not installed);
* ``minfwd``: ``minfwd.c``, two threads with blocking recv/send, the leanest
  forwarder there is (built with gcc into a temporary directory);
* ``minfwd-spin30``: the same, busy-polling ``recv(MSG_DONTWAIT)`` for 30 µs
  before blocking.

beside ``direct`` (no forwarder) and ``fastpipe-forward``.  Usage::

    PYTHONPATH=src python bench/forward_floor/forward_floor.py [ROUNDS] [TRIPS]
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import ClassVar

from fastpipe._bench import common, runner
from fastpipe._bench import forward as _bench_forward

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            # local address "0100007F:PORT" in hex, state 0A = LISTEN
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return True
    return False


class CommandForwarder(_bench_forward.ForwarderProcess):
    """A forwarder given as a command that listens on ``port``, which it
    does not announce: ``ready()`` waits for the listening socket instead."""

    def __init__(self, role: str, cmd: list[str], port: int) -> None:
        self.role = role
        self.port = port
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._reaped = False

    def ready(self) -> list[str]:
        # Not a probe connection: it would be the forwarder's one and only
        # client.  The listening socket shows in /proc/net/tcp instead.
        deadline = time.monotonic() + common.TIMEOUT
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.kill().decode("utf-8", "replace").strip()
                raise common.BenchError(f"{self.role}: not listening on {self.port}: {err}")
            time.sleep(0.02)
        return [str(self.port)]

    def stop(self) -> None:
        # Neither socat nor minfwd exits with status 0 on SIGTERM.
        self.kill()


class FloorRoundTrips(_bench_forward.ForwardRoundTrips):
    """The round-trip workload, also through socat and minfwd."""

    commands: ClassVar[dict[str, list[str]]] = {}

    def _forwarder_port(self, target_port: int) -> int:
        make = self.commands.get(self.method)
        if make is None:
            return super()._forwarder_port(target_port)
        port = free_port()
        cmd = [arg.format(port=port, target=target_port) for arg in make]
        self._fwd = CommandForwarder(self.method, cmd, port)
        self._held.endpoints.append(self._fwd)
        self._fwd.ready()
        return port


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    trips = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        commands = FloorRoundTrips.commands
        if shutil.which("socat"):
            commands["socat"] = [
                "socat",
                "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                "TCP:127.0.0.1:{target},nodelay",
            ]
        gcc = shutil.which("gcc")
        if gcc:
            minfwd = os.path.join(tmp, "minfwd")
            source = os.path.join(HERE, "minfwd.c")
            subprocess.run([gcc, "-O2", "-pthread", "-o", minfwd, source], check=True)
            commands["minfwd"] = [minfwd, "{port}", "{target}", "0"]
            commands["minfwd-spin30"] = [minfwd, "{port}", "{target}", "30"]
        methods = (_bench_forward.DIRECT, _bench_forward.FASTPIPE_FORWARD, *commands)
        FloorRoundTrips.methods = methods
        FloorRoundTrips.how = {
            **_bench_forward.ForwardRoundTrips.how,
            **{method: " ".join(cmd) for method, cmd in commands.items()},
        }
        cases = [FloorRoundTrips(method, trips) for method in methods]
        results = runner.run_workload(cases, rounds)
    direct = results[0].extra["rtt_median_us"]
    print(f"{_bench_forward.MESSAGE_SIZE}-byte round trips, {trips} per round, {rounds} rounds:")
    print("  median of the rounds' median round trips [best], µs")
    for result in results:
        median = result.extra["rtt_median_us"]
        added = "" if result is results[0] else f"  +{(median / direct - 1) * 100:.0f}%"
        best = result.extra["rtt_best_median_us"]
        print(f"  {result.method:16s} {median:7.1f} [{best:6.1f}]{added}")


if __name__ == "__main__":
    main()
