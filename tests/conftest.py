"""Fixtures: endpoints of every fd kind, and the leak checks run after each test."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import fastpipe
from fastpipe import _impl

KINDS = ["file", "pipe", "unix", "tcp"]

# How long the leak checks below give a relay ending in another thread (one
# that a failed test left running, or whose completion is still on its way):
# long enough for a busy machine, where a thread may wait a while to run.
SETTLE = 10.0


@pytest.fixture(autouse=True)
def no_fd_leaked() -> Iterator[None]:
    """Every test must close every fd it, or a relay it started, opened.

    Idle pooled pipes are the pool's, not a leak: they are closed before
    both counts.
    """
    fastpipe.trim_pipes()
    before = open_fds()
    yield
    deadline = time.monotonic() + SETTLE
    while True:
        fastpipe.trim_pipes()
        if not open_fds() - before or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    leaked = open_fds() - before
    details = {fd: _describe_fd(fd) for fd in leaked}
    assert not leaked, f"fds left open: {details}"


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture(autouse=True)
def no_buffer_left_in_use() -> Iterator[None]:
    """Every test must give back every pooled buffer it took."""
    yield
    # A relay completes its future only after its buffers are back, but a
    # test that failed half-way may leave one finishing: give it a moment.
    deadline = time.monotonic() + SETTLE
    while fastpipe.buffer_stats()["in_use"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fastpipe.buffer_stats()["in_use"] == 0, fastpipe.buffer_stats()


@pytest.fixture(autouse=True)
def no_pipe_left_in_use() -> Iterator[None]:
    """Every copy must give its intermediate pipe back (or close it)."""
    yield
    deadline = time.monotonic() + SETTLE
    while fastpipe.pipe_stats()["in_use"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fastpipe.pipe_stats()["in_use"] == 0, fastpipe.pipe_stats()


def tcp_pair(
    *, client_rcvbuf: int | None = None, server_rcvbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    """A connected TCP loopback pair (client, server side).

    A receive buffer size is set before the connection is made: TCP settles
    its window scale in the handshake, so a later SO_RCVBUF cannot shrink it.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if server_rcvbuf is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, server_rcvbuf)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if client_rcvbuf is not None:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
            client.connect(listener.getsockname())
            server, _ = listener.accept()
        except BaseException:
            client.close()
            raise
    return client, server


def socket_pair(
    kind: str, *, first_rcvbuf: int | None = None, second_rcvbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    """A connected stream pair of ``kind`` ("unix" or "tcp"), receive buffers as asked."""
    if kind == "unix":
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock, size in zip(pair, (first_rcvbuf, second_rcvbuf), strict=True):
            if size is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        return pair
    return tcp_pair(client_rcvbuf=first_rcvbuf, server_rcvbuf=second_rcvbuf)


class _OwnedFd:
    """An fd the fixture closes at teardown, unless the test closed or gave it away.

    Closing a number twice is a real bug, not a tidiness issue: by the second
    close the number may belong to someone else.
    """

    fd: int
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def disown(self) -> int:
        """The code under test closes the fd now (relay's close=True)."""
        self.closed = True
        return self.fd


@dataclass
class Source(_OwnedFd):
    """A readable fd for the code under test, fed with ``data`` by a helper."""

    fd: int
    data: bytes
    keep: list[object] = field(default_factory=list)
    feeder: threading.Thread | None = None

    def leftover(self) -> bytes:
        """Read what the code under test left in the source."""
        chunks = []
        os.set_blocking(self.fd, True)
        while chunk := os.read(self.fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)


@dataclass
class Sink(_OwnedFd):
    """A writable fd for the code under test; ``received()`` is what arrived."""

    fd: int
    read_back: Callable[[], bytes]
    keep: list[object] = field(default_factory=list)

    def received(self) -> bytes:
        """What arrived; for a stream, closes our fd first so the reader sees EOF."""
        self.close()
        return self.read_back()


# How a feeder writes: (piece size, pause after it) in turn; after the last
# piece the rest goes in 64 KiB writes without pauses.
Pieces = Sequence[tuple[int, float]]


def _feed_in_thread(
    write: Callable[[memoryview], object],
    data: bytes,
    done: Callable[[], None],
    pieces: Pieces = (),
) -> threading.Thread:
    def write_all(view: memoryview) -> None:
        while view:
            n = write(view)
            view = view[n:] if isinstance(n, int) else view[len(view) :]

    def run() -> None:
        try:
            view = memoryview(data)
            for size, pause in pieces:
                write_all(view[:size])
                view = view[size:]
                if pause:
                    time.sleep(pause)  # a slow producer, not synchronisation
            while view:
                write_all(view[: 1 << 16])
                view = view[1 << 16 :]
        except (BrokenPipeError, ConnectionResetError):
            pass  # the test closed its end early on purpose
        finally:
            done()

    return threading.Thread(target=run, daemon=True)


class Endpoints:
    """Builds sources and sinks of each kind and tears all of them down."""

    def __init__(self, tmp_path: str) -> None:
        self.tmp_path = tmp_path
        self._cleanup: list[Callable[[], None]] = []
        self._owned: list[_OwnedFd] = []
        self._threads: list[threading.Thread] = []

    def _close_later(self, fd_or_obj: object) -> None:
        def close() -> None:
            with contextlib.suppress(OSError):
                if isinstance(fd_or_obj, int):
                    os.close(fd_or_obj)
                else:
                    fd_or_obj.close()  # type: ignore[attr-defined]

        self._cleanup.append(close)

    def source(
        self,
        kind: str,
        data: bytes,
        *,
        nonblocking: bool = False,
        pieces: Pieces = (),
        rcvbuf: int | None = None,
    ) -> Source:
        """A readable fd of ``kind`` that yields ``data`` then end of file.

        A pipe or socket is fed by a thread, in ``pieces`` first (see
        ``Pieces``); ``rcvbuf`` is the receive buffer of a socket source.
        """
        if kind == "file":
            fd_, path = tempfile.mkstemp(dir=self.tmp_path)
            with os.fdopen(fd_, "wb") as f:
                f.write(data)
            src = Source(os.open(path, os.O_RDONLY), data)
        elif kind == "pipe":
            r, w = os.pipe()
            src = Source(r, data)
            t = _feed_in_thread(lambda b: os.write(w, b), data, lambda: os.close(w), pieces)
            src.feeder = t
        else:
            a, b = socket_pair(kind, first_rcvbuf=rcvbuf)
            self._close_later(b)
            fd = a.detach()

            def done(b: socket.socket = b) -> None:
                with contextlib.suppress(OSError):
                    b.shutdown(socket.SHUT_WR)

            src = Source(fd, data, keep=[b])
            src.feeder = _feed_in_thread(b.send, data, done, pieces)
        self._owned.append(src)
        if nonblocking:
            os.set_blocking(src.fd, False)
        if src.feeder is not None:
            self._threads.append(src.feeder)
            src.feeder.start()
        return src

    def sink(self, kind: str, *, nonblocking: bool = False, rcvbuf: int | None = None) -> Sink:
        """A writable fd of ``kind``; ``rcvbuf`` is the reading socket's buffer."""
        if kind == "file":
            fd_, path = tempfile.mkstemp(dir=self.tmp_path)

            def read_back() -> bytes:
                with open(path, "rb") as f:
                    return f.read()

            sink = Sink(fd_, read_back)
        else:
            chunks: list[bytes] = []
            if kind == "pipe":
                r, w = os.pipe()
                fd, reader = w, (lambda: os.read(r, 1 << 20))
                self._close_later(r)
            else:
                a, b = socket_pair(kind, second_rcvbuf=rcvbuf)
                self._close_later(b)
                fd, reader = a.detach(), (lambda: b.recv(1 << 20))

            def drain() -> None:
                while chunk := reader():
                    chunks.append(chunk)

            t = threading.Thread(target=drain, daemon=True)
            self._threads.append(t)
            t.start()

            def read_back_stream() -> bytes:
                # The caller must have closed (or let relay close) the fd
                # for the drainer to see end of file.
                t.join(30)
                assert not t.is_alive(), "the sink never saw end of file"
                return b"".join(chunks)

            sink = Sink(fd, read_back_stream)
        self._owned.append(sink)
        if nonblocking:
            os.set_blocking(sink.fd, False)
        return sink

    def close(self) -> None:
        # The test's own ends first: that is the end of file the feeder and
        # drainer threads wait for.  Their ends only once they are done.
        for owned in self._owned:
            with contextlib.suppress(OSError):
                owned.close()
        for t in self._threads:
            t.join(10)
        for close in reversed(self._cleanup):
            with contextlib.suppress(OSError):
                close()


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt during the test.

    Python leaves SIGINT ignored when it starts with it ignored, as a
    background job of a shell without job control does; the tests that send
    themselves SIGINT turn the default handler on for their duration.
    """
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.fixture
def endpoints(tmp_path: os.PathLike[str]) -> Iterator[Endpoints]:
    eps = Endpoints(str(tmp_path))
    yield eps
    eps.close()


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def exit_code_in_child(body: Callable[[], bool]) -> int:
    """Run ``body`` in a forked child and return the child's exit code: 0 if
    it returned True, 2 if False, 1 if it raised.  The child reports through
    that code only (it never returns into pytest)."""
    with warnings.catch_warnings():
        # 3.12+ warns that forking a threaded process may deadlock the
        # child: exactly what the at-fork resets are there to prevent.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = 0 if body() else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Wait until ``predicate()`` is true; fail the test after ``timeout`` seconds.

    The conditions waited for come true in milliseconds; the timeout only
    says how long a broken one takes to fail, so it is long enough for any
    machine, however busy.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# futex(2): where a thread waits for a lock (the GIL, a semaphore), not for
# an fd.  Per architecture; elsewhere any syscall counts as blocked.
_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())


def blocked_in_syscall(tid: int) -> bool:
    """Whether thread ``tid`` of this process sleeps in a syscall other than
    futex: a poll, a read, a write, a splice...

    Asleep (state S in ``/proc/self/task/TID/stat``), not merely inside a
    syscall: a thread that the scheduler preempted there is still running
    it.  ``/proc/self/task/TID/syscall`` names the call.
    """
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/self/task/{tid}/syscall") as f:
            first = f.read().split(maxsplit=1)[0]
    except (OSError, IndexError):
        return False
    if state != "S" or not first.isdigit():
        return False  # running, or "-1": not in a syscall
    return int(first) != _FUTEX


def wait_until_blocked(*threads: threading.Thread | int, timeout: float = 30.0) -> None:
    """Wait until one of ``threads`` (or native thread ids) blocks in a
    syscall: a copy parked on an idle or full fd.

    For tests that act on a parked copy (cancel it, count its CPU time).
    What they check holds whenever they act; this makes them act on the
    parked state they are about, on a machine of any speed.
    """
    tids = [t if isinstance(t, int) else t.native_id for t in threads]
    wait_for(lambda: any(tid is not None and blocked_in_syscall(tid) for tid in tids), timeout)


def pool_workers(pool: object | None = None) -> list[threading.Thread]:
    """The worker threads of ``pool`` (default: of every pool)."""
    threads = threading.enumerate() if pool is None else list(pool._threads)  # type: ignore[attr-defined]
    return [t for t in threads if t.name.startswith("fastpipe-worker-")]


def wait_until_a_worker_blocks(pool: object | None = None, timeout: float = 30.0) -> None:
    """Wait until a worker of ``pool`` (default: of any pool) is parked in a
    syscall, as a relay on an idle or full fd is (see ``wait_until_blocked``).
    Idle workers wait on a semaphore (futex), which does not count."""
    wait_for(
        lambda: any(
            t.native_id is not None and blocked_in_syscall(t.native_id) for t in pool_workers(pool)
        ),
        timeout,
    )


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def run_job(
    src: int, dst: int, count: int | None = None, zerocopy: bool = True
) -> tuple[int, str | None]:
    """copy_fd, but also returns the path that was used."""
    job = _impl.CopyJob(src, dst, count, zerocopy=zerocopy)
    n = job.run()
    return n, job.method


def write_all(fd: int, data: bytes, close: bool = False) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]
    finally:
        if close:
            os.close(fd)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def open_fds() -> set[int]:
    """The process's open fds, less the pools' own (each pool's poller: its
    epoll set and eventfd, made when a relay first parks and kept while the
    pool has workers)."""
    from fastpipe import _pool

    own = {fd for pool in list(_pool._live_pools) for fd in pool._core.poller_fds()}
    # The listing's own fd is closed by the time it returns (and its number
    # moves with whatever else is open): only fds still open count.
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)} - own


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


compiled_only = pytest.mark.skipif(
    fastpipe.IMPLEMENTATION != "c", reason="needs the compiled core (GIL-free loop)"
)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """``python -m http.server`` serving a 3 MiB random file; yields (port, data)."""
    data = os.urandom(3 * 1024 * 1024 + 12345)
    (tmp_path / "blob.bin").write_bytes(data)
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...) ..."
        yield int(line.split(" port ")[1].split()[0]), data
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def poller_at_rest() -> Iterator[None]:
    """The pools' pollers wake only for their fds: no periodic look for fds
    closed under parked relays (a pool made in the test keeps this)."""
    _impl._set_sweep_interval(3600.0)
    try:
        yield
    finally:
        _impl._set_sweep_interval(1.0)


class HeldWriter(io.BufferedIOBase):
    """A sink whose ``flush()`` waits until ``release()``.

    A relay into it keeps its worker busy in the prologue, where the worker
    flushes a buffered writer before the copy: the one deterministic way to
    hold a worker, since a relay that merely waits for bytes is parked and
    holds none.  ``flushing`` is set once a worker is inside the flush.
    """

    def __init__(self) -> None:
        super().__init__()
        self._r, self._w = os.pipe()
        self.gate = threading.Event()
        self.flushing = threading.Event()

    def fileno(self) -> int:
        return self._w

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        if not self.gate.is_set():
            self.flushing.set()
            self.gate.wait()

    def release(self) -> None:
        self.gate.set()

    def close(self) -> None:
        if not self.closed:
            self.gate.set()
            super().close()
            os.close(self._w)
            os.close(self._r)


def held_relay(pool: fastpipe.WorkerPool) -> tuple[fastpipe.Relay[int], HeldWriter]:
    """A relay that holds a worker until ``held.release()``; its source is at
    end of file, so it then ends at once with 0 and closes both ends."""
    held = HeldWriter()
    return pool.relay(os.open(os.devnull, os.O_RDONLY), held), held
