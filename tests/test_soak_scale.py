"""Soak and scale: 100,000 sequential relays leak nothing; 2,000 at once are byte-exact.

Both run in a fresh interpreter (this file, run as a script), so that RSS means
something and so that the 2,000 workers of the scale run do not stay in the
default pool of the test process.  The child prints one JSON line with its
measurements; the test asserts on them and prints them (``pytest -s`` shows
them).

Soak: every relay goes through ``fastpipe.relay()`` and the default pool, with
small payloads (16 B to 6 KiB, distinct per relay) over a mix of ends and
paths, each checked byte for byte:

- pipe to pipe, int fds: ``splice`` straight between the two pipes;
- unix socket to unix socket, socket objects, ``zerocopy=False``: the
  read/write loop with a pooled buffer, and ends closed through ``close()``;
- unix socket to unix socket, ``zerocopy=True``: ``splice`` through a pipe of
  the pipe pool;
- pipe to unix socket with ``count=`` and ``close=False``: the count stops it
  half-way, the rest must still be in the source;
- a regular file to a pipe: a kernel path from a file.

After a warm-up, the open fds (``/proc/self/fd``), the threads
(``threading.active_count()`` and ``/proc/self/task``), ``buffer_stats()`` and
``pipe_stats()`` are recorded, and again at the end: none may grow, and RSS
(``/proc/self/statm``) must grow by less than 5%.

Scale: 2,000 relays are started on idle sources, so that all of them are
parked at once (in the pool's epoll set, with a thread or two for all of
them), then the test feeds every
source and drains every sink at the same time from one epoll loop: payloads of
1 B to 256 KiB, each a different window of random bytes, compared whole at the
other end.  RLIMIT_NOFILE is raised within the hard limit in the child.

At the thread limit (``RLIMIT_NPROC``, ``pid_max``, a cgroup's ``pids.max``),
where no worker can start, ``relay()`` and ``proxy()`` raise ``RuntimeError``,
close their ends and leave the pool working: simulated in-process by a
``Thread.start`` that fails for workers (root ignores ``RLIMIT_NPROC``).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pytest

import fastpipe

from conftest import wait_for

SOAK_RELAYS = 100_000
SOAK_WARMUP = 5_000
SCALE_RELAYS = 2_000
# Per relay in the scale run: our two ends and the relay's two, and at most
# one pooled pipe pair in use while its bytes are in flight; plus headroom for
# the interpreter and the pipe pool's idle pipes.
SCALE_FDS_NEEDED = SCALE_RELAYS * 6 + 256
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- measurements (in the child) -------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * _PAGE


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _poller_fds() -> tuple[int, ...]:
    return tuple(fastpipe.default_pool()._core.poller_fds())


def _snapshot() -> dict[str, Any]:
    gc.collect()
    return {
        # Less the pool's poller (an epoll set and an eventfd), which opens
        # when a relay first parks, whichever relay of the run that is.
        "fds": len(set(os.listdir("/proc/self/fd")) - {str(fd) for fd in _poller_fds()}),
        "threads": threading.active_count(),
        "tasks": len(os.listdir("/proc/self/task")),
        "workers": fastpipe.default_pool().stats()["workers"],
        "buffers": fastpipe.buffer_stats(),
        "pipes": fastpipe.pipe_stats(),
        "rss": _rss(),
    }


# -- the soak child ----------------------------------------------------------


def _payload(i: int) -> bytes:
    """Small and distinct per relay: 16 B to about 6 KiB."""
    unit = b"relay %d;" % i
    return unit * (1 + (i * 7919) % 600)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _soak_one(i: int, file_path: str, file_data: bytes, filler: bytes) -> str | None:
    """One relay of the mix; raises AssertionError on a wrong byte."""
    kind = i % 5
    payload = _payload(i)
    if kind == 0:  # pipe -> pipe, ints: splice between the pipes
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        os.write(w1, payload)
        os.close(w1)
        relay = fastpipe.relay(r1, w2)
        n = relay.result(timeout=60)
        got = _read_all(r2)
        os.close(r2)
    elif kind == 1:  # unix socket -> unix socket, objects, read/write
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        a.sendall(payload)
        a.close()
        relay = fastpipe.relay(b, c, zerocopy=False)
        n = relay.result(timeout=60)
        got = _recv_all(d)
        d.close()
        assert b.fileno() == -1 and c.fileno() == -1, "close=True left an object open"
    elif kind == 2:  # unix socket -> unix socket, splice through a pooled pipe
        # A socket source starts on read/write and moves to splice after a
        # read of 64 KiB: send more than that first, the rest after the start.
        payload = b"%d;" % i + filler + payload
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        a.sendall(payload[: len(filler)])
        relay = fastpipe.relay(b, c)
        a.sendall(payload[len(filler) :])
        a.close()
        n = relay.result(timeout=60)
        got = _recv_all(d)
        d.close()
    elif kind == 3:  # pipe -> unix socket, count= and close=False
        r1, w1 = os.pipe()
        c, d = socket.socketpair()
        os.write(w1, payload)
        os.close(w1)
        count = len(payload) // 2
        relay = fastpipe.relay(r1, c, count=count, close=False)
        n = relay.result(timeout=60)
        c.close()
        got = _recv_all(d)
        d.close()
        rest = _read_all(r1)
        os.close(r1)
        assert rest == payload[count:], f"relay {i}: count= took the wrong bytes"
        payload = payload[:count]
    else:  # regular file -> pipe
        src = os.open(file_path, os.O_RDONLY)
        r2, w2 = os.pipe()
        relay = fastpipe.relay(src, w2)
        n = relay.result(timeout=60)
        got = _read_all(r2)
        os.close(r2)
        payload = file_data
    assert got == payload, f"relay {i} (kind {kind}): {len(got)} bytes, not the {len(payload)} sent"
    assert n == len(payload), f"relay {i}: result {n}, {len(payload)} bytes moved"
    return relay.method


def _soak_child(relays: int, warmup: int) -> dict[str, Any]:
    methods: dict[str, int] = {}
    file_data = os.urandom(6000)
    filler = os.urandom(68 << 10)
    with tempfile.NamedTemporaryFile(prefix="fastpipe-soak-") as f:
        f.write(file_data)
        f.flush()
        started = time.perf_counter()
        for i in range(warmup):
            method = str(_soak_one(i, f.name, file_data, filler))
            methods[method] = methods.get(method, 0) + 1
        warm = _snapshot()
        for i in range(warmup, relays):
            method = str(_soak_one(i, f.name, file_data, filler))
            methods[method] = methods.get(method, 0) + 1
        elapsed = time.perf_counter() - started
        end = _snapshot()
    return {
        "implementation": fastpipe.IMPLEMENTATION,
        "relays": relays,
        "seconds": elapsed,
        "methods": methods,
        "warm": warm,
        "end": end,
    }


# -- the scale child ---------------------------------------------------------


def _raise_nofile(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class _Stream:
    """One relay's two outer ends, fed and drained by the epoll loop."""

    __slots__ = ("index", "payload", "sent", "writer", "reader", "received", "wrong")

    def __init__(self, index: int, payload: memoryview, writer: Any, reader: Any) -> None:
        self.index = index
        self.payload = payload
        self.sent = 0
        self.writer = writer  # a socket or an int fd: our end of the source
        self.reader = reader  # our end of the sink
        # Compared as they arrive rather than kept: RSS is then the
        # library's (and the fds'), not 200 MB of received bytes.
        self.received = 0
        self.wrong = False


def _write(end: Any, data: memoryview) -> int:
    try:
        return end.send(data) if isinstance(end, socket.socket) else os.write(end, data)
    except BlockingIOError:
        return 0


def _read(end: Any) -> bytes | None:
    try:
        return end.recv(1 << 16) if isinstance(end, socket.socket) else os.read(end, 1 << 16)
    except BlockingIOError:
        return None


def _close(end: Any) -> None:
    if isinstance(end, socket.socket):
        end.close()
    else:
        os.close(end)


def _scale_child(relays: int, stack_kib: int = 0) -> dict[str, Any]:
    if stack_kib:
        threading.stack_size(stack_kib * 1024)  # before the pool starts a thread
    limits = _raise_nofile(relays * 6 + 256)
    block = os.urandom(1 << 20)
    sizes = [1 + (i * 104729) % (256 << 10) if i % 4 else 1 + i % 1000 for i in range(relays)]
    rss_before = _rss()
    vm_before = _vm_size()
    maps_before = _maps()
    started = time.perf_counter()
    streams: list[_Stream] = []
    relay_list = []
    for i in range(relays):
        offset = (i * 523) % (len(block) - sizes[i])
        payload = memoryview(block)[offset : offset + sizes[i]]
        kind = i % 3
        if kind == 2:  # pipe -> pipe: splice between the pipes
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            os.set_blocking(w1, False)
            os.set_blocking(r2, False)
            relay = fastpipe.relay(r1, w2)
            streams.append(_Stream(i, payload, w1, r2))
        else:  # unix socket -> unix socket: read/write, or splice through a pooled pipe
            a, b = socket.socketpair()
            c, d = socket.socketpair()
            a.setblocking(False)
            d.setblocking(False)
            relay = fastpipe.relay(b, c, zerocopy=kind == 1)
            streams.append(_Stream(i, payload, a, d))
        relay_list.append(relay)
    # Every relay parks on its idle source, holding no thread.
    deadline = time.monotonic() + 120
    while fastpipe.default_pool().stats()["parked"] < relays and time.monotonic() < deadline:
        time.sleep(0.01)
    parked = fastpipe.default_pool().stats()
    threads_parked = threading.active_count()
    rss_parked = _rss()
    vm_parked = _vm_size() - vm_before
    maps_parked = _maps() - maps_before
    started_all = time.perf_counter() - started

    selector = selectors.DefaultSelector()
    for s in streams:
        selector.register(s.writer, selectors.EVENT_WRITE, (s, True))
        selector.register(s.reader, selectors.EVENT_READ, (s, False))
    open_ends = 2 * relays
    loop_deadline = time.monotonic() + 600
    while open_ends:
        if time.monotonic() > loop_deadline:
            raise AssertionError(f"{open_ends} ends still open after 600 s")
        for key, _ in selector.select(timeout=10):
            s, writing = key.data
            if writing:
                s.sent += _write(s.writer, s.payload[s.sent : s.sent + (1 << 16)])
                if s.sent == len(s.payload):
                    selector.unregister(s.writer)
                    _close(s.writer)  # end of file for the relay
                    open_ends -= 1
            else:
                chunk = _read(s.reader)
                if chunk is None:
                    continue
                if chunk:
                    expected = s.payload[s.received : s.received + len(chunk)]
                    s.wrong |= bytes(expected) != chunk
                    s.received += len(chunk)
                    continue
                selector.unregister(s.reader)
                _close(s.reader)
                open_ends -= 1
    selector.close()
    counts = [relay.result(timeout=120) for relay in relay_list]
    elapsed = time.perf_counter() - started
    rss_after = _rss()
    wrong = [
        s.index
        for s, n in zip(streams, counts, strict=True)
        if s.wrong or s.received != len(s.payload) or n != len(s.payload)
    ]
    methods: dict[str, int] = {}
    for relay in relay_list:
        methods[str(relay.method)] = methods.get(str(relay.method), 0) + 1
    return {
        "implementation": fastpipe.IMPLEMENTATION,
        "relays": relays,
        "nofile": list(limits),
        "bytes": sum(sizes),
        "wrong": wrong[:20],
        "wrong_count": len(wrong),
        "methods": methods,
        "parked_stats": parked,
        "threads_parked": threads_parked,
        "seconds_to_park": started_all,
        "seconds": elapsed,
        "rss_before": rss_before,
        "rss_parked": rss_parked,
        "rss_after": rss_after,
        "vm_parked": vm_parked,
        "maps_parked": maps_parked,
        "peak_rss": _peak_rss(),
        "buffers": fastpipe.buffer_stats(),
        "pipes": fastpipe.pipe_stats(),
        "stack_size": threading.stack_size(),
    }


# -- the tests ---------------------------------------------------------------


def _run_child(*args: str, timeout: float) -> dict[str, Any]:
    # -W error and an empty stderr: pytest's filterwarnings=error does not
    # reach the child, and a ResourceWarning from __del__ is only printed.
    proc = subprocess.run(
        [sys.executable, "-W", "error", __file__, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert not proc.stderr, f"the child wrote to stderr:\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["implementation"] == fastpipe.IMPLEMENTATION, "the child used the other twin"
    return result


def test_soak_100k_sequential_relays_leak_nothing() -> None:
    r = _run_child("soak", str(SOAK_RELAYS), str(SOAK_WARMUP), timeout=900)
    warm, end = r["warm"], r["end"]
    growth = (end["rss"] - warm["rss"]) / warm["rss"]
    print(
        f"\nsoak [{r['implementation']}]: {r['relays']} relays in {r['seconds']:.1f} s "
        f"({r['relays'] / r['seconds']:.0f}/s), methods {r['methods']}; after warm-up -> end: "
        f"fds {warm['fds']} -> {end['fds']}, threads {warm['threads']} -> {end['threads']}, "
        f"tasks {warm['tasks']} -> {end['tasks']}, workers {warm['workers']} -> {end['workers']}, "
        f"buffers allocated {warm['buffers']['allocated']} -> {end['buffers']['allocated']}, "
        f"pipes allocated {warm['pipes']['allocated']} -> {end['pipes']['allocated']}, "
        f"RSS {warm['rss'] / 1024:.0f} -> {end['rss'] / 1024:.0f} KiB ({growth:+.2%})"
    )
    # Every path of the mix was taken (else the soak tested less than it says).
    assert {"splice", "readwrite"} <= set(r["methods"]), r["methods"]
    assert sum(r["methods"].values()) == SOAK_RELAYS
    assert end["fds"] <= warm["fds"], (warm, end)
    assert end["threads"] <= warm["threads"], (warm, end)
    assert end["tasks"] <= warm["tasks"], (warm, end)
    assert end["workers"] <= warm["workers"], (warm, end)
    for stats in ("buffers", "pipes"):
        assert end[stats]["in_use"] == 0, (stats, end[stats])
        assert end[stats]["allocated"] <= warm[stats]["allocated"], (stats, warm, end)
    assert growth < 0.05, f"RSS grew {growth:.2%} over {SOAK_RELAYS - SOAK_WARMUP} relays"


def test_scale_2000_concurrent_relays_byte_exact() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SCALE_FDS_NEEDED:
        pytest.skip(
            f"RLIMIT_NOFILE hard limit is {hard}; {SCALE_RELAYS} relays need "
            f"{SCALE_FDS_NEEDED} fds (raise it with ulimit -Hn or limits.conf)"
        )
    r = _run_child("scale", str(SCALE_RELAYS), timeout=900)
    n = r["relays"]
    parked_kib = (r["rss_parked"] - r["rss_before"]) / n / 1024
    peak_kib = (r["peak_rss"] - r["rss_before"]) / n / 1024
    print(
        f"\nscale [{r['implementation']}]: {n} concurrent relays, {r['bytes'] / 2**20:.0f} MiB, "
        f"methods {r['methods']}, all parked after {r['seconds_to_park']:.2f} s "
        f"with {r['threads_parked']} threads, "
        f"total {r['seconds']:.2f} s; RSS per relay: parked {parked_kib:.1f} KiB, "
        f"peak {peak_kib:.1f} KiB; virtual {r['vm_parked'] / n / 2**20:.1f} MiB and "
        f"{r['maps_parked'] / n:.1f} maps per relay; buffers peak {r['buffers']['peak']}, "
        f"pipes peak {r['pipes']['peak']} (small {r['pipes']['small']}); "
        f"RLIMIT_NOFILE {r['nofile']}"
    )
    assert r["parked_stats"]["parked"] == n, r["parked_stats"]
    # The main thread, the completer, and workers for the copies that run.
    assert r["threads_parked"] <= 16, r["threads_parked"]
    assert r["wrong_count"] == 0, f"relays that moved wrong bytes: {r['wrong']}"
    assert sum(r["methods"].values()) == n
    assert {"splice", "readwrite"} <= set(r["methods"]), r["methods"]
    assert r["buffers"]["in_use"] == 0 and r["pipes"]["in_use"] == 0, (r["buffers"], r["pipes"])


def at_the_thread_limit(monkeypatch: pytest.MonkeyPatch, workers_left: int = 0) -> None:
    """From now on only ``workers_left`` more worker threads can start; the
    next one fails as ``Thread.start`` does at RLIMIT_NPROC or pid_max."""
    real_start = threading.Thread.start
    left = [workers_left]

    def start(self: threading.Thread) -> None:
        if self.name.startswith("fastpipe-worker"):
            if not left[0]:
                raise RuntimeError("can't start new thread")
            left[0] -= 1
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)


def see_end_and_close(*peers: socket.socket) -> None:
    """Each peer of a proxy's sockets sees end of file (the proxy closed its
    side), then is closed."""
    for peer in peers:
        peer.settimeout(60)
        assert peer.recv(10) == b""
        peer.close()


def test_relay_at_the_thread_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """When no worker thread can start (RLIMIT_NPROC, pid_max, pids.max),
    relay() raises RuntimeError, closes its ends, and the pool goes on."""
    with fastpipe.WorkerPool() as pool:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        at_the_thread_limit(monkeypatch)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.relay(r1, w2)
        monkeypatch.undo()
        # close=True closed both ends: the peers see it.
        with pytest.raises(BrokenPipeError):
            os.write(w1, b"x")
        assert os.read(r2, 10) == b""
        for fd in (w1, r2):
            os.close(fd)
        assert pool.stats()["workers"] == 0, pool.stats()

        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        os.write(w1, b"after the failure")
        os.close(w1)
        assert pool.relay(r1, w2).result(timeout=60) == 17
        assert _read_all(r2) == b"after the failure"
        os.close(r2)
        assert pool.stats()["workers"] == 1, pool.stats()


def test_proxy_at_the_thread_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first direction's worker starts, the second's cannot: proxy()
    raises, the first direction stops, and both sockets are closed."""
    with fastpipe.WorkerPool() as pool:
        a, a_peer = socket.socketpair()
        b, b_peer = socket.socketpair()
        at_the_thread_limit(monkeypatch, workers_left=1)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.proxy(a, b)
        monkeypatch.undo()
        # Both of the proxy's sockets end up closed: their peers see end of file.
        see_end_and_close(a_peer, b_peer)
        deadline = time.monotonic() + 60
        while (a.fileno() != -1 or b.fileno() != -1) and time.monotonic() < deadline:
            time.sleep(0.01)  # closed by the completer, through close()
        assert a.fileno() == -1 and b.fileno() == -1, (a, b)
        assert pool.stats()["busy"] == 0, pool.stats()


def test_shutdown_inside_a_failing_thread_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """shutdown() can run while a new worker's thread is being started (here
    from inside Thread.start, which then fails): the worker whose thread
    never ran must be counted out once, or the pool's count of workers
    never reaches zero and shutdown(wait=True) waits for ever."""
    pool = fastpipe.WorkerPool(max_workers=2)
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    real_start = threading.Thread.start
    starts = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("fastpipe-worker"):
            starts.append(self.name)
            pool.shutdown(wait=False, cancel_relays=True)
            raise RuntimeError("can't start new thread")
        real_start(self)

    try:
        monkeypatch.setattr(threading.Thread, "start", start)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.proxy(a, b)
        monkeypatch.undo()
        assert len(starts) == 1
        assert_shuts_down(pool)
        assert pool.stats()["workers"] == 0, pool.stats()
        see_end_and_close(a_peer, b_peer)
        assert a.fileno() == -1 and b.fileno() == -1
    finally:
        monkeypatch.undo()
        pool.shutdown(wait=False, cancel_relays=True)
        for sock in (a, b, a_peer, b_peer):
            sock.close()


def assert_shuts_down(pool: fastpipe.WorkerPool) -> None:
    """shutdown(wait=True) returns: the pool counted its workers right (a
    worker counted out twice, or never, leaves the completer waiting)."""
    waiter = threading.Thread(target=pool.shutdown, daemon=True)
    waiter.start()
    waiter.join(30)
    assert not waiter.is_alive(), f"shutdown(wait=True) hangs: {pool.stats()}"


def interrupted_after_the_thread_starts(
    monkeypatch: pytest.MonkeyPatch, pool: fastpipe.WorkerPool, *, thread_first: bool, skip: int = 0
) -> threading.Event:
    """Ctrl-C lands in ``Thread.start()``'s wait for a worker (after ``skip``
    that start normally), once its thread is running.

    ``thread_first``: the thread has taken up its job before the exception
    reaches the pool; else the thread is held back until the returned event
    is set, and the pool's clean-up comes first.
    """
    real_start = threading.Thread.start
    gate = threading.Event()
    left = [skip]

    def start(self: threading.Thread) -> None:
        if not self.name.startswith("fastpipe-worker") or left[0] < 0:
            real_start(self)
            return
        if left[0]:
            left[0] -= 1
            real_start(self)
            return
        left[0] = -1
        if thread_first:
            real_start(self)
            # Its relay's copy has begun (so its thread has its worker).
            wait_for(lambda: any(t.relay.running() for t in pool._live))
        else:
            body = self._target  # type: ignore[attr-defined]
            self._target = lambda *args: (gate.wait(60), body(*args))  # type: ignore[attr-defined]
            real_start(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)
    return gate


@pytest.mark.parametrize("thread_first", [True, False], ids=["thread-first", "cleanup-first"])
def test_ctrl_c_in_a_worker_thread_start_after_it_started(
    monkeypatch: pytest.MonkeyPatch, thread_first: bool
) -> None:
    """Ctrl-C can land in Thread.start()'s wait once the new worker thread
    runs: relay() raises it, and the relay does not go on unseen (nobody
    holds its future): it is stopped and its ends are closed, whichever of
    the thread and the clean-up takes the worker first.  The compiled core
    crashed here (SIGSEGV in abandon(): the thread had taken the worker)."""
    pool = fastpipe.WorkerPool()
    try:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        try:
            gate = interrupted_after_the_thread_starts(monkeypatch, pool, thread_first=thread_first)
            with pytest.raises(KeyboardInterrupt):
                pool.relay(r1, w2)
            monkeypatch.undo()
            gate.set()
            wait_for(lambda: pool.stats()["busy"] == 0)
            # close=True: both ends closed, seen by their peers.
            assert _read_all(r2) == b""
            with pytest.raises(BrokenPipeError):
                os.write(w1, b"x")
        finally:
            # Ours; closing them also ends a relay that went on unseen.
            os.close(w1)
            os.close(r2)
        # The worker stays when its thread ran the job, not when it never did.
        wait_for(lambda: pool.stats()["workers"] == (1 if thread_first else 0))
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        os.write(w1, b"after the interrupt")
        os.close(w1)
        assert pool.relay(r1, w2).result(timeout=60) == 19
        assert _read_all(r2) == b"after the interrupt"
        os.close(r2)
        assert_shuts_down(pool)
    finally:
        pool.shutdown(wait=False, cancel_relays=True)


def test_ctrl_c_in_a_proxy_second_worker_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for a proxy's second worker: both directions stop, both
    sockets are closed, no worker stays busy."""
    pool = fastpipe.WorkerPool()
    try:
        a, a_peer = socket.socketpair()
        b, b_peer = socket.socketpair()
        interrupted_after_the_thread_starts(monkeypatch, pool, thread_first=True, skip=1)
        with pytest.raises(KeyboardInterrupt):
            pool.proxy(a, b)
        monkeypatch.undo()
        wait_for(lambda: pool.stats()["busy"] == 0)
        wait_for(lambda: a.fileno() == -1 and b.fileno() == -1)
        see_end_and_close(a_peer, b_peer)
        assert_shuts_down(pool)
    finally:
        # Closing the peers also ends a proxy that went on unseen.
        a_peer.close()
        b_peer.close()
        pool.shutdown(wait=False, cancel_relays=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "soak":
        out = _soak_child(int(sys.argv[2]), int(sys.argv[3]))
    elif mode == "scale":
        out = _scale_child(*(int(arg) for arg in sys.argv[2:4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out))
