"""The workloads: each measures one forwarder per call, in fresh processes.

``run.py`` calls ``setup()`` once, then ``measure(peer)`` for every
forwarder in every round (the order rotating from round to round, so that
no forwarder always comes first or last), then ``finish()`` and
``teardown()``.  ``measure`` returns figures per table; a forwarder it
cannot measure raises ``peers.PeerError`` (that round counts as failed) or
``Skip`` (the forwarder is left out of the table, with a note).

Servers shared by all forwarders of a workload (nginx, the echo server) are
started in ``setup()``; each forwarder is started for its measurement and
stopped after it, so that no forwarder carries state from one to the next.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import peers
import procs
import report
from peers import DIRECT, FASTPIPE, SOCAT, Helper, HelperGroup, Peer, PeerError, Settings
from report import Results

Figures = dict[str, dict[str, Any]]


class Skip(Exception):
    """This forwarder is not measured by this workload (the reason is noted)."""


@dataclass
class Options:
    """The workloads' sizes (see ``run.py --help``)."""

    conns: int = 9000
    client_procs: int = 0
    connect_window: int = 0
    bringup_deadline: float = 60.0
    settle: float = 10.0
    requests: int = 20000
    concurrency: int = 50
    http_client: str = "auto"
    wrk_seconds: float = 10.0
    nginx_workers: int = 1
    bulk_seconds: float = 5.0
    verify_mib: int = 64
    trips: int = 2000
    pin_cpu: int | None = None
    fault_attempts: int = 200
    fault_batch: int = 100
    emfile_limit: int = 256
    emfile_window: float = 3.0
    emfile_recover: float = 10.0
    fault_wait: float = 0.0
    socat_max_conns: int = 1000


class Workload:
    name = ""
    tables: tuple[str, ...] = ()
    #: tools it cannot run without (any one of each tuple)
    needs: tuple[tuple[str, ...], ...] = ()
    #: measured without a forwarder too, as the reference
    with_direct = False

    def __init__(self, opts: Options, settings: Settings, results: Results) -> None:
        self.opts = opts
        self.settings = settings
        self.results = results
        self.held: list[Any] = []  # processes and sockets to end at teardown

    def setup(self) -> None:
        pass

    def measure(self, peer: Peer | None) -> Figures:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def teardown(self) -> None:
        for thing in reversed(self.held):
            if isinstance(thing, socket.socket):
                thing.close()
            else:
                procs.kill(thing)
        self.held.clear()

    def note(self, text: str, table: str | None = None) -> None:
        self.results.note(table or self.tables[0], text)


def _wait_tree_quiet(fwd: peers.Running, timeout: float = 3.0) -> None:
    """For a forking forwarder: wait until its per-connection children are gone."""
    if not fwd.peer.tree:
        return
    deadline = time.monotonic() + timeout
    while len(procs.descendants(fwd.pid)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)


# -- churn ----------------------------------------------------------------------


_AB = {
    "complete": re.compile(r"^Complete requests:\s+(\d+)", re.M),
    "failed": re.compile(r"^Failed requests:\s+(\d+)", re.M),
    "non2xx": re.compile(r"^Non-2xx responses:\s+(\d+)", re.M),
    "req_s": re.compile(r"^Requests per second:\s+([\d.]+)", re.M),
}
_WRK = {
    "complete": re.compile(r"(\d+) requests in"),
    "req_s": re.compile(r"Requests/sec:\s+([\d.]+)"),
    "non2xx": re.compile(r"Non-2xx or 3xx responses:\s+(\d+)"),
    "errors": re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"),
}


class Churn(Workload):
    """``ab -n REQUESTS -c CONCURRENCY`` (or wrk for a duration) against nginx.

    Each request is a new connection (ab without -k; wrk with
    ``Connection: close``).  Figures: requests/s, the forwarder's CPU per
    connection (CPU over the run / requests completed), failed requests, and
    its threads and RSS at the end.  A short untimed run first lets each
    forwarder reach its steady state (a grown worker pool).
    """

    name = "churn"
    tables = ("churn",)
    needs = (("nginx",), ("ab", "wrk"))
    with_direct = True

    def setup(self) -> None:
        client = self.opts.http_client
        if client == "auto":
            client = "ab" if peers.which("ab") else "wrk"
        self.client = client
        proc, self.nginx_port = peers.start_nginx(self.settings.workdir, self.opts.nginx_workers)
        self.held.append(proc)
        if client == "ab":
            self.note(
                f"ab -n {self.opts.requests} -c {self.opts.concurrency} against nginx"
                f" ({self.opts.nginx_workers} worker) serving a 1 KiB file"
            )
        else:
            self.note(
                f"wrk -t1 -c {self.opts.concurrency} -d {self.opts.wrk_seconds:g}s"
                " -H 'Connection: close' against nginx serving a 1 KiB file"
            )
        self.note("direct: the client talks to nginx itself (the reference)")

    def _load(self, port: int, requests: int) -> dict[str, float]:
        url = f"http://127.0.0.1:{port}/index.html"
        c = self.opts.concurrency
        if self.client == "ab":
            cmd = ["ab", "-q", "-r", "-s", "30", "-n", str(requests), "-c", str(c), url]
            timeout = 60 + requests / 200
        else:
            seconds = self.opts.wrk_seconds if requests >= self.opts.requests else 1.0
            cmd = ["wrk", "-t1", "-c", str(c), "-d", f"{seconds:g}s", "--timeout", "30s"]
            cmd += ["-H", "Connection: close", url]
            timeout = 60 + seconds
        proc = procs.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PeerError(f"{self.client} did not finish within {timeout:.0f} s") from None
        finally:
            procs.kill(proc)
        text = out.decode("utf-8", "replace")
        found: dict[str, float] = {}
        for key, pattern in (_AB if self.client == "ab" else _WRK).items():
            m = pattern.search(text)
            if m:
                found[key] = sum(float(g) for g in m.groups())
        if "req_s" not in found or "complete" not in found:
            raise PeerError(f"{self.client}: no figures in its output: {text[-800:]}")
        found["failed"] = found.get("failed", 0) + found.get("errors", 0) + found.get("non2xx", 0)
        return found

    def measure(self, peer: Peer | None) -> Figures:
        if peer is None:
            load = self._load(self.nginx_port, self.opts.requests)
            return {"churn": {"req_s": load["req_s"], "failed": load["failed"]}}
        fwd = peers.start_forwarder(
            peer, self.nginx_port, self.settings, maxconn=4 * self.opts.concurrency + 100
        )
        try:
            self._load(fwd.port, max(50, min(1000, self.opts.requests // 10)))
            _wait_tree_quiet(fwd)
            cpu0 = fwd.cpu()
            load = self._load(fwd.port, self.opts.requests)
            _wait_tree_quiet(fwd)
            cpu = fwd.cpu() - cpu0
            mem = fwd.memory()
        finally:
            fwd.stop()
        return {
            "churn": {
                "req_s": load["req_s"],
                "cpu_us_conn": cpu / max(1.0, load["complete"]) * 1e6,
                "failed": load["failed"],
                "threads": mem["threads"],
                "rss_mib": mem["rss_kib"] / 1024,
            }
        }


# -- idle, bring-up, after close, shutdown ------------------------------------------


class Idle(Workload):
    """N idle connections through the forwarder to an echo server.

    One forwarder instance: bring-up (N clients, spread over helper
    processes, connect at once and each waits for its ping to come back),
    threads and RSS with N idle (RSS per connection: the growth over the
    forwarder's RSS when it started listening, divided by N), every
    connection echoes again, all close, after ``settle`` seconds threads and
    RSS again, then a second burst of N (its peak RSS over the first's).
    With the shutdown table: SIGTERM with the second burst's N open, and
    a second instance that gets SIGTERM just after N connections came and
    went.  Time to exit is from the signal to the process being reaped.
    """

    name = "idle"
    tables = ("idle", "bring-up", "after-close", "shutdown")

    def __init__(self, *args: Any, idle: bool = True, shutdown: bool = True) -> None:
        super().__init__(*args)
        self.want_idle = idle
        self.want_shutdown = shutdown
        self.tables = tuple(
            t for t in self.tables if (t == "shutdown" and shutdown) or (t != "shutdown" and idle)
        )

    def setup(self) -> None:
        n = self.opts.conns
        self.procs = self.opts.client_procs or max(1, math.ceil(n / 3000))
        if self.want_idle:
            self.note(
                f"{n:,} connections from {self.procs} client processes; settle time"
                f" {self.opts.settle:g} s; RSS per connection = (RSS with N open"
                " - RSS when it started listening) / N"
            )
        self.note("socat: threads, fds and memory summed over its processes (memory as PSS)")
        if self.want_shutdown:
            self.note(
                f"fastpipe runs with --grace {self.settings.grace:g}; haproxy, socat and"
                " asyncio have no grace period (haproxy's SIGTERM is its hard stop; socat's"
                " parent exits and leaves its children)",
                "shutdown",
            )

    def _shares(self) -> list[int]:
        n, k = self.opts.conns, self.procs
        return [n // k + (i < n % k) for i in range(k)]

    def _open(self, group: HelperGroup, port: int, who: str) -> tuple[float | None, int]:
        """Open N; (seconds until all echoed or None, connections not up)."""
        deadline = self.opts.bringup_deadline
        window = self.opts.connect_window
        commands = [f"open {k} {port} {window} {deadline:g}" for k in self._shares()]
        replies = group.all(commands, deadline + 60)
        counts = {
            key: sum(r[key] for r in replies) for key in ("ok", "failed", "closed", "pending")
        }
        problems = counts["failed"] + counts["closed"] + counts["pending"]
        seconds = [r["seconds"] for r in replies]
        if problems or any(s is None for s in seconds):
            errors: dict[str, int] = {}
            for r in replies:
                for key, count in r["errors"].items():
                    errors[key] = errors.get(key, 0) + count
            self.note(
                f"{who}: {problems:,} of {self.opts.conns:,} not up after {deadline:g} s:"
                f" {counts}, errors {errors}",
                "bring-up",
            )
            return None, problems
        return max(seconds), 0

    def _echo(self, group: HelperGroup) -> int:
        replies = group.same(
            f"echo {self.opts.bringup_deadline:g}", self.opts.bringup_deadline + 60
        )
        return self.opts.conns - sum(r["echoed"] for r in replies)

    def measure(self, peer: Peer | None) -> Figures:
        assert peer is not None
        n = self.opts.conns
        if peer.kind == SOCAT and n > self.opts.socat_max_conns:
            raise Skip(
                f"socat left out: a process per connection, {n:,} processes"
                f" (above --socat-max-conns {self.opts.socat_max_conns})"
            )
        out: Figures = {t: {} for t in self.tables}
        echo, echo_port = peers.start_target("echo", self.settings.workdir)
        try:
            if self.want_idle or self.want_shutdown:
                self._first_instance(peer, echo_port, out)
            if self.want_shutdown:
                self._closed_instance(peer, echo_port, out)
        finally:
            procs.kill(echo)
        return out

    def _first_instance(self, peer: Peer, echo_port: int, out: Figures) -> None:
        n = self.opts.conns
        fwd = peers.start_forwarder(peer, echo_port, self.settings, maxconn=n + 100)
        group = None
        try:
            group = HelperGroup(self.settings.workdir, self.procs)
            time.sleep(0.2)
            start = fwd.memory()
            seconds, problems = self._open(group, fwd.port, peer.name)
            if self.want_idle:
                out["bring-up"].update(bringup_s=seconds, problems=problems)
                time.sleep(1.0)
                idle = fwd.memory()
                failed = self._echo(group)
                peak1 = fwd.memory()["hwm_kib"]
                out["idle"].update(
                    threads=idle["threads"],
                    kib_per_conn=(idle["rss_kib"] - start["rss_kib"]) / n,
                    rss_start_mib=start["rss_kib"] / 1024,
                    rss_idle_mib=idle["rss_kib"] / 1024,
                    fds=idle["fds"],
                    echo_failed=failed,
                )
                group.same("close all", 60)
                time.sleep(self.opts.settle)
                after = fwd.memory()
                seconds2, _ = self._open(group, fwd.port, f"{peer.name}, second burst")
                failed2 = self._echo(group)
                peak2 = fwd.memory()["hwm_kib"]
                out["bring-up"]["bringup2_s"] = seconds2
                out["after-close"].update(
                    threads_after=after["threads"],
                    rss_after_mib=after["rss_kib"] / 1024,
                    rss_after_pct=(after["rss_kib"] - start["rss_kib"]) / start["rss_kib"] * 100,
                    burst2_growth_pct=(peak2 - peak1) / peak1 * 100 if not peer.tree else None,
                    burst2_echo_failed=failed2,
                )
            if self.want_shutdown:
                exit_s, status = self._sigterm(fwd, "open")
                out["shutdown"].update(exit_open_s=exit_s, status_open=status)
        finally:
            if group is not None:
                group.close()
            fwd.stop()

    def _sigterm(self, fwd: peers.Running, when: str) -> tuple[Any, Any]:
        """SIGTERM; (seconds to exit, exit status), FAILED for both past the wait."""
        wait = self.settings.grace + 30
        exit_s, status = fwd.sigterm(wait)
        if exit_s is None:
            self.note(
                f"{fwd.peer.name}, N {when}: still running {wait:g} s after SIGTERM", "shutdown"
            )
            return report.FAILED, report.FAILED
        return exit_s, status

    def _closed_instance(self, peer: Peer, echo_port: int, out: Figures) -> None:
        fwd = peers.start_forwarder(peer, echo_port, self.settings, maxconn=self.opts.conns + 100)
        group = None
        try:
            group = HelperGroup(self.settings.workdir, self.procs)
            time.sleep(0.2)
            fds = fwd.memory()["fds"]
            self._open(group, fwd.port, f"{peer.name}, shutdown instance")
            group.same("close all", 60)
            # "Just closed": the forwarder has closed its side too.
            deadline = time.monotonic() + 15
            while fwd.memory()["fds"] > fds + 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            exit_s, status = self._sigterm(fwd, "just closed")
            out["shutdown"].update(exit_closed_s=exit_s, status_closed=status)
        finally:
            if group is not None:
                group.close()
            fwd.stop()


# -- bulk -------------------------------------------------------------------------


class Bulk(Workload):
    """iperf3, one stream, through the forwarder; then a checked transfer.

    Figures: iperf3's received Gbit/s, the forwarder's CPU seconds per GiB
    received, and, through a fresh instance of the forwarder to the echo
    server, VERIFY_MIB of a counting pattern sent and compared byte for byte
    as it comes back (bytes wrong or missing: 0 expected).
    """

    name = "bulk"
    tables = ("bulk",)
    needs = (("iperf3",),)

    def setup(self) -> None:
        proc, self.echo_port = peers.start_target("echo", self.settings.workdir)
        self.held.append(proc)
        self.helper = Helper(self.settings.workdir)
        self.held.append(self.helper.proc)
        self.note(
            f"iperf3 -t {self.opts.bulk_seconds:g}, client to server; checked transfer:"
            f" {self.opts.verify_mib} MiB through the forwarder to an echo server and back"
        )

    def measure(self, peer: Peer | None) -> Figures:
        assert peer is not None
        server, port = peers.start_iperf3_server(self.settings.workdir)
        try:
            fwd = peers.start_forwarder(peer, port, self.settings, maxconn=100)
            try:
                cpu0 = fwd.cpu()
                secs = self.opts.bulk_seconds
                cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(fwd.port), "-t", f"{secs:g}", "-J"]
                client = procs.spawn(cmd, stdout=subprocess.PIPE)
                try:
                    text, _ = client.communicate(timeout=secs + 60)
                except subprocess.TimeoutExpired:
                    raise PeerError("iperf3 did not finish") from None
                finally:
                    procs.kill(client)
                _wait_tree_quiet(fwd)
                cpu = fwd.cpu() - cpu0
            finally:
                fwd.stop()
        finally:
            procs.kill(server)
        try:
            report = json.loads(text)
            received = report["end"]["sum_received"]
        except (ValueError, KeyError):
            raise PeerError(f"iperf3: {text[-500:]!r}") from None
        nbytes = received["bytes"]
        figures: dict[str, Any] = {
            "gbit_s": received["bits_per_second"] / 1e9,
            "cpu_s_gib": cpu / (nbytes / 2**30) if nbytes else None,
        }
        figures["verify_bad"] = self._verify(peer)
        return {"bulk": figures}

    def _verify(self, peer: Peer) -> int:
        nbytes = self.opts.verify_mib << 20
        fwd = peers.start_forwarder(peer, self.echo_port, self.settings, maxconn=100)
        try:
            r = self.helper.request(f"verify {fwd.port} {nbytes}", 300)
        finally:
            fwd.stop()
        if r["ok"]:
            return 0
        good = r["first_bad"] if r["first_bad"] >= 0 else r["received"]
        self.note(f"{peer.name}: checked transfer: {r}")
        return int(nbytes - good)


# -- latency ----------------------------------------------------------------------


class Latency(Workload):
    """100-byte round trips on one connection, the client, forwarder and echo
    server all pinned to one CPU (taskset); ``added_us`` is the round's
    median minus the same round's direct median (the client to the echo
    server itself)."""

    name = "latency"
    tables = ("latency",)
    with_direct = True

    def setup(self) -> None:
        cpu = self.opts.pin_cpu
        if cpu is None:
            cpu = max(os.sched_getaffinity(0))
        if not peers.which("taskset"):
            self.note("taskset is missing: not pinned, so the figures swing with scheduling")
            self.cpu: int | None = None
        else:
            self.cpu = cpu
        proc, self.echo_port = peers.start_target("echo", self.settings.workdir, cpu=self.cpu)
        self.held.append(proc)
        self.helper = Helper(self.settings.workdir, cpu=self.cpu)
        self.held.append(self.helper.proc)
        self.note(f"{self.opts.trips} round trips per round, all on CPU {self.cpu}")

    def measure(self, peer: Peer | None) -> Figures:
        trips = self.opts.trips
        if peer is None:
            r = self.helper.request(f"rtt {self.echo_port} {trips} 100", 120)
        else:
            fwd = peers.start_forwarder(
                peer, self.echo_port, self.settings, maxconn=100, cpu=self.cpu
            )
            try:
                r = self.helper.request(f"rtt {fwd.port} {trips} 100", 120)
            finally:
                fwd.stop()
        return {"latency": {"rtt_us": r["median_ns"] / 1e3, "p99_us": r["p99_ns"] / 1e3}}

    def finish(self) -> None:
        rtt = self.results.values.get("latency", {}).get("rtt_us", {})
        direct = rtt.get(DIRECT)
        if direct is None:
            return
        for name, row in rtt.items():
            if name == DIRECT:
                continue
            added = [
                None if a is None or d is None else a - d for a, d in zip(row, direct, strict=True)
            ]
            for i, value in enumerate(added):
                self.results.record("latency", name, i, {"added_us": value})


# -- faults -----------------------------------------------------------------------


class Faults(Workload):
    """Dead targets, then the fd limit.

    Dead targets: a port with nothing listening (refused), a server that
    resets each connection at once (reset), and a listener whose accept
    queue is full so that SYNs to it are dropped (silent: the forwarder's
    connect times out after --connect-timeout).  For each, a fresh forwarder
    gets one batch of warm-up attempts, then ATTEMPTS clients, BATCH at a time,
    connect, send a line, and wait for the forwarder to close them (up to
    FAULT_WAIT s, by default 4 x connect-timeout + 5: room for a forwarder
    that retries its connect, as haproxy does 3 times).  Figures: the share
    closed, the median time to close, ``end=error`` lines per attempt
    (fastpipe only: the others do not log here), and threads, fds and RSS
    left once they are over (from the levels after the warm-up).

    The fd limit: a forwarder started with RLIMIT_NOFILE = EMFILE_LIMIT
    (haproxy: ``ulimit-n``, from which it derives its maxconn) gets as many
    clients as its limit, each sending a ping to the echo server: within
    EMFILE_WINDOW seconds some are served, the rest wait (or are closed).
    Over the next EMFILE_WINDOW seconds at the limit, its CPU and its log
    lines about accept; then the served clients close, and it must serve as
    many of the waiting ones as it served before (within EMFILE_RECOVER
    seconds), and then new ones once all have closed.
    """

    name = "faults"
    tables = ("faults", "emfile")

    def setup(self) -> None:
        workdir = self.settings.workdir
        refuse = socket.socket()
        refuse.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        self.held.append(refuse)
        reset_proc, reset_port = peers.start_target("reset", workdir)
        self.held.append(reset_proc)
        hole_proc, hole_port = peers.start_target("blackhole", workdir)
        self.held.append(hole_proc)
        echo_proc, self.echo_port = peers.start_target("echo", workdir)
        self.held.append(echo_proc)
        self.dead = {
            "refused": refuse.getsockname()[1],
            "reset": reset_port,
            "silent": hole_port,
        }
        self.helper = Helper(workdir)
        self.held.append(self.helper.proc)
        self.note(
            f"{self.opts.fault_attempts} attempts per target, {self.opts.fault_batch} at a"
            f" time; connect timeout {self.settings.connect_timeout:g} s (the asyncio"
            " forwarder has none)"
        )
        self.note(
            f"RLIMIT_NOFILE {self.opts.emfile_limit}, {self.opts.emfile_limit} clients,"
            f" {self.opts.emfile_window:g} s at the limit",
            "emfile",
        )

    def measure(self, peer: Peer | None) -> Figures:
        assert peer is not None
        out: Figures = {"faults": {}, "emfile": {}}
        # Each part on its own: one that fails leaves the others' figures.
        for kind, port in self.dead.items():
            try:
                out["faults"].update(self._dead(peer, kind, port))
            except PeerError as exc:
                self.note(f"{peer.name}, {kind}: {exc}", "faults")
                for metric in report.TABLE_BY_KEY["faults"].metrics:
                    if metric.key.startswith(kind + "_"):
                        out["faults"][metric.key] = report.FAILED
        try:
            out["emfile"] = self._emfile(peer)
        except PeerError as exc:
            self.note(f"{peer.name}: {exc}", "emfile")
            out["emfile"] = {m.key: report.FAILED for m in report.TABLE_BY_KEY["emfile"].metrics}
        return out

    def _dead(self, peer: Peer, kind: str, port: int) -> dict[str, Any]:
        m = self.opts.fault_attempts
        batch = self.opts.fault_batch
        timeout = self.opts.fault_wait or 4 * self.settings.connect_timeout + 5
        fwd = peers.start_forwarder(peer, port, self.settings, maxconn=batch + 100)
        try:
            # One batch first: the forwarder grows to the batch's concurrency
            # (a worker pool, say) before the levels "before" are taken, so
            # that what is left after is what the attempts themselves left.
            warm = min(batch, m)
            self.helper.request(f"faults {warm} {fwd.port} {warm} {timeout:g}", timeout + 60)
            time.sleep(0.5)
            before = fwd.memory()
            lines0 = fwd.log_lines("end=error")
            rounds = math.ceil(m / batch)
            r = self.helper.request(
                f"faults {m} {fwd.port} {batch} {timeout:g}", rounds * (timeout + 5) + 60
            )
            # What is left once the attempts are over: give the forwarder
            # time to finish its own clean-up first, until it is back to its
            # levels or has not changed for a second (at most 5 s).
            deadline = time.monotonic() + 5
            after = fwd.memory()
            last, since = after, time.monotonic()
            while time.monotonic() < deadline:
                if after["threads"] <= before["threads"] and after["fds"] <= before["fds"]:
                    break
                if time.monotonic() - since >= 1.0:
                    break
                time.sleep(0.1)
                after = fwd.memory()
                if (after["threads"], after["fds"]) != (last["threads"], last["fds"]):
                    last, since = after, time.monotonic()
            lines = fwd.log_lines("end=error") - lines0
        finally:
            fwd.stop()
        if r["closed"] < m:
            self.note(f"{peer.name}, {kind}: {r['outcome']}", "faults")
        return {
            f"{kind}_closed_pct": r["closed"] / m * 100,
            f"{kind}_close_s": r["median_s"],
            f"{kind}_error_lines": lines / m if peer.kind == FASTPIPE else None,
            f"{kind}_threads_left": after["threads"] - before["threads"],
            f"{kind}_fds_left": after["fds"] - before["fds"],
            f"{kind}_kib_left": (after["rss_kib"] - before["rss_kib"]) / m,
        }

    def _emfile(self, peer: Peer) -> dict[str, Any]:
        limit = self.opts.emfile_limit
        fwd = peers.start_forwarder(peer, self.echo_port, self.settings, nofile=limit)
        helper = self.helper
        try:
            window = self.opts.emfile_window
            first = helper.request(f"open {limit} {fwd.port} 0 {window:g}", window + 60)
            cpu0, lines0 = fwd.cpu(), fwd.log_lines("accept")
            time.sleep(window)
            cpu, lines = fwd.cpu() - cpu0, fwd.log_lines("accept") - lines0
            helper.request("close ok", 60)
            waited = helper.request(f"wait {self.opts.emfile_recover:g}", 120)
            helper.request("close all", 60)
            fresh_n = max(1, min(20, limit // 8))
            fresh = helper.request(f"open {fresh_n} {fwd.port} 0 10", 120)
            helper.request("close all", 60)
        finally:
            fwd.stop()
        # Once the served clients close, the forwarder has room for as many
        # again: the waiting ones beyond that stay waiting, rightly.
        pending = first["pending"]
        room = min(pending, first["ok"])
        return {
            "served": first["ok"],
            "closed": first["closed"] + first["failed"],
            "pending": pending,
            "cpu_pct": cpu / window * 100,
            "accept_lines_s": lines / window,
            "backlog_served_pct": min(100.0, waited["ok"] / room * 100) if room else None,
            "fresh_ok_pct": fresh["ok"] / fresh_n * 100,
        }


WORKLOADS = ("churn", "idle", "shutdown", "bulk", "latency", "faults")
