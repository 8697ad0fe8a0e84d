"""Hostile input: a clear exception, and nothing else happens.

The project's rule (CONTRACT.md): a wrong type is a TypeError and a wrong
value a ValueError, raised at once by the call; everything the OS refuses is
an OSError with its errno, raised by ``copy_fd`` and delivered through the
``Relay`` by ``relay()``/``proxy()``.  After each hostile call no fd of ours
is closed (unless ``close=True`` said so), no worker is lost, the pool still
relays, and no pooled buffer or pipe stays in use (conftest checks those).

test_errors.py has the basic cases (bad ends of relay(), bad keywords,
EBADF, EISDIR, EPIPE, ENOSPC); this file adds the rest of the hostile ground.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastpipe
from fastpipe import WorkerPool

from conftest import Endpoints, close_quietly, socket_pair

# -- helpers ---------------------------------------------------------------------


def pipe_relay_works(pool: WorkerPool) -> None:
    """A real relay through ``pool``: pipe -> pipe, 300 KB, content checked."""
    data = os.urandom(300_000)
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    got: list[bytes] = []

    def feed() -> None:
        try:
            os.write(w, data)  # blocks until the relay has taken it all
        finally:
            os.close(w)

    def drain() -> None:
        while chunk := os.read(out_r, 1 << 20):
            got.append(chunk)

    threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    try:
        assert pool.relay(r, out_w).result(timeout=60) == len(data)
    finally:
        for t in threads:
            t.join(30)
        os.close(out_r)
    assert b"".join(got) == data


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    """A pool of its own, checked to be whole and working after the test."""
    with WorkerPool(max_workers=4) as p:
        yield p
        stats = p.stats()
        assert stats["busy"] == 0 and stats["queued"] == 0, stats
        pipe_relay_works(p)
        assert p.stats()["workers"] >= 1


class Held:
    """fds the test opened: each must still be open, and the same file, at the end."""

    def __init__(self) -> None:
        self.fds: dict[int, tuple[int, int]] = {}
        self.released: set[int] = set()

    def add(self, fd: int) -> int:
        st = os.fstat(fd)
        self.fds[fd] = (st.st_dev, st.st_ino)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        return self.add(r), self.add(w)

    def open(self, path: str | Path, flags: int, mode: int = 0o600) -> int:
        return self.add(os.open(path, flags, mode))

    def release(self, fd: int) -> int:
        """The code under test closes this one (close=True)."""
        self.released.add(fd)
        return fd

    def check_and_close(self) -> None:
        for fd, ident in self.fds.items():
            if fd in self.released:
                continue
            st = os.fstat(fd)  # EBADF here: something closed our fd
            assert (st.st_dev, st.st_ino) == ident, f"fd {fd} now names another file"
        for fd in self.fds:
            if fd not in self.released:
                os.close(fd)


@pytest.fixture
def held() -> Iterator[Held]:
    h = Held()
    try:
        yield h
    except BaseException:
        for fd in h.fds:
            if fd not in h.released:
                close_quietly(fd)
        raise
    h.check_and_close()


def a_closed_fd() -> int:
    """An fd number that is closed and stays so: far above anything open.

    The kernel hands out the lowest free number, so a worker opening a pipe
    meanwhile cannot take it (a just-closed low number it could).
    """
    fd = 900
    with pytest.raises(OSError):
        os.fstat(fd)
    return fd


def expect_os_error(relay: fastpipe.Relay, *errnos: int) -> OSError:
    exc = relay.exception(timeout=30)
    assert isinstance(exc, OSError), repr(exc)
    assert exc.errno in errnos, exc
    return exc


# -- wrong types and values: raised at once, nothing started -----------------------


class Fileno:
    def __init__(self, value: object) -> None:
        self.value = value

    def fileno(self) -> object:
        return self.value

    def __repr__(self) -> str:
        return f"Fileno({self.value!r})"


class NoFileno:
    pass


def closed_binary_file(tmp_path: Path) -> object:
    f = open(tmp_path / "closed", "wb")
    f.close()
    return f


BAD_ENDS: list[tuple[object, type[Exception]]] = [
    ("3", TypeError),
    (b"3", TypeError),
    (bytearray(b"3"), TypeError),
    (3.0, TypeError),
    (None, TypeError),
    (True, TypeError),
    ([3, 4], TypeError),
    (NoFileno(), TypeError),
    (Fileno("3"), TypeError),
    (Fileno(3.0), TypeError),
    (Fileno(None), TypeError),
    (Fileno(True), TypeError),
    (Fileno(-3), ValueError),
    (Fileno(2**31), ValueError),
    (io.BytesIO(b"x"), TypeError),
    (-1, ValueError),
    (-(2**70), ValueError),
    (2**31, ValueError),
    (2**64, ValueError),
]


@pytest.mark.parametrize(("obj", "exc"), BAD_ENDS, ids=repr)
def test_bad_ends_raise_at_once_everywhere(
    pool: WorkerPool, held: Held, obj: object, exc: type[Exception]
) -> None:
    r, w = held.pipe()
    calls = [
        lambda: pool.relay(obj, w),  # type: ignore[arg-type]
        lambda: pool.relay(r, obj),  # type: ignore[arg-type]
        lambda: fastpipe.relay(obj, w),  # type: ignore[arg-type]
        lambda: pool.proxy(obj, r),  # type: ignore[arg-type]
        lambda: pool.proxy(r, obj),  # type: ignore[arg-type]
        lambda: pool.proxy((obj, w), r),  # type: ignore[arg-type]
        lambda: pool.proxy((r, obj), w),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(exc):
            call()
    # Nothing was started: no worker took a job.
    assert pool.stats()["busy"] == 0


def test_a_closed_file_object_is_a_value_error(pool: WorkerPool, held: Held, tmp_path) -> None:
    r, w = held.pipe()
    f = closed_binary_file(tmp_path)
    with pytest.raises(ValueError):
        pool.relay(f, w)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pool.proxy(r, f)  # type: ignore[arg-type]


class FailingFileno:
    """An end whose fileno() fails with an OS error, as a
    ``SpooledTemporaryFile`` rolling over to a full disk does."""

    def __init__(self) -> None:
        self.closed = False

    def fileno(self) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("close", [True, False])
@pytest.mark.parametrize("api", ["relay", "proxy"])
def test_an_os_error_from_fileno_comes_through_the_future(
    pool: WorkerPool, held: Held, api: str, close: bool
) -> None:
    """The contract: every OS error arrives through the Relay, never from relay()."""
    _, w = held.pipe()
    if close:
        held.release(w)
    end = FailingFileno()
    if api == "relay":
        relay = pool.relay(end, w, close=close)
    else:
        relay = pool.proxy(end, (w, w), close=close)
    with pytest.raises(OSError) as info:
        relay.result(timeout=10)
    assert info.value.errno == errno.ENOSPC
    # Nothing moved, counted per direction as for any relay or proxy.
    assert relay.bytes_each_way == ((0,) if api == "relay" else (0, 0))
    assert relay.bytes_copied == 0
    assert relay.method is None
    # Both ends closed as close= says: the object through close(), the int fd
    # with os.close (held checks at teardown that close=False left it open).
    assert end.closed is close
    if close:
        with pytest.raises(OSError):
            os.fstat(w)
    # Wrong arguments still win, at once.
    with pytest.raises(TypeError):
        pool.relay(FailingFileno(), "not an end")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pool.relay(FailingFileno(), 1, count=-1)


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((b"0", 1), TypeError),
        ((0, bytearray(b"1")), TypeError),
        ((object(), 1), TypeError),
        ((0, 1, True), TypeError),
        ((0, 1, b"1"), TypeError),
        ((0, 1, float("inf")), TypeError),
        ((0, 1, -(2**70)), ValueError),
        ((2**31, 1), ValueError),
        ((0, 2**64), ValueError),
        ((0, -(2**64)), ValueError),
    ],
    ids=repr,
)
def test_copy_fd_rejects_more_bad_arguments_at_once(args: tuple, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        fastpipe.copy_fd(*args)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"count": True}, TypeError),
        ({"count": b"1"}, TypeError),
        ({"count": float("nan")}, TypeError),
        ({"count": -(2**70)}, ValueError),
        ({"idle_timeout": True}, TypeError),
        ({"idle_timeout": b"1"}, TypeError),
        ({"idle_timeout": 1j}, TypeError),
        ({"idle_timeout": float("nan")}, ValueError),
        ({"idle_timeout": float("-inf")}, ValueError),
        ({"idle_timeout": -(2**70)}, ValueError),
    ],
    ids=repr,
)
def test_relay_keywords_rejected_at_once(
    pool: WorkerPool, held: Held, kwargs: dict, exc: type[Exception]
) -> None:
    r, w = held.pipe()
    with pytest.raises(exc):
        pool.relay(r, w, **kwargs)
    if "idle_timeout" in kwargs:
        with pytest.raises(exc):
            pool.proxy(r, w, **kwargs)
    assert pool.stats()["busy"] == 0


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"max_workers": "2"}, TypeError),
        ({"max_workers": True}, TypeError),
        ({"max_workers": 2.0}, TypeError),
        ({"max_workers": -1}, ValueError),
        ({"max_workers": -(2**70)}, ValueError),
        ({"idle_worker_timeout": True}, TypeError),
        ({"idle_worker_timeout": b"1"}, TypeError),
        ({"idle_worker_timeout": -1}, ValueError),
        ({"idle_worker_timeout": float("nan")}, ValueError),
    ],
    ids=repr,
)
def test_worker_pool_arguments_rejected_at_once(kwargs: dict, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        WorkerPool(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_workers": 2**31}, {"max_workers": 10**12}, {"idle_worker_timeout": float("inf")}],
    ids=repr,
)
def test_worker_pool_huge_limits_mean_no_limit(kwargs: dict) -> None:
    """A limit no machine reaches is no limit (it raised OverflowError)."""
    with WorkerPool(**kwargs) as pool:
        pipe_relay_works(pool)


@pytest.mark.parametrize("timeout", [float("inf"), 1e300, 1e10], ids=repr)
def test_a_huge_idle_timeout_is_no_timeout(pool: WorkerPool, timeout: float) -> None:
    """In the twin's worker, and in the proxy watchdog, inf or 1e300 raised
    OverflowError (the watchdog thread died of it)."""
    data = os.urandom(100_000)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        relay = pool.relay(a, c, close=False, idle_timeout=timeout)
        assert relay.result(timeout=30) == len(data)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(d) == data
    finally:
        for s in (a, b, c, d):
            s.close()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        proxied = pool.proxy(a, c, close=False, idle_timeout=timeout)
        b.sendall(b"ping")
        assert d.recv(4) == b"ping"
        b.shutdown(socket.SHUT_WR)
        d.shutdown(socket.SHUT_WR)
        assert proxied.result(timeout=30) == (4, 0)
    # The proxies' watchdog thread is alive: a short idle_timeout still fires.
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        idle = pool.proxy(a, c, close=False, idle_timeout=0.2)
        assert isinstance(idle.exception(timeout=30), TimeoutError)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# -- fds the OS refuses: OSError with errno, through the future ----------------------


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("close", [False, True], ids=["keep", "close"])
@pytest.mark.parametrize("which", ["src", "dst"])
def test_a_closed_fd_is_ebadf_through_the_future(
    pool: WorkerPool, held: Held, which: str, close: bool, zerocopy: bool
) -> None:
    r, w = held.pipe()
    bad = a_closed_fd()
    good = held.release(w if which == "src" else r) if close else (w if which == "src" else r)
    src, dst = (bad, good) if which == "src" else (good, bad)
    relay = pool.relay(src, dst, close=close, zerocopy=zerocopy)
    expect_os_error(relay, errno.EBADF)
    if close:
        # close=True closed the open end as promised (and never the number
        # of the closed one, which someone else may have opened by then).
        with pytest.raises(OSError):
            os.fstat(good)


def test_proxy_with_a_closed_fd_fails_and_stops(pool: WorkerPool, held: Held) -> None:
    a, b = socket.socketpair()
    with a, b:
        relay = pool.proxy(a_closed_fd(), a, close=False)
        expect_os_error(relay, errno.EBADF)
        os.fstat(a.fileno())


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
def test_a_directory_is_refused_at_either_end(
    pool: WorkerPool, held: Held, tmp_path: Path, zerocopy: bool
) -> None:
    sub = tmp_path / "dir"
    sub.mkdir()
    directory = held.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    (tmp_path / "src").write_bytes(os.urandom(100_000))
    _, w = held.pipe()
    # Read: EISDIR.  Write: a directory can only be open read-only: EBADF.
    expect_os_error(pool.relay(directory, w, close=False, zerocopy=zerocopy), errno.EISDIR)
    src = held.open(tmp_path / "src", os.O_RDONLY)
    expect_os_error(pool.relay(src, directory, close=False, zerocopy=zerocopy), errno.EBADF)
    src = held.open(tmp_path / "src", os.O_RDONLY)
    with pytest.raises(OSError) as info:
        fastpipe.copy_fd(src, directory, zerocopy=zerocopy)
    assert info.value.errno == errno.EBADF
    assert os.listdir(sub) == []


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
def test_an_o_path_fd_is_ebadf_at_either_end(
    pool: WorkerPool, held: Held, tmp_path: Path, zerocopy: bool
) -> None:
    data = os.urandom(50_000)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(b"")
    path_src = held.open(tmp_path / "a", os.O_PATH)
    path_dst = held.open(tmp_path / "b", os.O_PATH)
    readable = held.open(tmp_path / "a", os.O_RDONLY)
    writable = held.open(tmp_path / "b", os.O_WRONLY)
    for src, dst in ((path_src, writable), (readable, path_dst)):
        with pytest.raises(OSError) as info:
            fastpipe.copy_fd(src, dst, zerocopy=zerocopy)
        assert info.value.errno == errno.EBADF
        # read/write read a buffer's worth before the write failed.
        os.lseek(readable, 0, os.SEEK_SET)
        expect_os_error(pool.relay(src, dst, close=False, zerocopy=zerocopy), errno.EBADF)
    a, b = socket.socketpair()
    with a, b:
        expect_os_error(pool.proxy(path_src, a, close=False), errno.EBADF)
    assert (tmp_path / "b").read_bytes() == b""


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("how", ["file-write-only", "pipe-write-end"])
def test_a_write_only_source_is_ebadf(
    pool: WorkerPool, held: Held, tmp_path: Path, how: str, zerocopy: bool
) -> None:
    out = held.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    if how == "file-write-only":
        (tmp_path / "in").write_bytes(b"data that must stay")
        src = held.open(tmp_path / "in", os.O_WRONLY)
    else:
        _, src = held.pipe()
    with pytest.raises(OSError) as info:
        fastpipe.copy_fd(src, out, zerocopy=zerocopy)
    assert info.value.errno == errno.EBADF
    expect_os_error(pool.relay(src, out, close=False, zerocopy=zerocopy), errno.EBADF)
    assert (tmp_path / "out").read_bytes() == b""
    if how == "file-write-only":
        assert (tmp_path / "in").read_bytes() == b"data that must stay"


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("src_kind", ["file", "pipe", "unix"])
@pytest.mark.parametrize("how", ["file-read-only", "pipe-read-end"])
def test_a_read_only_destination_is_ebadf(
    pool: WorkerPool,
    held: Held,
    endpoints: Endpoints,
    tmp_path: Path,
    how: str,
    src_kind: str,
    zerocopy: bool,
) -> None:
    if how == "file-read-only":
        (tmp_path / "dst").write_bytes(b"must stay")
        dst = held.open(tmp_path / "dst", os.O_RDONLY)
    else:
        dst, _ = held.pipe()
    src = endpoints.source(src_kind, os.urandom(100_000))
    expect_os_error(pool.relay(src.fd, dst, close=False, zerocopy=zerocopy), errno.EBADF)
    if how == "file-read-only":
        assert (tmp_path / "dst").read_bytes() == b"must stay"


# -- the same file at both ends ----------------------------------------------------


SAME_FILE_CASES = [
    (how, count)
    for how in ["same-fd", "dup", "reopened", "append"]
    for count in [None, 1, 100_000]
    # Appending the first bytes of a file to itself reads none of them back.
    if not (how == "append" and count is not None)
]


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize(("how", "count"), SAME_FILE_CASES)
def test_a_file_copied_onto_itself_is_einval_and_left_intact(
    pool: WorkerPool, held: Held, tmp_path: Path, how: str, count: int | None, zerocopy: bool
) -> None:
    """``cat f >> f``: it would chase its own writes (O_APPEND: until the disk
    is full) or read back what it overwrote.  Refused before a byte moves."""
    path = tmp_path / "f"
    data = os.urandom(300_000)
    path.write_bytes(data)
    src = held.open(path, os.O_RDWR)
    dst = {
        "same-fd": lambda: src,
        "dup": lambda: held.add(os.dup(src)),
        "reopened": lambda: held.open(path, os.O_RDWR),
        "append": lambda: held.open(path, os.O_WRONLY | os.O_APPEND),
    }[how]()
    with pytest.raises(OSError) as info:
        fastpipe.copy_fd(src, dst, count, zerocopy=zerocopy)
    assert info.value.errno == errno.EINVAL
    assert "same file" in str(info.value)
    relay = pool.relay(src, dst, close=False, count=count, zerocopy=zerocopy)
    assert "same file" in str(expect_os_error(relay, errno.EINVAL))
    assert path.read_bytes() == data
    assert os.lseek(src, 0, os.SEEK_CUR) == 0


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
def test_a_counted_copy_between_separate_ranges_of_one_file_works(
    held: Held, tmp_path: Path, zerocopy: bool
) -> None:
    path = tmp_path / "f"
    data = os.urandom(300_000)
    path.write_bytes(data)
    src = held.open(path, os.O_RDONLY)
    dst = held.open(path, os.O_WRONLY)
    os.lseek(src, 1000, os.SEEK_SET)
    os.lseek(dst, 200_000, os.SEEK_SET)
    assert fastpipe.copy_fd(src, dst, 100_000, zerocopy=zerocopy) == 100_000
    data = data[:200_000] + data[1000:101_000]
    assert path.read_bytes() == data
    # Ranges that touch are fine; one byte closer and they overlap: refused,
    # nothing written.
    os.lseek(src, 1000, os.SEEK_SET)
    os.lseek(dst, 101_000, os.SEEK_SET)
    assert fastpipe.copy_fd(src, dst, 100_000, zerocopy=zerocopy) == 100_000
    data = data[:101_000] + data[1000:101_000] + data[201_000:]
    assert path.read_bytes() == data
    os.lseek(src, 1000, os.SEEK_SET)
    os.lseek(dst, 100_999, os.SEEK_SET)
    with pytest.raises(OSError) as info:
        fastpipe.copy_fd(src, dst, 100_000, zerocopy=zerocopy)
    assert info.value.errno == errno.EINVAL
    assert path.read_bytes() == data


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
def test_appending_the_head_of_a_file_to_itself_works(
    pool: WorkerPool, held: Held, tmp_path: Path, zerocopy: bool
) -> None:
    """``head -c N f >> f`` with N within the file: legitimate, and exact."""
    path = tmp_path / "f"
    data = os.urandom(300_000)
    path.write_bytes(data)
    src = held.open(path, os.O_RDONLY)
    dst = held.open(path, os.O_WRONLY | os.O_APPEND)
    assert fastpipe.copy_fd(src, dst, 100_000, zerocopy=zerocopy) == 100_000
    # Now 400 KB: reading 300_001 more from offset 100_000 would reach bytes
    # this copy appends (the end moves as it writes): refused.
    with pytest.raises(OSError) as info:
        fastpipe.copy_fd(src, dst, 300_001, zerocopy=zerocopy)
    assert info.value.errno == errno.EINVAL
    relay = pool.relay(src, dst, close=False, count=300_000, zerocopy=zerocopy)
    assert relay.result(timeout=30) == 300_000
    assert path.read_bytes() == data + data[:100_000] + data[100_000:] + data[:100_000]


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_one_socket_at_both_ends_is_an_echo(pool: WorkerPool, kind: str, zerocopy: bool) -> None:
    """Not an error: reading a socket and writing back to it echoes its peer."""
    data = os.urandom(500_000)
    sock, peer = socket_pair(kind)
    got: list[bytes] = []

    def talk() -> None:
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)

    def listen() -> None:
        got.append(recv_all(peer))

    threads = [threading.Thread(target=talk), threading.Thread(target=listen)]
    with sock, peer:
        for t in threads:
            t.start()
        relay = pool.relay(sock, sock, close=False, zerocopy=zerocopy)
        try:
            assert relay.result(timeout=60) == len(data)
        finally:
            sock.shutdown(socket.SHUT_WR)
            for t in threads:
                t.join(30)
    assert got == [data]


def test_one_pipe_end_at_both_ends_is_ebadf(pool: WorkerPool, held: Held) -> None:
    r, w = held.pipe()
    os.write(w, b"x" * 1000)
    expect_os_error(pool.relay(r, r, close=False), errno.EBADF)  # r cannot be written
    expect_os_error(pool.relay(w, w, close=False), errno.EBADF)  # w cannot be read


# -- huge counts ---------------------------------------------------------------------


TOO_BIG = [2**63, 2**64, 2**64 + 1, 10**30]
LARGEST = 2**63 - 1


@pytest.mark.parametrize(
    ("src_kind", "dst_kind"), [("file", "file"), ("file", "unix"), ("pipe", "file"), ("tcp", "tcp")]
)
def test_the_largest_count_copies_everything(
    pool: WorkerPool, endpoints: Endpoints, src_kind: str, dst_kind: str
) -> None:
    """2**63-1 is a valid count: no short or negative copy from it, on any path."""
    data = os.urandom(200_000)
    src = endpoints.source(src_kind, data)
    dst = endpoints.sink(dst_kind)
    relay = pool.relay(src.fd, dst.fd, close=False, count=LARGEST)
    assert relay.result(timeout=60) == len(data)
    assert relay.bytes_copied == len(data)
    assert dst.received() == data


@pytest.mark.parametrize("count", TOO_BIG, ids=lambda c: f"2**{c.bit_length()}")
def test_a_count_beyond_64_bits_is_refused_at_once(
    pool: WorkerPool, endpoints: Endpoints, count: int
) -> None:
    """Refused before anything happens, rather than wrapped into a short copy."""
    data = os.urandom(100_000)
    src = endpoints.source("pipe", data)
    dst = endpoints.sink("file")
    with pytest.raises(ValueError, match="out of range"):
        pool.relay(src.fd, dst.fd, count=count)
    with pytest.raises(ValueError, match="out of range"):
        fastpipe.copy_fd(src.fd, dst.fd, count)
    # Nothing was read or closed: the whole payload is still there.
    assert fastpipe.copy_fd(src.fd, dst.fd, LARGEST) == len(data)
    assert dst.received() == data


# -- sockets that are not connected --------------------------------------------------


def not_connected(kind: str, tmp_path: Path) -> socket.socket:
    if kind == "tcp-listening":
        return socket.create_server(("127.0.0.1", 0))
    if kind == "unix-listening":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / "listening.sock"))
        sock.listen()
        return sock
    family = socket.AF_INET if kind == "tcp-unconnected" else socket.AF_UNIX
    return socket.socket(family, socket.SOCK_STREAM)


NOT_CONNECTED = ["tcp-listening", "unix-listening", "tcp-unconnected", "unix-unconnected"]


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("kind", NOT_CONNECTED)
def test_a_socket_that_is_not_connected_as_source(
    pool: WorkerPool, held: Held, tmp_path: Path, kind: str, zerocopy: bool
) -> None:
    """Reading it: ENOTCONN (EINVAL for AF_UNIX), at once; never a wait for a
    connection that a listening socket's POLLIN announces."""
    r, w = held.pipe()
    with not_connected(kind, tmp_path) as sock:
        with pytest.raises(OSError) as info:
            fastpipe.copy_fd(sock.fileno(), w, zerocopy=zerocopy)
        assert info.value.errno in (errno.ENOTCONN, errno.EINVAL)
        relay = pool.relay(sock, w, close=False, zerocopy=zerocopy)
        expect_os_error(relay, errno.ENOTCONN, errno.EINVAL)
        assert sock.fileno() >= 0
        if kind.endswith("listening"):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("kind", NOT_CONNECTED)
def test_a_socket_that_is_not_connected_as_destination(
    pool: WorkerPool, endpoints: Endpoints, tmp_path: Path, kind: str, zerocopy: bool
) -> None:
    """Writing it: EPIPE (TCP) or ENOTCONN (AF_UNIX), never SIGPIPE."""
    with not_connected(kind, tmp_path) as sock:
        src = endpoints.source("file", os.urandom(100_000))
        with pytest.raises(OSError) as info:
            fastpipe.copy_fd(src.fd, sock.fileno(), zerocopy=zerocopy)
        assert info.value.errno in (errno.EPIPE, errno.ENOTCONN)
        os.lseek(src.fd, 0, os.SEEK_SET)
        relay = pool.relay(src.fd, sock, close=False, zerocopy=zerocopy)
        expect_os_error(relay, errno.EPIPE, errno.ENOTCONN)
        assert sock.fileno() >= 0


@pytest.mark.parametrize("kind", NOT_CONNECTED)
def test_a_proxy_to_a_socket_that_is_not_connected_fails_both_ways(
    pool: WorkerPool, tmp_path: Path, kind: str
) -> None:
    a, b = socket.socketpair()
    with not_connected(kind, tmp_path) as sock, a, b:
        relay = pool.proxy(sock, a, close=False)
        # The error ended the proxy although the other direction, reading
        # the idle a, would have waited for ever.
        expect_os_error(relay, errno.ENOTCONN, errno.EINVAL, errno.EPIPE)
        assert relay.bytes_each_way == (0, 0)
        os.fstat(a.fileno())
