"""The pure-Python twin's own mechanisms, where they differ from the core's.

The twin (``_core_py.py``) mirrors the compiled core name for name and
section for section; these tests hold it to that, and check what it does in
the places where it must work differently: socket objects over the caller's
fds, the send timeout on a sendfile or splice into a blocking socket (the
core's stall alarm), a copy that epoll refuses, and two copies waiting on
one fd.
The promises behind the last three are the contract's, so those run on both
twins.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastpipe
from fastpipe import _core_py

from conftest import close_quietly, read_all, wait_for, write_all

CORE = Path(fastpipe.__file__).parent / "core"
twin_only = pytest.mark.skipif(
    fastpipe.IMPLEMENTATION != "py", reason="the pure-Python twin's own mechanism"
)

# Names of core/*.pxi that the twin has no use for, each for a reason its
# code says where the name would be.
NOT_IN_TWIN = {
    # Enums become groups of int constants; the free-list is a list.
    "Method", "FdKind", "Step", "JobState", "FreeBuf",
    # Lists and sets instead of intrusive links and C arrays.
    "_pipe_unlink_all", "_reversed", "_heap_reserve", "_count_worker",
    # Per-thread timer signals: no Python thread can take one (_arm_stall
    # and _choose_kernel_path say what the twin does instead).
    "_arm_idle_alarm", "_disarm_idle_alarm", "_sink_stalled", "_src_has_bytes",
    # The GIL and OS-level thread names.
    "_lock_with_gil", "name_this_thread",
}  # fmt: skip


def _core_names() -> list[tuple[str, str]]:
    """(file, name) of every function, method, struct and class of the core."""
    found = []
    for path in sorted(CORE.glob("*.pxi")):
        text = path.read_text()
        for name in re.findall(
            r"^\s*(?:cdef|def)\s+(?:inline\s+)?(?:[\w*]+\s+\**)*?(_?[a-z]\w*)\s*\(", text, re.M
        ):
            found.append((path.name, name))
        for name in re.findall(r"^cdef (?:struct|class|enum) (\w+)", text, re.M):
            found.append((path.name, name))
    return found


@pytest.mark.skipif(not CORE.is_dir(), reason="the core's sources are not here (an installed copy)")
def test_the_twin_has_the_cores_names() -> None:
    """Every function, method and type of the core has its namesake in the
    twin (at module level, or on CopyJob or PoolCore), but the few listed in
    NOT_IN_TWIN; and the twin's sections come in the core's include order."""
    missing = []
    for pxi, name in _core_names():
        if name in NOT_IN_TWIN or name.startswith("pthread_") or name in ("memset", "fstat"):
            continue  # libc names called in the core
        if name in ("clock_gettime", "__cinit__", "__dealloc__"):
            continue
        places = (_core_py, _core_py.CopyJob, _core_py.PoolCore)
        if not any(hasattr(where, name) for where in places):
            missing.append(f"{pxi}: {name}")
    assert not missing, missing
    source = Path(_core_py.__file__).read_text()
    headings = re.findall(r"^# -{8,} (.+)$", source, re.M)
    assert headings == [
        "constants",
        "buffers",
        "pipes",
        "copy state, waits",
        "poller",
        "kernel step",
        "read/write step",
        "path choice",
        "checks",
        "CopyJob",
        "pool core",
    ]


def test_a_socket_object_over_a_callers_fd_never_closes_it() -> None:
    """The twin reads and writes a socket through an object over the
    caller's fd; dropped without detach (after a fork, say), a plain socket
    object would close the fd.  Its flags are left as they were, even under
    a default timeout."""
    a, b = socket.socketpair()
    try:
        view = _core_py._socket_over(a.fileno())
        del view
        gc.collect()
        os.fstat(a.fileno())  # still open
        socket.setdefaulttimeout(5.0)
        try:
            view = _core_py._socket_over(a.fileno())
        finally:
            socket.setdefaulttimeout(None)
        assert a.getblocking(), "the caller's blocking fd became non-blocking"
        view.detach()
    finally:
        a.close()
        b.close()


@pytest.fixture
def stalled_unix_sink() -> Iterator[tuple[int, socket.socket]]:
    """A blocking unix socket (the relay's fd) whose peer reads nothing."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    fd = a.detach()
    try:
        yield fd, b
    finally:
        close_quietly(fd)
        b.close()


@pytest.mark.parametrize("path", ["sendfile", "splice"])
def test_a_kernel_path_into_a_stalled_blocking_socket_parks(
    tmp_path: Path, stalled_unix_sink: tuple[int, socket.socket], path: str
) -> None:
    """sendfile and splice ignore every per-call non-blocking flag on a
    blocking socket.  The core interrupts a call that stalls with its stall
    alarm, the twin with the socket's send timeout, and either parks the
    relay.  So it holds no thread while the peer reads nothing, it leaves the
    socket's own send timeout as it was, a cancel stops it at once, and
    every byte counted is at the peer."""
    fd, peer = stalled_unix_sink
    data = os.urandom(8 << 20)
    feeder = None
    if path == "sendfile":
        src_path = tmp_path / "src"
        src_path.write_bytes(data)
        src = os.open(src_path, os.O_RDONLY)
    else:
        src, w = os.pipe()
        feeder = threading.Thread(target=_feed_quietly, args=(w, data), daemon=True)
        feeder.start()
    with fastpipe.WorkerPool() as pool:
        relay = pool.relay(src, fd, close=False)
        try:
            wait_for(lambda: pool.stats()["parked"] == 1 and pool.stats()["busy"] == 0)
            with socket.socket(fileno=os.dup(fd)) as same:
                timeout = same.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)
            assert timeout == bytes(16), "the socket's send timeout was left changed"
            assert relay.method == path
            assert 0 < relay.bytes_copied < len(data)
            t0 = time.monotonic()
            assert relay.cancel()
            assert time.monotonic() - t0 < 5
            assert relay.cancelled()
        finally:
            relay.cancel()
            os.close(src)
            if feeder is not None:
                feeder.join(10)
    os.close(fd)
    got = read_all(peer.fileno())
    assert got == data[: relay.bytes_copied]


def _feed_quietly(fd: int, data: bytes) -> None:
    try:
        write_all(fd, data)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def test_two_relays_reading_one_fd_both_end() -> None:
    """Two copies waiting to read one fd: the poller's table has one slot per
    fd, so the second waits for it in its worker's thread instead (EBUSY in
    the poller).  Every byte arrives at one sink or the other, once, and both
    relays end at end of file."""
    r, w = os.pipe()
    sinks = [os.pipe() for _ in range(2)]
    got: list[bytes] = [b"", b""]

    def drain(i: int) -> None:
        got[i] = read_all(sinks[i][0])

    readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(2)]
    for t in readers:
        t.start()
    try:
        with fastpipe.WorkerPool() as pool:
            relays = [pool.relay(r, sinks[i][1], close=False) for i in range(2)]
            wait_for(lambda: pool.stats()["parked"] == 1)
            data = os.urandom(1 << 20)
            write_all(w, data, close=True)
            counts = [relay.result(timeout=30) for relay in relays]
    finally:
        os.close(r)
        for _, sink_w in sinks:
            os.close(sink_w)
    for t in readers:
        t.join(30)
    for sink_r, _ in sinks:
        os.close(sink_r)
    assert sum(counts) == len(data)
    assert [len(g) for g in got] == counts


def test_a_relay_from_a_tty_parks_like_a_pipe() -> None:
    """A tty has no per-call non-blocking read: the copy polls it first,
    and in a pool that poll is a park, holding no thread and no buffer."""
    master, slave = os.openpty()
    tty.setraw(slave)  # bytes as written, no line editing
    r, w = os.pipe()
    try:
        with fastpipe.WorkerPool() as pool:
            relay = pool.relay(master, w, close=False)
            wait_for(lambda: pool.stats()["parked"] == 1)
            assert pool.stats()["busy"] == 0
            assert fastpipe.buffer_stats()["in_use"] == 0
            os.write(slave, b"typed")
            assert os.read(r, 100) == b"typed"
            wait_for(lambda: pool.stats()["parked"] == 1)
            assert relay.cancel()
            assert relay.cancelled()
            assert relay.bytes_copied == 5
    finally:
        for fd in (master, slave, r, w):
            os.close(fd)


@twin_only
def test_a_copy_that_epoll_refuses_waits_in_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """EPERM from epoll (a device without poll support, say): the copy waits
    in its worker's thread, as copy_fd would, with cancel's eventfd beside
    its fd; the pool counts it busy, not parked."""

    def refuse(p: object, st: object) -> int:
        return _core_py.EPERM

    monkeypatch.setattr(_core_py, "_poller_arm", refuse)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    try:
        with fastpipe.WorkerPool() as pool:
            relay = pool.relay(src_r, dst_w, close=False)
            os.write(src_w, b"first")
            assert os.read(dst_r, 100) == b"first"
            # Its wait in the thread polls the eventfd made for it.
            (job,) = relay._jobs
            wait_for(lambda: job.st.wake_fd >= 0)
            assert pool.stats()["parked"] == 0 and pool.stats()["busy"] == 1
            assert relay.cancel()
            assert relay.cancelled()
            assert relay.bytes_copied == 5
    finally:
        for fd in (src_r, src_w, dst_r, dst_w):
            os.close(fd)
