"""Port-forwarder workloads for ``bench/test_bench_forward.py``: ``fastpipe forward``
against a forwarder written the usual way on asyncio streams.

Both forwarders are whole processes, started for each round (not timed) on
127.0.0.1 port 0 with the round's server as their target:

* ``fastpipe-forward``: ``python -m fastpipe forward -q 127.0.0.1:0 TARGET``.
* ``asyncio-forward``: ``_bench.asyncio_forward`` (``asyncio.start_server``,
  ``open_connection``, two read(65536)/write/drain pumps per connection).
* ``direct`` (round trips only): the client connects to the server itself,
  the yardstick for the forwarder's added latency.

Workloads:

* ``forward-bulk``: the sender endpoint process -> forwarder -> the
  sink endpoint process, which checks every byte.  The timed part runs
  from "go" to the sink's "done" line, so it includes the connection's last
  bytes reaching the sink and the sink seeing end of file.
* ``forward-round-trips``: ``_bench.proxy_peers``' ``rr-latency`` client
  making request/response round trips of 100 bytes through the forwarder to
  an echo server; it times each round trip and reports the median, the
  figure to compare forwarders by (the tail is the scheduler's as much as
  the forwarder's).

The relay's CPU time here is the forwarder process's (user + system, from
``/proc/PID/stat``), read around the timed part.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import statistics
import subprocess
import sys
from typing import Any, ClassVar

from fastpipe._bench import proxy as _bench_proxy
from fastpipe._bench.cases import Case
from fastpipe._bench.common import TIMEOUT, BenchError
from fastpipe._bench.endpoints import Endpoint
from fastpipe._bench.pattern import describe_mismatch

FASTPIPE_FORWARD = "fastpipe-forward"
ASYNCIO_FORWARD = "asyncio-forward"
DIRECT = "direct"

ROUND_TRIPS = 1000
MESSAGE_SIZE = _bench_proxy.MESSAGE_SIZE

_HOW = {
    FASTPIPE_FORWARD: "python -m fastpipe forward: one proxy() per connection",
    ASYNCIO_FORWARD: "asyncio streams: start_server, open_connection, two read/write/drain pumps",
    DIRECT: "no forwarder: the client connects to the server",
}

_HERE = os.path.dirname(os.path.abspath(__file__))


class ForwarderProcess(Endpoint):
    """A forwarder process listening on 127.0.0.1:0, forwarding to ``target_port``.

    Driven like ``endpoints.Endpoint`` (``kill()`` reaps it on every path); its
    listening address comes from its stderr line ``listening on HOST:PORT,``.
    """

    def __init__(self, method: str, target_port: int) -> None:
        self.role = method
        target = f"127.0.0.1:{target_port}"
        if method == FASTPIPE_FORWARD:
            # Not -I: fastpipe must be importable as it is here (PYTHONPATH,
            # or the source tree of this very file).
            package_root = os.path.dirname(os.path.dirname(_HERE))
            path = os.environ.get("PYTHONPATH", "")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, path) if p))
            cmd = [sys.executable, "-m", "fastpipe", "forward", "-q", "127.0.0.1:0", target]
        elif method == ASYNCIO_FORWARD:
            env = None
            script = os.path.join(_HERE, "asyncio_forward.py")
            cmd = [sys.executable, "-I", "-S", script, "0", str(target_port)]
        else:
            raise ValueError(f"no forwarder process for {method!r}")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reaped = False

    def ready(self) -> list[str]:
        """Wait for the listening line; return ``[PORT]``.

        Raises:
            BenchError: it died, or said nothing for TIMEOUT seconds.
        """
        stderr = self.proc.stderr
        assert stderr is not None
        readable, _, _ = select.select([stderr], [], [], TIMEOUT)
        line = stderr.readline().decode("utf-8", "replace") if readable else ""
        _, found, rest = line.partition(" listening on ")
        if not found:
            err = self.kill().decode("utf-8", "replace").strip()
            raise BenchError(f"{self.role}: not listening (said {line!r}): {err}")
        return [rest.split(",")[0].rpartition(":")[2]]

    def cpu(self) -> float:
        """User plus system CPU seconds of the process so far."""
        with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # After "pid (comm)": state is field 0, utime 11, stime 12.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then it must exit with status 0 and no traceback.

        Raises:
            BenchError: it did not.
        """
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.role}: still running after SIGTERM") from None
        self._reaped = True
        text = err.decode("utf-8", "replace")
        if self.proc.returncode != 0 or "Traceback" in text:
            raise BenchError(f"{self.role}: exit status {self.proc.returncode}: {text}")


def _read_done(endpoint: Endpoint) -> list[str]:
    """Block until ``endpoint`` says ``done ...``; return the words after it.

    The timed part ends here, not at the process's exit.
    """
    stdout = endpoint.proc.stdout
    assert stdout is not None
    words = stdout.readline().decode("ascii", "replace").split()
    if not words or words[0] != "done":
        err = endpoint.kill().decode("utf-8", "replace").strip()
        raise BenchError(f"endpoint {endpoint.role}: said {words} instead of done: {err}")
    return words[1:]


def _reap(endpoint: Endpoint) -> None:
    """Wait for an endpoint whose ``done`` line was read already; it must exit 0."""
    try:
        _, err = endpoint.proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        endpoint.kill()
        raise BenchError(f"endpoint {endpoint.role}: did not exit") from None
    endpoint._reaped = True
    if endpoint.proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip()
        raise BenchError(f"endpoint {endpoint.role}: exit status, {tail}")


class _ForwardCase(Case):
    """A round through a forwarder process (or none, for ``direct``)."""

    how: ClassVar[dict[str, str]] = _HOW

    def __init__(self, method: str, nbytes: int) -> None:
        super().__init__(method, nbytes)
        self._fwd: ForwarderProcess | None = None

    def _forwarder_port(self, target_port: int) -> int:
        """Start this round's forwarder; return the port clients connect to."""
        if self.method == DIRECT:
            self._fwd = None
            return target_port
        self._fwd = ForwarderProcess(self.method, target_port)
        self._held.endpoints.append(self._fwd)
        (port,) = self._fwd.ready()
        return int(port)

    def run(self) -> None:
        fwd = self._fwd
        cpu0 = fwd.cpu() if fwd is not None else 0.0
        super().run()
        cpu = fwd.cpu() - cpu0 if fwd is not None else 0.0
        assert self._pending is not None
        # The relaying happened in the forwarder process, not in this one.
        self._pending = dataclasses.replace(self._pending, cpu=cpu)

    def _stop_forwarder(self) -> None:
        if self._fwd is not None:
            self._fwd.stop()


class ForwardBulk(_ForwardCase):
    """``nbytes`` from a sender process through the forwarder to a sink process."""

    workload = "forward-bulk"
    title = "TCP -> forwarder process -> TCP, bulk"
    methods: ClassVar[tuple[str, ...]] = (FASTPIPE_FORWARD, ASYNCIO_FORWARD)

    def _setup_round(self) -> None:
        self._sink = Endpoint("tcp-sink")
        self._held.endpoints.append(self._sink)
        (sink_port,) = self._sink.ready()
        port = self._forwarder_port(int(sink_port))
        self._sender = Endpoint("tcp-send", port, self.nbytes)
        self._held.endpoints.append(self._sender)
        self._sender.ready()

    def _round(self) -> None:
        self._sender.go()
        self._sink_words = _read_done(self._sink)

    def _verify_round(self) -> None:
        (_, send_cpu) = self._sender.finish()
        _reap(self._sink)
        total, first_bad, sink_cpu = self._sink_words
        self._endpoint_cpu = float(send_cpu) + float(sink_cpu)
        problem = describe_mismatch(int(total), int(first_bad), self.nbytes)
        if problem:
            raise BenchError(f"{self.workload}/{self.method}: the sink says {problem}")
        self._stop_forwarder()


class ForwardRoundTrips(_ForwardCase):
    """``trips`` timed round trips of ``MESSAGE_SIZE`` bytes each way."""

    workload = "forward-round-trips"
    title = "request/response through a forwarder process"
    methods: ClassVar[tuple[str, ...]] = (FASTPIPE_FORWARD, ASYNCIO_FORWARD, DIRECT)

    def __init__(self, method: str, trips: int) -> None:
        super().__init__(method, 2 * trips * MESSAGE_SIZE)
        self.trips = trips
        #: Per round: (median, min, p99) of one round trip, in seconds.
        self.latencies: list[tuple[float, float, float]] = []

    def _setup_round(self) -> None:
        self._server = _bench_proxy.Peer("echo-server", MESSAGE_SIZE)
        self._held.endpoints.append(self._server)
        (server_port,) = self._server.ready()
        port = self._forwarder_port(int(server_port))
        self._client = _bench_proxy.Peer("rr-latency", port, self.trips, MESSAGE_SIZE)
        self._held.endpoints.append(self._client)
        self._client.ready()

    def _round(self) -> None:
        self._client.go()
        self._client_words = _read_done(self._client)

    def _verify_round(self) -> None:
        _reap(self._client)
        (server_trips,) = self._server.finish()
        trips, median, low, p99 = (int(w) for w in self._client_words)
        if trips != self.trips or int(server_trips) != self.trips:
            raise BenchError(
                f"{self.workload}/{self.method}: {trips}/{server_trips}"
                f" round trips, not {self.trips}"
            )
        self._stop_forwarder()
        if self._unrecorded == 0:  # not a warm-up round (finish() counts those down)
            self.latencies.append((median / 1e9, low / 1e9, p99 / 1e9))

    def extra_info(self) -> dict[str, Any]:
        info = super().extra_info()
        if self.latencies:
            medians = [m for m, _, _ in self.latencies]
            info.update(
                rtt_median_us=round(statistics.median(medians) * 1e6, 2),
                rtt_best_median_us=round(min(medians) * 1e6, 2),
                rtt_min_us=round(min(low for _, low, _ in self.latencies) * 1e6, 2),
                rtt_p99_us=round(statistics.median(p for _, _, p in self.latencies) * 1e6, 2),
            )
        return info
