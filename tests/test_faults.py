"""Fault injection: each failure on every copy path it can reach.

The paths: read/write (``zerocopy=False``), splice with a pipe end, splice
between two non-pipes through a pooled pipe (socket -> socket, socket ->
file), sendfile (file -> socket) and copy_file_range (file -> file).  Every
case checks ``Relay.method`` (or the job's), so the parametrisation really
covers the path it names.

The faults: ENOSPC (/dev/full, a 1 MiB tmpfs of our own), EPIPE (a reader
that closes, a reader process killed), ECONNRESET (a TCP peer closing with
SO_LINGER (1, 0)), EINTR storms (also with idle_timeout, and a handler that
raises), a stalled blocking socket sink under idle_timeout, and fds closed by
someone else.  Each case runs as copy_fd in the main thread and as relay()
with close=True and close=False where that matters.  Each failure must be a
clear ``OSError`` with its errno, within a timeout; the ends are closed as
``close=`` says; conftest's autouse fixtures check afterwards that every
buffer and pipe is back in its pool and no fd leaked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import fastpipe
from fastpipe import _impl

from conftest import (
    Endpoints,
    Sink,
    Source,
    read_all,
    recv_all,
    run_job,
    socket_pair,
    write_all,
)

TIMEOUT = 60  # for result(): a hang fails the test, a slow machine does not


@pytest.fixture(autouse=True)
def splice_at_once() -> Iterator[None]:
    """A socket source splices from the first byte.

    Normally it starts with read/write and moves to splice after a large
    read; here the fault must hit the splice path, whatever the timing.
    """
    old = _impl._set_splice_min_read(0)
    try:
        yield
    finally:
        _impl._set_splice_min_read(old)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll a condition that no event reports (a counter, another process)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def assert_closed_as_said(close: bool, *fds: int) -> None:
    """close=True: the relay closed the fd (EBADF); close=False: still open.

    Nothing in these tests opens an fd between the relay's end and this
    check, so a closed number cannot have been reused yet.
    """
    for fd in fds:
        if close:
            with pytest.raises(OSError) as info:
                os.fstat(fd)
            assert info.value.errno == errno.EBADF
        else:
            os.fstat(fd)


def hand_over(end: Source | Sink, close: bool) -> int:
    """The fd to give the relay: with close=True the relay owns it now."""
    return end.disown() if close else end.fd


def assert_peer_gone(exc: BaseException | None, sink_kind: str) -> None:
    """The error of a write to a sink whose reader is gone.

    A pipe says EPIPE.  A socket whose peer closed with unread bytes in its
    receive queue gets ECONNRESET as its pending error (a unix socket as
    much as a TCP one, which also gets a RST): the next send reports that,
    later ones EPIPE.  A sendfile or splice that had moved some bytes when
    the error came returns that count, and the ECONNRESET that its inner
    sendmsg took is gone: the relay's next call says EPIPE.
    """
    if sink_kind == "pipe":
        assert isinstance(exc, BrokenPipeError), exc
    else:
        assert isinstance(exc, (BrokenPipeError, ConnectionResetError)), exc
    assert exc.errno == (errno.EPIPE if isinstance(exc, BrokenPipeError) else errno.ECONNRESET)


class Far:
    """A stream whose one end (``fd``, an int) goes to the relay; the test
    holds the other (a pipe end or a socket) to read, write, close or reset."""

    def __init__(self, kind: str, *, relay_reads: bool, small: bool = False) -> None:
        self.sock: socket.socket | None = None
        self.far_fd = -1
        if kind == "pipe":
            r, w = os.pipe()
            self.fd, self.far_fd = (r, w) if relay_reads else (w, r)
        else:
            a, b = socket_pair(kind)
            if small:  # 16 KiB socket buffers: far less than one kernel chunk
                a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            self.fd = a.detach()
            self.sock = b
        self.relay_owns = False

    def give(self, close: bool) -> int:
        self.relay_owns = close
        return self.fd

    def read_exactly(self, n: int) -> bytes:
        chunks = []
        while n:
            if self.sock is not None:
                chunk = self.sock.recv(min(n, 1 << 20))
            else:
                chunk = os.read(self.far_fd, min(n, 1 << 20))
            assert chunk, "end of file before the bytes the test waits for"
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def read_rest(self) -> bytes:
        """Everything up to end of file."""
        return recv_all(self.sock) if self.sock is not None else read_all(self.far_fd)

    def unread(self) -> int:
        """Bytes waiting in the far end (FIONREAD)."""
        fd = self.sock.fileno() if self.sock is not None else self.far_fd
        buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(buf, sys.byteorder)

    def write(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            write_all(self.far_fd, data)

    def close_far(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.far_fd >= 0:
            fd, self.far_fd = self.far_fd, -1
            os.close(fd)

    def reset(self) -> None:
        """Close with SO_LINGER (1, 0): the peer gets a RST, not a FIN."""
        assert self.sock is not None
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        self.sock.close()

    def close(self) -> None:
        self.close_far()
        if not self.relay_owns:
            self.relay_owns = True
            os.close(self.fd)


@pytest.fixture
def fars() -> Iterator[list[Far]]:
    made: list[Far] = []
    yield made
    for far in made:
        with contextlib.suppress(OSError):
            far.close()


# How each case runs: copy_fd in the main thread (the fault comes from
# another thread), or relay() with close=True or close=False.
MODES = ["copy_fd", "relay-close", "relay-keep"]


@dataclass
class Outcome:
    exc: BaseException | None
    result: int | None
    method: str | None
    bytes_copied: int


def run_mode(
    mode: str,
    src_fd: int,
    dst_fd: int,
    zerocopy: bool,
    actor: Callable[[Callable[[], int]], None] | None = None,
) -> Outcome:
    """Run the copy as ``mode`` says while ``actor(bytes_copied)`` injects the
    fault in another thread.  The actor must inject it even when it fails
    (in a ``finally``): copy_fd in the main thread has no timeout."""
    errors: list[BaseException] = []

    def act(progress: Callable[[], int]) -> None:
        try:
            if actor is not None:
                actor(progress)
        except BaseException as exc:  # noqa: B036 - re-raised in the test
            errors.append(exc)

    if mode == "copy_fd":
        job = _impl.CopyJob(src_fd, dst_fd, zerocopy=zerocopy)
        t = threading.Thread(target=act, args=(lambda: job.bytes_copied,))
        t.start()
        exc: BaseException | None = None
        n = None
        try:
            n = job.run()
        except OSError as e:
            exc = e
        finally:
            t.join(TIMEOUT)
        outcome = Outcome(exc, n, job.method, job.bytes_copied)
    else:
        relay = fastpipe.relay(src_fd, dst_fd, close=mode == "relay-close", zerocopy=zerocopy)
        t = threading.Thread(target=act, args=(lambda: relay.bytes_copied,))
        t.start()
        try:
            exc = relay.exception(timeout=TIMEOUT)
        finally:
            t.join(TIMEOUT)
        n = None if exc is not None else relay.result()
        outcome = Outcome(exc, n, relay.method, relay.bytes_copied)
    assert not t.is_alive(), "the fault injector hangs"
    if errors:
        raise errors[0]
    return outcome


# --------------------------------------------------------------------- ENOSPC


@pytest.mark.parametrize("mode", MODES)
def test_dev_full_is_enospc_on_read_write(endpoints: Endpoints, mode: str) -> None:
    """/dev/full is a char device: always the read/write loop."""
    data = os.urandom(300_000)
    src = endpoints.source("file", data)
    full = os.open("/dev/full", os.O_WRONLY)
    close = mode == "relay-close"
    try:
        out = run_mode(mode, hand_over(src, close), full, True)
        assert isinstance(out.exc, OSError) and out.exc.errno == errno.ENOSPC, out.exc
        assert out.method == "readwrite"
        assert out.bytes_copied == 0
        assert_closed_as_said(close, src.fd, full)
    finally:
        if not close:
            os.close(full)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of our own, so that a kernel path can run out of space.

    Needs root (or CAP_SYS_ADMIN); skipped cleanly where mount is refused.
    """
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "fastpipe-tiny", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def over_paths(
    argnames: tuple[str, ...], table: list[tuple[Any, ...]], without: str | None = None
) -> pytest.MarkDecorator:
    """Parametrize over a table of (id, *args) rows, minus the row ``without``."""
    rows = [row for row in table if row[0] != without]
    args = [row[1:] for row in rows]
    return pytest.mark.parametrize(argnames, args, ids=[row[0] for row in rows])


# (id, source kind, zerocopy, the path that must hit ENOSPC)
ENOSPC_PATHS = [
    ("readwrite", "file", False, "readwrite"),
    ("copy_file_range", "tmpfs", True, "copy_file_range"),
    ("splice-pooled-pipe", "pipe", True, "splice"),
    ("splice-pooled-socket", "tcp", True, "splice"),
]


@pytest.mark.parametrize("mode", MODES)
@over_paths(("src_kind", "zerocopy", "method"), ENOSPC_PATHS)
def test_a_full_filesystem_is_enospc_on_every_path(
    tiny_tmpfs: Path,
    endpoints: Endpoints,
    src_kind: str,
    zerocopy: bool,
    method: str,
    mode: str,
) -> None:
    out_path = tiny_tmpfs / "out"
    close = mode == "relay-close"
    if src_kind == "tmpfs":
        # copy_file_range across filesystems may be EXDEV (then sendfile):
        # the source lives on the same tmpfs, taking 600 KiB of its 1 MiB.
        data = os.urandom(600 * 1024)
        (tiny_tmpfs / "in").write_bytes(data)
        src_fd = os.open(tiny_tmpfs / "in", os.O_RDONLY)
    else:
        data = os.urandom(2 << 20)
        src = endpoints.source(src_kind, data)
        src_fd = hand_over(src, close)
    dst = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        out = run_mode(mode, src_fd, dst, zerocopy)
        assert isinstance(out.exc, OSError) and out.exc.errno == errno.ENOSPC, out.exc
        assert out.method == method
        assert_closed_as_said(close, src_fd, dst)
    finally:
        if not close:
            os.close(dst)
            if src_kind == "tmpfs":
                os.close(src_fd)
    written = out_path.read_bytes()
    # What did land is exactly the start of the data, and counted exactly.
    assert 0 < len(written) < len(data)
    assert written == data[: len(written)]
    assert out.bytes_copied == len(written)


# ----------------------------------------------------------- EPIPE, ECONNRESET

# (id, source kind, sink kind, zerocopy, the path in use when the sink fails)
SINK_PATHS = [
    ("readwrite", "file", "pipe", False, "readwrite"),
    ("splice-pipe", "file", "pipe", True, "splice"),
    ("sendfile", "file", "unix", True, "sendfile"),
    ("splice-pooled-socket", "tcp", "unix", True, "splice"),
]

# Far more than every buffer on the way (pipes, socket buffers, the pooled
# pipe) holds, so the relay is still sending when the fault comes.
BIG = 16 << 20
PART = 256 * 1024


@pytest.mark.parametrize("who", ["reader", "other-thread"])
@pytest.mark.parametrize("mode", MODES)
@over_paths(("src_kind", "dst_kind", "zerocopy", "method"), SINK_PATHS)
def test_a_sink_closed_mid_stream_is_epipe(
    endpoints: Endpoints,
    fars: list[Far],
    src_kind: str,
    dst_kind: str,
    zerocopy: bool,
    method: str,
    mode: str,
    who: str,
) -> None:
    """ "reader": reads part of the stream, checks it, closes its end.
    "other-thread": nobody reads; another thread closes the reader's end
    while the copy is parked on the full sink."""
    data = os.urandom(BIG)
    src = endpoints.source(src_kind, data)
    dst = Far(dst_kind, relay_reads=False)
    fars.append(dst)
    close = mode == "relay-close"

    def actor(progress: Callable[[], int]) -> None:
        try:
            if who == "reader":
                assert dst.read_exactly(PART) == data[:PART]
            else:
                # The copied count may stay 0: a blocking write into a full
                # pipe does not return until all of it is in.
                wait_until(lambda: dst.unread() > 0, "bytes in the sink")
        finally:
            dst.close_far()

    out = run_mode(mode, hand_over(src, close), dst.give(close), zerocopy, actor)
    assert_peer_gone(out.exc, dst_kind)
    assert out.method == method
    assert out.bytes_copied < len(data)
    assert_closed_as_said(close, src.fd, dst.fd)


def _reader_script(n: int) -> str:
    # Reads n bytes from stdin, echoes them, then stops reading for good.
    return (
        "import os, signal\n"
        f"left = {n}\n"
        "while left:\n"
        "    chunk = os.read(0, left)\n"
        "    if not chunk:\n"
        "        break\n"
        "    os.write(1, chunk)\n"
        "    left -= len(chunk)\n"
        "signal.pause()\n"
    )


@pytest.mark.parametrize("mode", MODES)
@over_paths(("src_kind", "dst_kind", "zerocopy", "method"), SINK_PATHS)
def test_a_reader_process_killed_mid_stream_is_epipe(
    endpoints: Endpoints,
    fars: list[Far],
    src_kind: str,
    dst_kind: str,
    zerocopy: bool,
    method: str,
    mode: str,
) -> None:
    data = os.urandom(BIG)
    src = endpoints.source(src_kind, data)
    dst = Far(dst_kind, relay_reads=False)
    fars.append(dst)
    close = mode == "relay-close"
    far = dst.sock.fileno() if dst.sock is not None else dst.far_fd
    proc = subprocess.Popen(
        [sys.executable, "-c", _reader_script(PART)], stdin=far, stdout=subprocess.PIPE
    )
    echoed: list[bytes] = []

    def actor(progress: Callable[[], int]) -> None:
        try:
            assert proc.stdout is not None
            echoed.append(proc.stdout.read(PART))
        finally:
            proc.kill()

    try:
        dst.close_far()  # the child holds the only reading end now
        out = run_mode(mode, hand_over(src, close), dst.give(close), zerocopy, actor)
        assert proc.wait(TIMEOUT) == -signal.SIGKILL
        assert echoed == [data[:PART]]
        assert_peer_gone(out.exc, dst_kind)
        assert out.method == method
        assert_closed_as_said(close, src.fd, dst.fd)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()


# (id, source kind, zerocopy, path) for a copy sending to a TCP peer
RESET_SINK_PATHS = [
    ("readwrite", "file", False, "readwrite"),
    ("sendfile", "file", True, "sendfile"),
    ("splice-pipe", "pipe", True, "splice"),
    ("splice-pooled-socket", "tcp", True, "splice"),
]


@pytest.mark.parametrize("mode", MODES)
@over_paths(("src_kind", "zerocopy", "method"), RESET_SINK_PATHS)
def test_a_tcp_sink_reset_mid_stream_is_connection_reset(
    endpoints: Endpoints,
    fars: list[Far],
    src_kind: str,
    zerocopy: bool,
    method: str,
    mode: str,
) -> None:
    data = os.urandom(BIG)
    src = endpoints.source(src_kind, data)
    dst = Far("tcp", relay_reads=False)
    fars.append(dst)
    close = mode == "relay-close"

    def actor(progress: Callable[[], int]) -> None:
        try:
            assert dst.read_exactly(PART) == data[:PART]
        finally:
            dst.reset()

    out = run_mode(mode, hand_over(src, close), dst.give(close), zerocopy, actor)
    assert_peer_gone(out.exc, "tcp")
    assert out.method == method
    assert_closed_as_said(close, src.fd, dst.fd)


# (id, sink kind, zerocopy, path) for a copy receiving from a TCP peer
RESET_SOURCE_PATHS = [
    ("readwrite", "file", False, "readwrite"),
    ("splice-pooled-file", "file", True, "splice"),
    ("splice-pipe", "pipe", True, "splice"),
]


@pytest.mark.parametrize("mode", MODES)
@over_paths(("dst_kind", "zerocopy", "method"), RESET_SOURCE_PATHS)
def test_a_tcp_source_reset_mid_stream_is_connection_reset(
    endpoints: Endpoints,
    fars: list[Far],
    dst_kind: str,
    zerocopy: bool,
    method: str,
    mode: str,
) -> None:
    """The copy has moved all the peer sent and waits for more: the RST
    must fail it, and everything before it must have arrived."""
    data = os.urandom(1 << 20)
    src = Far("tcp", relay_reads=True)
    fars.append(src)
    dst = endpoints.sink(dst_kind)
    close = mode == "relay-close"

    def actor(progress: Callable[[], int]) -> None:
        try:
            src.write(data)
            wait_until(lambda: progress() == len(data), "the copy to move what was sent")
        finally:
            src.reset()

    out = run_mode(mode, src.give(close), hand_over(dst, close), zerocopy, actor)
    assert isinstance(out.exc, ConnectionResetError), out.exc
    assert out.exc.errno == errno.ECONNRESET
    assert out.method == method
    assert_closed_as_said(close, src.fd, dst.fd)
    assert dst.received() == data


# ---------------------------------------------------------------- EINTR storms

# (id, source kind, sink kind, zerocopy, path)
ALL_PATHS = [
    ("readwrite", "pipe", "tcp", False, "readwrite"),
    ("splice-pipe", "file", "pipe", True, "splice"),
    ("splice-pooled-socket", "tcp", "tcp", True, "splice"),
    ("splice-pooled-file", "unix", "file", True, "splice"),
    ("sendfile", "file", "tcp", True, "sendfile"),
    ("copy_file_range", "file", "file", True, "copy_file_range"),
]


@contextlib.contextmanager
def signal_storm() -> Iterator[list[int]]:
    """SIGALRM every millisecond, with a Python handler, until the block ends.

    Yields the list holding the count of handler calls; the storm is known
    to be on (one handler call has run) before the block starts.
    """
    hits = [0]

    def handler(signum: int, frame: FrameType | None) -> None:
        hits[0] += 1

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        wait_until(lambda: hits[0] > 0, "the first SIGALRM")
        yield hits
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("variant", ["whole", "count", "nonblocking"])
@pytest.mark.parametrize("api", ["copy_fd", "relay"])
@over_paths(("src_kind", "dst_kind", "zerocopy", "method"), ALL_PATHS)
def test_an_eintr_storm_loses_and_repeats_nothing(
    endpoints: Endpoints,
    src_kind: str,
    dst_kind: str,
    zerocopy: bool,
    method: str,
    api: str,
    variant: str,
) -> None:
    """ "whole": to end of file; "count": an odd count, and not one byte more
    leaves the source; "nonblocking": both ends O_NONBLOCK (poll on EAGAIN)."""
    data = os.urandom(BIG)
    count = len(data) - 12_345 if variant == "count" else None
    nonblocking = variant == "nonblocking"
    src = endpoints.source(src_kind, data, nonblocking=nonblocking)
    dst = endpoints.sink(dst_kind, nonblocking=nonblocking)
    with signal_storm() as hits:
        if api == "copy_fd":
            n, used = run_job(src.fd, dst.fd, count, zerocopy=zerocopy)
        else:
            relay = fastpipe.relay(src.fd, dst.fd, close=False, count=count, zerocopy=zerocopy)
            n, used = relay.result(timeout=TIMEOUT), relay.method
        during = hits[0]
    expected = data[:count]
    assert used == method
    assert n == len(expected)
    assert dst.received() == expected
    if count is not None:
        assert src.leftover() == data[count:]
    assert during > 1
    print(f"{during} SIGALRM handler calls during the copy")


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    ("src_kind", "dst_kind", "zerocopy", "method"),
    [p[1:] for p in ALL_PATHS if p[0] != "copy_file_range"],
    ids=[p[0] for p in ALL_PATHS if p[0] != "copy_file_range"],
)
def test_a_signal_handler_that_raises_stops_copy_fd_cleanly(
    endpoints: Endpoints,
    fars: list[Far],
    src_kind: str,
    dst_kind: str,
    zerocopy: bool,
    method: str,
) -> None:
    """copy_fd in the main thread, parked on a stalled end, under a storm
    whose handler raises: the exception comes out of copy_fd, every byte
    counted as copied did arrive, and the buffer and pipe go back (checked
    by conftest).  copy_file_range is left out: a file -> file copy never
    parks, so the signal would land only by chance."""
    data = os.urandom(32 * 1024 if src_kind != "file" else BIG)
    if src_kind != "file":
        # A source that stalls: 32 KiB (fits in every buffer), then nothing.
        far = Far(src_kind, relay_reads=True)
        fars.append(far)
        far.write(data)
        sink = endpoints.sink(dst_kind)
        job = _impl.CopyJob(far.fd, sink.fd, zerocopy=zerocopy)
        parked = lambda: job.bytes_copied == len(data)  # noqa: E731
    else:
        # A sink that stalls: nobody reads it.
        far = Far(dst_kind, relay_reads=False)
        fars.append(far)
        src = endpoints.source(src_kind, data)
        job = _impl.CopyJob(src.fd, far.fd, zerocopy=zerocopy)
        parked = lambda: far.unread() > 0  # noqa: E731

    raised = []

    def handler(signum: int, frame: FrameType | None) -> None:
        # Once only: a second Boom could land anywhere after copy_fd.
        if not raised and parked():
            raised.append(True)
            raise Boom

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        with pytest.raises(Boom):
            job.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    if fastpipe.IMPLEMENTATION == "c" or job.bytes_copied:
        assert job.method == method
    else:
        # The twin's handler can raise between a syscall's return and the
        # bookkeeping after it (see the count below): with nothing counted,
        # the path that moved the bytes may not be named either.
        assert job.method in (method, None)
    if src_kind != "file":
        assert sink.received() == data
    else:
        # Close our end: the reader then gets everything the copy counted,
        # and only that.
        os.close(far.fd)
        far.relay_owns = True
        got = far.read_rest()
        assert got == data[: len(got)]
        if fastpipe.IMPLEMENTATION == "c":
            assert len(got) == job.bytes_copied
        else:
            # In Python code a handler raises at any bytecode boundary, also
            # between a syscall's return and the count's update: the twin's
            # count may miss the last write, never exceed what was sent.
            assert len(got) >= job.bytes_copied


# (id, source kind, zerocopy, path) for a copy into a blocking TCP socket
SOCKET_SINK_PATHS = [
    ("readwrite", "pipe", False, "readwrite"),
    ("sendfile", "file", True, "sendfile"),
    ("splice-pipe", "pipe", True, "splice"),
    ("splice-pooled-socket", "tcp", True, "splice"),
]


@pytest.mark.parametrize("api", ["copy_fd", "relay"])
@over_paths(("src_kind", "zerocopy", "method"), SOCKET_SINK_PATHS)
def test_idle_timeout_fires_on_a_stalled_blocking_socket_sink(
    endpoints: Endpoints,
    fars: list[Far],
    src_kind: str,
    zerocopy: bool,
    method: str,
    api: str,
) -> None:
    """sendfile and splice into a blocking socket wait until the whole chunk
    is queued, whatever non-blocking flag they get, and POLLOUT does not
    promise room for it: with small socket buffers a stalled peer used to
    hold the copy (and the relay) past idle_timeout for ever.  The compiled
    core now interrupts the call at the deadline; the twin, which cannot,
    uses read/write for a blocking socket sink under idle_timeout."""
    data = os.urandom(BIG)
    src = endpoints.source(src_kind, data)
    dst = Far("tcp", relay_reads=False, small=True)
    fars.append(dst)
    t0 = time.monotonic()
    if api == "copy_fd":
        job = _impl.CopyJob(src.fd, dst.fd, zerocopy=zerocopy, idle_timeout=0.3)
        with pytest.raises(TimeoutError):
            job.run()
        used, copied = job.method, job.bytes_copied
    else:
        relay = fastpipe.relay(src.fd, dst.fd, close=False, zerocopy=zerocopy, idle_timeout=0.3)
        exc = relay.exception(timeout=TIMEOUT)
        assert isinstance(exc, TimeoutError), exc
        used, copied = relay.method, relay.bytes_copied
    assert 0.3 <= time.monotonic() - t0 < TIMEOUT
    expected = method if fastpipe.IMPLEMENTATION == "c" or not zerocopy else "readwrite"
    assert used == expected
    # Every byte counted is at the peer, in order, and no other.
    os.close(dst.fd)
    dst.relay_owns = True
    got = dst.read_rest()
    assert 0 < copied == len(got) < len(data)
    assert got == data[: len(got)]


# (id, stalled end, its kind, zerocopy, path)
STALL_PATHS = [
    ("readwrite", "src", "pipe", False, "readwrite"),
    ("splice-pooled-socket", "src", "tcp", True, "splice"),
    ("sendfile", "dst", "tcp", True, "sendfile"),
]


@pytest.mark.parametrize("api", ["copy_fd", "relay"])
@over_paths(("stalled", "kind", "zerocopy", "method"), STALL_PATHS)
def test_an_eintr_storm_does_not_hold_off_idle_timeout(
    endpoints: Endpoints,
    fars: list[Far],
    stalled: str,
    kind: str,
    zerocopy: bool,
    method: str,
    api: str,
) -> None:
    """Each EINTR restarts the wait: it must go on to the same deadline,
    not start the idle_timeout again (which a 1 ms storm would keep off
    for ever)."""
    data = os.urandom(32 * 1024 if stalled == "src" else BIG)
    if stalled == "src":
        far = Far(kind, relay_reads=True)
        far.write(data)
        sink = endpoints.sink("file")
        ends = far.fd, sink.fd
    else:
        far = Far(kind, relay_reads=False)
        ends = endpoints.source("file", data).fd, far.fd
    fars.append(far)
    with signal_storm():
        t0 = time.monotonic()
        if api == "copy_fd":
            job = _impl.CopyJob(*ends, zerocopy=zerocopy, idle_timeout=0.3)
            with pytest.raises(TimeoutError):
                job.run()
            used, copied = job.method, job.bytes_copied
        else:
            relay = fastpipe.relay(*ends, close=False, zerocopy=zerocopy, idle_timeout=0.3)
            assert isinstance(relay.exception(timeout=TIMEOUT), TimeoutError)
            used, copied = relay.method, relay.bytes_copied
        elapsed = time.monotonic() - t0
    # The twin sends to a blocking socket under idle_timeout by read/write
    # (see the test above).
    twin_rw = fastpipe.IMPLEMENTATION == "py" and stalled == "dst"
    assert used == ("readwrite" if twin_rw else method)
    assert 0.3 <= elapsed < TIMEOUT
    if stalled == "src":
        assert copied == len(data)
        assert sink.received() == data
    else:
        assert 0 < copied < len(data)


@pytest.mark.parametrize("close", [True, False], ids=["close", "keep"])
def test_a_buffered_writer_that_cannot_flush_fails_the_relay(
    endpoints: Endpoints, close: bool
) -> None:
    """The flush before the first byte hits ENOSPC: that is the relay's
    error, nothing is copied, and close=True still closes the file (whose
    own close() flushes, fails again, and closes the fd anyway)."""
    src = endpoints.source("pipe", os.urandom(100_000))
    full = open("/dev/full", "wb")  # noqa: SIM115 - closed by the relay or below
    full.write(b"pending")
    try:
        relay = fastpipe.relay(hand_over(src, close), full, close=close)
        exc = relay.exception(timeout=TIMEOUT)
        assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC, exc
        assert relay.bytes_copied == 0
        assert full.closed is close
        assert_closed_as_said(close, src.fd)
    finally:
        if not full.closed:
            with contextlib.suppress(OSError):
                full.close()


# ------------------------------------------------- fds closed by someone else

# (id, source kind, sink kind, zerocopy, path)
WRITER_GONE_PATHS = [
    ("readwrite", "pipe", "tcp", False, "readwrite"),
    ("splice-pipe", "pipe", "pipe", True, "splice"),
    ("splice-pooled-pipe", "pipe", "file", True, "splice"),
    ("splice-pooled-file", "tcp", "file", True, "splice"),
]


@pytest.mark.parametrize("mode", MODES)
@over_paths(("src_kind", "dst_kind", "zerocopy", "method"), WRITER_GONE_PATHS)
def test_a_source_closed_by_another_thread_ends_the_copy_exactly(
    endpoints: Endpoints,
    fars: list[Far],
    src_kind: str,
    dst_kind: str,
    zerocopy: bool,
    method: str,
    mode: str,
) -> None:
    """The writer's end, closed by another thread while the copy waits for
    more: that is end of file, and exactly what was written arrives."""
    data = os.urandom(300_000)
    src = Far(src_kind, relay_reads=True)
    fars.append(src)
    dst = endpoints.sink(dst_kind)
    close = mode == "relay-close"

    def actor(progress: Callable[[], int]) -> None:
        try:
            src.write(data)
            wait_until(lambda: progress() == len(data), "the copy to move what was written")
        finally:
            src.close_far()

    out = run_mode(mode, src.give(close), hand_over(dst, close), zerocopy, actor)
    assert out.exc is None
    assert out.result == len(data)
    assert out.method == method
    assert_closed_as_said(close, src.fd, dst.fd)
    assert dst.received() == data


# The relay's *own* fd closed under it.  This is a caller bug, and testing it
# in this process would be unsafe: the moment the number is free, any thread
# that opens something (the pool making a pipe, the twin making its eventfd,
# pytest) can get it, and the relay would then copy from or to that.  So each
# case runs in a child process where nothing opens an fd in that window:
# - pipe -> pipe only: the compiled core splices directly or uses read/write,
#   taking no pooled pipe;
# - a pool opens its poller (an epoll set and an eventfd) when a relay first
#   parks, so the child waits for the relay to be parked before closing;
# - close=False: with close=True the relay would close the number a second
#   time when it ends, which in a real program closes someone else's fd.
# A close() takes a parked relay's fd out of the poller without a word; the
# poller's sweep finds the number closed and ends the relay with EBADF (the
# child also writes into the pipe, which wakes nothing once its reader is
# gone).  A hang is caught by the child's timeout, a crash by its exit status.
_OWN_FD_SCRIPT = r"""
import os, sys, threading, time
import fastpipe

which, zerocopy = sys.argv[1], sys.argv[2] == "1"
deadline = time.monotonic() + 30


def parked():
    # Parking opens the pool's poller (its fds) on first use: the number is
    # closed only once that is done and the relay waits in it.
    while fastpipe.default_pool().stats()["parked"] < 1:
        assert time.monotonic() < deadline, "the relay never parked"
        time.sleep(0.005)


def feed(fd, data):
    try:
        while data:
            data = data[os.write(fd, data[:65536]):]
    except BrokenPipeError:
        pass


src_r, src_w = os.pipe()
dst_r, dst_w = os.pipe()
if which == "src":
    os.write(src_w, b"a" * 1000)
    relay = fastpipe.relay(src_r, dst_w, close=False, zerocopy=zerocopy)
    got = b""
    while len(got) < 1000:
        got += os.read(dst_r, 1000)
    assert got == b"a" * 1000
    parked()
    os.close(src_r)
    try:
        os.write(src_w, b"b" * 1000)  # wakes a read blocked on the pipe
    except BrokenPipeError:
        pass  # a poll holds no reference: the close left the pipe without reader
    kept = dst_w
else:
    feeder = threading.Thread(target=feed, args=(src_w, b"c" * (4 << 20)), daemon=True)
    feeder.start()
    relay = fastpipe.relay(src_r, dst_w, close=False, zerocopy=zerocopy)
    while relay.bytes_copied == 0:
        assert time.monotonic() < deadline, "the relay never started"
        time.sleep(0.005)
    parked()
    os.close(dst_w)
    drained = 0
    while chunk := os.read(dst_r, 1 << 20):  # wakes the relay's write
        assert chunk == b"c" * len(chunk)
        drained += len(chunk)
    kept = src_r
exc = relay.exception(timeout=30)
os.fstat(kept)  # close=False: the relay left its other end open
stats = (fastpipe.buffer_stats()["in_use"], fastpipe.pipe_stats()["in_use"])
print(type(exc).__name__, getattr(exc, "errno", None), relay.method, stats)
"""


@pytest.mark.parametrize("zerocopy", [True, False], ids=["splice", "readwrite"])
@pytest.mark.parametrize("which", ["src", "dst"])
def test_the_relays_own_fd_closed_under_it_is_ebadf(which: str, zerocopy: bool) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _OWN_FD_SCRIPT, which, "1" if zerocopy else "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    method = "splice" if zerocopy else "readwrite"
    assert proc.stdout.split(None, 2) == ["OSError", str(errno.EBADF), f"{method} (0, 0)\n"]
