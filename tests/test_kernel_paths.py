"""The kernel paths: copy_file_range, sendfile and splice, and their fallbacks.

The matrix in test_copy_matrix runs every fd pair on both paths; these tests
cover what the matrix cannot: counts and file offsets on each kernel path,
O_APPEND, procfs, tmpfs <-> disk, a stalled reader, the pipe pool, and small
pipes (the per-user pipe quota).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator

import pytest

import fastpipe
from fastpipe import WorkerPool, _impl

from conftest import (
    KINDS,
    Endpoints,
    blocked_in_syscall,
    close_quietly,
    exit_code_in_child,
    pool_workers,
    read_all,
    recv_all,
    run_job,
    socket_pair,
    tcp_pair,
    wait_for,
    write_all,
)


def payload(size: int) -> bytes:
    return os.urandom(size)


@pytest.mark.parametrize("count", [0, 1, 4095, 65536, 1_000_003])
@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_count_is_exact_on_every_path(
    endpoints: Endpoints, src_kind: str, dst_kind: str, count: int
) -> None:
    data = payload(1_500_000)
    src = endpoints.source(src_kind, data)
    dst = endpoints.sink(dst_kind)
    n, _ = run_job(src.fd, dst.fd, count)
    assert n == count
    assert dst.received() == data[:count]
    # Not one byte more left the source: the rest is still there to read.
    assert src.leftover() == data[count:]


@pytest.mark.parametrize("dst_kind", ["file", "pipe", "unix", "tcp"])
def test_file_offsets_advance_exactly_on_kernel_paths(endpoints: Endpoints, dst_kind: str) -> None:
    """copy_file_range, sendfile and splice all use and move the fd's offset."""
    data = payload(300_000)
    src = endpoints.source("file", data)
    dst = endpoints.sink(dst_kind)
    os.lseek(src.fd, 777, os.SEEK_SET)
    n, method = run_job(src.fd, dst.fd, 100_000)
    assert n == 100_000
    assert method == {"file": "copy_file_range", "pipe": "splice"}.get(dst_kind, "sendfile")
    assert os.lseek(src.fd, 0, os.SEEK_CUR) == 100_777
    if dst_kind == "file":
        assert os.lseek(dst.fd, 0, os.SEEK_CUR) == 100_000
    n, _ = run_job(src.fd, dst.fd)
    assert n == len(data) - 100_777
    assert dst.received() == data[777:]


@pytest.mark.parametrize("src_kind", KINDS)
def test_an_o_append_destination_gets_appended_to(endpoints: Endpoints, src_kind: str) -> None:
    data = payload(200_000)
    src = endpoints.source(src_kind, data)
    path = os.path.join(endpoints.tmp_path, "appended")
    with open(path, "wb") as f:
        f.write(b"existing head\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores this for every write
        n, method = run_job(src.fd, fd)
    finally:
        os.close(fd)
    assert n == len(data)
    assert method == "readwrite"
    with open(path, "rb") as f:
        assert f.read() == b"existing head\n" + data


@pytest.mark.parametrize(
    "path",
    [
        "/proc/self/cmdline",
        "/proc/version",
        "/proc/filesystems",
        "/sys/devices/system/cpu/possible",
    ],
)
@pytest.mark.parametrize("dst_kind", ["file", "pipe", "unix"])
def test_a_procfs_or_sysfs_source_is_copied_whole(
    endpoints: Endpoints, path: str, dst_kind: str
) -> None:
    """These report size 0, and copy_file_range moves nothing: never stop there."""
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with open(path, "rb") as f:
        expected = f.read()
    assert expected, "the test needs a non-empty file"
    fd = os.open(path, os.O_RDONLY)
    dst = endpoints.sink(dst_kind)
    try:
        n, _ = run_job(fd, dst.fd)
    finally:
        os.close(fd)
    assert dst.received() == expected
    assert n == len(expected)


def _tmpfs_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.mark.parametrize("direction", ["tmpfs->disk", "disk->tmpfs"])
def test_tmpfs_and_disk_copy_across_filesystems(tmp_path: os.PathLike[str], direction: str) -> None:
    """copy_file_range across filesystems is EXDEV on some kernels: fall back."""
    shm = _tmpfs_dir()
    if shm is None:
        pytest.skip("no writable tmpfs at /dev/shm")
    disk = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(__file__)))
    try:
        dirs = (shm, disk) if direction == "tmpfs->disk" else (disk, shm)
        data = payload(3_000_001)
        src_path = os.path.join(dirs[0], f"fastpipe-src-{os.getpid()}")
        dst_path = os.path.join(dirs[1], f"fastpipe-dst-{os.getpid()}")
        with open(src_path, "wb") as f:
            f.write(data)
        src = os.open(src_path, os.O_RDONLY)
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            n, method = run_job(src, dst)
        finally:
            os.close(src)
            os.close(dst)
        with open(dst_path, "rb") as f:
            assert f.read() == data
        assert n == len(data)
        assert method in ("copy_file_range", "sendfile")
        print(f"{direction}: {method}")
    finally:
        for p in (src_path, dst_path):
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(disk)


def thread_cpu_ns(thread: threading.Thread) -> int:
    """Nanoseconds ``thread`` has run on a CPU (the scheduler's own count)."""
    with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
        return int(f.read().split()[0])


def test_a_full_destination_pipe_waits_without_spinning(poller_at_rest: None) -> None:
    """A reader that stalls: the copy must park, not loop on EAGAIN.

    Go had both bugs (issues 68303 and 75304).  The worker's own CPU time
    shows a spin, and a worker with nothing to run but the poll for its
    parked relay gets none, however busy the machine: not one nanosecond in
    half a second.
    """
    data = payload(8 << 20)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    os.set_blocking(dst_w, False)  # EAGAIN from the sink, the tempting case
    feeder = threading.Thread(target=write_all, args=(src_w, data, True), daemon=True)
    feeder.start()
    with WorkerPool() as pool:
        relay = pool.relay(src_r, dst_w)
        try:
            (worker,) = pool_workers(pool)
            sink_size = fcntl.fcntl(dst_w, fcntl.F_GETPIPE_SZ)

            def parked() -> bool:
                # The worker asleep while the sink is full and the feeder
                # sleeps in its write (so the source is full too).  Read one
                # after the other, these can still catch a worker just woken
                # from the source, not yet run: hence the retries below.
                return (
                    blocked_in_syscall(worker.native_id)
                    and blocked_in_syscall(feeder.native_id)
                    and readable_bytes(dst_r) == sink_size
                )

            # A spin spends CPU in every half second; a parked worker spends
            # none in the first one that starts after it has settled.
            spent = []
            for _ in range(10):
                wait_for(parked, timeout=30)
                cpu0 = thread_cpu_ns(worker)
                time.sleep(0.5)  # nobody reads: the relay is parked
                spent.append(thread_cpu_ns(worker) - cpu0)
                if spent[-1] == 0:
                    break
            assert spent[-1] == 0, f"the worker ran in every half second while parked: {spent} ns"
            got = read_all(dst_r)
            assert relay.result(timeout=30) == len(data)
            assert got == data
            assert relay.method == "splice"
        finally:
            feeder.join(10)
            os.close(dst_r)


@pytest.fixture
def splice_at_once() -> Iterator[None]:
    """A socket source splices from its first byte.

    Normally it starts on read/write and moves to splice once one read
    brings 64 KiB, which depends on how far the sender is ahead of the
    relay: tests about the pooled pipe must not (the move itself has
    test_a_socket_source_moves_to_splice_for_bulk_data).
    """
    old = _impl._set_splice_min_read(0)
    try:
        yield
    finally:
        _impl._set_splice_min_read(old)


def _socket_relay_through_pipe(size: int) -> tuple[bytes, bytes, str]:
    """TCP -> TCP through the pipe pool; returns (sent, received, method)."""
    a_out, a_in = tcp_pair()  # the relay reads a_in
    b_in, b_out = tcp_pair()  # the relay writes b_in
    data = payload(size)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(b_out)), daemon=True)
    reader.start()
    relay = fastpipe.relay(a_in, b_in)
    a_out.sendall(data)
    a_out.close()
    relay.result(timeout=30)
    reader.join(30)
    b_out.close()
    return data, got[0], str(relay.method)


@pytest.mark.usefixtures("splice_at_once")
@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_relay_on_an_idle_connection_holds_no_pipe(kind: str, nonblocking: bool) -> None:
    """Between bursts a socket relay parks without its pooled pipe (docs/design.md:
    "An idle connection therefore holds no pipe"), or a proxy's thousand idle
    connections would hold a thousand 1 MiB pipes against the per-user quota.
    A blocking source socket matters most: accept() returns one, and a
    blocking socket ignores SPLICE_F_NONBLOCK."""
    src_out, src_in = socket_pair(kind)  # the relay reads src_in
    dst_in, dst_out = socket_pair(kind)  # the relay writes dst_in
    src_in.setblocking(not nonblocking)
    relay = fastpipe.relay(src_in, dst_in)
    sent = bytearray()
    got = bytearray()
    try:
        for burst in range(3):
            data = payload(2 << 20)
            sent += data
            threading.Thread(target=src_out.sendall, args=(data,), daemon=True).start()
            while len(got) < len(sent):
                got += dst_out.recv(1 << 20)
            assert relay.method == "splice"
            # Once it has written everything out, it parks and gives the
            # pipe back: a relay that kept it would fail here.
            deadline = time.monotonic() + 30
            while fastpipe.pipe_stats()["in_use"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert fastpipe.pipe_stats()["in_use"] == 0, f"burst {burst}: parked with a pipe"
        src_out.shutdown(socket.SHUT_WR)
        assert relay.result(timeout=10) == len(sent)
        got += recv_all(dst_out)
        assert got == sent
    finally:
        relay.cancel()
        src_out.close()
        dst_out.close()


@pytest.mark.usefixtures("splice_at_once")
def test_pipes_are_pooled_and_reused() -> None:
    fastpipe.trim_pipes()
    sent, got, method = _socket_relay_through_pipe(4 << 20)
    assert got == sent and method == "splice"
    created = fastpipe.pipe_stats()["created"]
    for _ in range(5):
        sent, got, _ = _socket_relay_through_pipe(2 << 20)
        assert got == sent
    stats = fastpipe.pipe_stats()
    assert stats["created"] == created, "sequential relays should reuse one pipe"
    assert stats["in_use"] == 0 and stats["free"] >= 1
    assert stats["allocated"] == stats["free"] + stats["in_use"]
    assert fastpipe.trim_pipes() == stats["free"]
    assert fastpipe.pipe_stats()["free"] == 0


@pytest.mark.usefixtures("splice_at_once")
def test_a_pipe_with_bytes_left_inside_is_closed_not_pooled() -> None:
    """The sink dies mid-stream: whatever is in the pipe must not reach the
    next relay that takes a pooled pipe."""
    fastpipe.trim_pipes()
    a_out, a_in = tcp_pair()
    b_in, b_out = tcp_pair()
    relay = fastpipe.relay(a_in, b_in)
    stop = threading.Event()

    def feed() -> None:
        chunk = b"\xee" * (1 << 20)
        try:
            while not stop.is_set():
                a_out.sendall(chunk)
        except OSError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    deadline = time.monotonic() + 10
    while relay.method != "splice" or relay.bytes_copied < (4 << 20):
        assert time.monotonic() < deadline
        b_out.recv(1 << 20)
    # Reset the sink with data in flight: the pipe may hold some of it.
    b_out.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    b_out.close()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        relay.result(timeout=10)
    stop.set()
    a_out.close()
    feeder.join(10)
    stats = fastpipe.pipe_stats()
    assert stats["in_use"] == 0
    # The next relay gets a clean pipe: exactly its own bytes arrive.
    sent, got, _ = _socket_relay_through_pipe(3 << 20)
    assert got == sent


@pytest.fixture
def small_pipes() -> Iterator[None]:
    """Pipes of one page, as an exhausted pipe-user-pages-soft quota leaves them."""
    _impl._set_pipe_size(4096)
    try:
        yield
    finally:
        _impl._set_pipe_size(1 << 20)


@pytest.mark.usefixtures("small_pipes")
@pytest.mark.parametrize("pair", [("tcp", "tcp"), ("unix", "file"), ("pipe", "file")])
def test_small_pipes_still_copy_every_byte(endpoints: Endpoints, pair: tuple[str, str]) -> None:
    data = payload(3_000_017)
    src = endpoints.source(pair[0], data)
    dst = endpoints.sink(pair[1])
    n, _ = run_job(src.fd, dst.fd)
    assert n == len(data)
    assert dst.received() == data
    assert fastpipe.pipe_stats()["pipe_size"] == 4096


def test_pipe_stats_keys() -> None:
    stats = fastpipe.pipe_stats()
    assert set(stats) == {
        "pipe_size",
        "allocated",
        "free",
        "in_use",
        "peak",
        "max_free",
        "created",
        "small",
    }
    assert stats["pipe_size"] == 1 << 20


def test_zerocopy_false_never_splices(endpoints: Endpoints) -> None:
    data = payload(2_000_000)
    src = endpoints.source("tcp", data)
    dst = endpoints.sink("tcp")
    created = fastpipe.pipe_stats()["created"]
    n, method = run_job(src.fd, dst.fd, zerocopy=False)
    assert (n, method) == (len(data), "readwrite")
    assert dst.received() == data
    assert fastpipe.pipe_stats()["created"] == created


def test_a_socket_source_moves_to_splice_for_bulk_data(endpoints: Endpoints) -> None:
    # 64 KiB or more waits in the socket before the copy starts, so the
    # first read (of 64 KiB) is large.
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    data = payload(1 << 20)
    t = threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)))
    t.start()
    dst = endpoints.sink("file")
    try:
        wait_for(lambda: readable_bytes(b) >= 64 * 1024)
        n, method = run_job(b.fileno(), dst.fd)
    finally:
        t.join(10)
        a.close()
        b.close()
    assert n == len(data)
    assert method == "splice"
    assert dst.received() == data


def readable_bytes(end: socket.socket | int) -> int:
    """How many bytes wait in a socket's receive queue or a pipe (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(end, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def test_closed_read_end_is_a_broken_pipe_on_splice() -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(r and w, b"x" * 1000)
    os.close(w)
    os.close(out_r)
    try:
        with pytest.raises(BrokenPipeError):
            run_job(r, out_w)
    finally:
        close_quietly(r)
        close_quietly(out_w)


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("src_kind", ["pipe", "file"])
def test_a_sink_that_is_read_only_afterwards_does_not_hang(
    endpoints: Endpoints, src_kind: str, zerocopy: bool
) -> None:
    """The main thread polls a blocking sink before a splice or sendfile (so
    that Ctrl-C works), but never at end of file: a unix socket reports
    POLLOUT only while a quarter of its buffer is free, and here its reader
    only reads once copy_fd has returned."""
    a, b = socket.socketpair()
    try:
        sndbuf = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        data = payload(sndbuf // 2)  # fits, yet leaves the socket unwritable
        if src_kind == "pipe":
            r, w = os.pipe()
            os.write(w, data[:32768])
            writer = threading.Thread(target=write_all, args=(w, data[32768:], True))
            writer.start()
            try:
                n, method = run_job(r, a.fileno(), zerocopy=zerocopy)
            finally:
                writer.join(10)
                os.close(r)
        else:
            src = endpoints.source("file", data)
            n, method = run_job(src.fd, a.fileno(), zerocopy=zerocopy)
        assert n == len(data)
        if zerocopy:
            assert method == ("splice" if src_kind == "pipe" else "sendfile")
        a.shutdown(socket.SHUT_WR)
        assert recv_all(b) == data
    finally:
        a.close()
        b.close()


def test_a_forked_child_gets_its_own_pipes() -> None:
    """A pooled pipe is shared with a child after fork(): using it from both
    processes would mix their bytes.  The child closes its copies and starts
    a new pool; the parent's stays as it was."""
    sent, got, _ = _socket_relay_through_pipe(2 << 20)
    assert got == sent
    before = fastpipe.pipe_stats()
    assert before["free"] >= 1

    def child() -> bool:
        stats = fastpipe.pipe_stats()
        fresh = stats["allocated"] == 0 and stats["in_use"] == 0
        s, g, method = _socket_relay_through_pipe(1 << 20)
        return fresh and s == g and method == "splice"

    assert exit_code_in_child(child) == 0
    assert fastpipe.pipe_stats()["free"] == before["free"]
    sent, got, _ = _socket_relay_through_pipe(1 << 20)
    assert got == sent


@pytest.fixture
def comm_sink() -> Iterator[int]:
    """A sink that refuses splice: procfs files have no splice_write (EINVAL).

    /proc/thread-self/comm takes any write and keeps its first 15 bytes as
    this thread's name, which is restored afterwards.
    """
    with open("/proc/thread-self/comm", "rb") as f:
        name = f.read()
    fd = os.open("/proc/thread-self/comm", os.O_WRONLY)
    try:
        yield fd
    finally:
        os.close(fd)
        with open("/proc/thread-self/comm", "wb") as f:
            f.write(name)


def test_a_sink_that_refuses_splice_gets_the_pipe_contents_by_write(comm_sink: int) -> None:
    """The first splice leg filled our pipe, the second is refused: the bytes
    already in the pipe go out by write(), then the copy goes on by
    read/write; nothing lost, nothing repeated."""
    pattern = b"0123456789abcdef"
    data = pattern * 8192  # 128 KiB
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    old = _impl._set_splice_min_read(0)  # splice from the first byte
    try:
        n, method = run_job(b.fileno(), comm_sink)
    finally:
        _impl._set_splice_min_read(old)
        a.close()
        b.close()
    assert n == len(data)
    assert method == "readwrite"
    with open("/proc/thread-self/comm", "rb") as f:
        name = f.read().rstrip(b"\n")
    assert len(name) == 15 and name in pattern * 2  # the start of some write


def test_file_to_a_sink_that_refuses_both_kernel_paths(
    endpoints: Endpoints, comm_sink: int
) -> None:
    """copy_file_range, then sendfile, refuse; read/write does the copy."""
    data = b"0123456789abcdef" * 4096
    src = endpoints.source("file", data)
    n, method = run_job(src.fd, comm_sink)
    assert (n, method) == (len(data), "readwrite")
