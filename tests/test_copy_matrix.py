"""Every byte arrives once and in order: fd kinds x blocking x sizes x paths."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpipe

from conftest import KINDS, Endpoints

SIZES = [0, 1, 32 * 1024 - 1, 32 * 1024, 32 * 1024 + 1, 3 * 1024 * 1024 + 7]


def payload(size: int) -> bytes:
    # Random bytes: a shifted, repeated or dropped chunk cannot compare equal.
    return os.urandom(size)


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_copy_fd_matrix(
    endpoints: Endpoints, src_kind: str, dst_kind: str, size: int, nonblocking: bool, zerocopy: bool
) -> None:
    data = payload(size)
    src = endpoints.source(src_kind, data, nonblocking=nonblocking)
    dst = endpoints.sink(dst_kind, nonblocking=nonblocking)
    assert fastpipe.copy_fd(src.fd, dst.fd, zerocopy=zerocopy) == size
    assert dst.received() == data


def expected_methods(src_kind: str, dst_kind: str, size: int) -> set[str]:
    """The path a relay reports once it has run (docs/design.md: "The kernel paths")."""
    if src_kind == "file" and dst_kind == "file":
        # An empty file: copy_file_range moves nothing on its first call,
        # which is also what procfs does, so read() has the last word.
        return {"copy_file_range"} if size else {"readwrite"}
    if src_kind == "file" and dst_kind in ("unix", "tcp"):
        return {"sendfile"} if size else {"readwrite"}
    if src_kind in ("unix", "tcp"):
        # Read/write until one read brings 64 KiB or more; then splice.
        return {"readwrite", "splice"} if size > 64 * 1024 else {"readwrite"}
    return {"splice"}


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
@pytest.mark.parametrize("size", [0, 32 * 1024 + 1, 3 * 1024 * 1024 + 7])
@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_relay_matrix(
    endpoints: Endpoints,
    src_kind: str,
    dst_kind: str,
    size: int,
    nonblocking: bool,
    zerocopy: bool,
) -> None:
    data = payload(size)
    src = endpoints.source(src_kind, data, nonblocking=nonblocking)
    dst = endpoints.sink(dst_kind, nonblocking=nonblocking)
    relay = fastpipe.relay(src.disown(), dst.disown(), zerocopy=zerocopy)
    assert relay.result(timeout=30) == size
    assert relay.bytes_copied == size
    if zerocopy:
        assert relay.method in expected_methods(src_kind, dst_kind, size)
    else:
        assert relay.method == "readwrite"
    assert dst.received() == data


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("count", [0, 1, 32 * 1024, 100_000])
@pytest.mark.parametrize("src_kind", KINDS)
def test_count_leaves_the_rest_in_the_source(
    endpoints: Endpoints, src_kind: str, count: int, zerocopy: bool
) -> None:
    data = payload(300_000)
    src = endpoints.source(src_kind, data)
    dst = endpoints.sink("pipe")
    assert fastpipe.copy_fd(src.fd, dst.fd, count, zerocopy=zerocopy) == count
    assert dst.received() == data[:count]
    # Not one byte more was taken from the source (file offset included).
    assert src.leftover() == data[count:]


@pytest.mark.parametrize("src_kind", KINDS)
def test_count_beyond_end_of_file_copies_everything(endpoints: Endpoints, src_kind: str) -> None:
    data = payload(50_000)
    src = endpoints.source(src_kind, data)
    dst = endpoints.sink("file")
    assert fastpipe.copy_fd(src.fd, dst.fd, 10 * len(data)) == len(data)
    assert dst.received() == data


def test_file_offsets_advance_like_read_and_write(endpoints: Endpoints) -> None:
    data = payload(200_000)
    src = endpoints.source("file", data)
    dst = endpoints.sink("file")
    os.lseek(src.fd, 1000, os.SEEK_SET)
    os.write(dst.fd, b"head")
    assert fastpipe.copy_fd(src.fd, dst.fd, 5000) == 5000
    assert os.lseek(src.fd, 0, os.SEEK_CUR) == 6000
    assert os.lseek(dst.fd, 0, os.SEEK_CUR) == 5004
    assert fastpipe.copy_fd(src.fd, dst.fd) == len(data) - 6000
    assert dst.received() == b"head" + data[1000:]


def fd_state(fd: int) -> tuple[int, int, int | None]:
    """What a relay must leave as it found it: the status flags (O_NONBLOCK,
    O_APPEND...), FD_CLOEXEC, and a pipe's capacity (never resized)."""
    try:
        pipe_size: int | None = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        pipe_size = None  # not a pipe
    return fcntl.fcntl(fd, fcntl.F_GETFL), fcntl.fcntl(fd, fcntl.F_GETFD), pipe_size


def relay_leaves_fds_as_they_were(
    endpoints: Endpoints, src_kind: str, dst_kind: str, nonblocking: bool, **kwargs: Any
) -> None:
    """Relay 1 MiB plus a bit (so that pipes fill and splice has to wait)
    with ``close=False``; every byte arrives and both fds are as they were."""
    data = payload((1 << 20) + 4093)
    src = endpoints.source(src_kind, data, nonblocking=nonblocking)
    dst = endpoints.sink(dst_kind, nonblocking=nonblocking)
    before = fd_state(src.fd), fd_state(dst.fd)
    relay = fastpipe.relay(src.fd, dst.fd, close=False, **kwargs)
    assert relay.result(timeout=30) == len(data)
    assert (fd_state(src.fd), fd_state(dst.fd)) == before
    assert dst.received() == data


@contextlib.contextmanager
def default_socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@pytest.mark.parametrize("idle_timeout", [None, 60.0], ids=["no-timeout", "idle-timeout"])
@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_a_relay_leaves_the_callers_fds_as_they_were(
    endpoints: Endpoints,
    src_kind: str,
    dst_kind: str,
    nonblocking: bool,
    zerocopy: bool,
    idle_timeout: float | None,
) -> None:
    """Issue 3's pipe -> file target says it outright (no resizing of the
    caller's pipe, no flag left changed); it holds for every pair, and with
    an idle_timeout, whose writes never block."""
    relay_leaves_fds_as_they_were(
        endpoints, src_kind, dst_kind, nonblocking, zerocopy=zerocopy, idle_timeout=idle_timeout
    )


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
@pytest.mark.parametrize(
    ("src_kind", "dst_kind"), [("unix", "tcp"), ("tcp", "unix"), ("pipe", "tcp")]
)
def test_a_default_socket_timeout_changes_nothing(
    endpoints: Endpoints, src_kind: str, dst_kind: str, nonblocking: bool, zerocopy: bool
) -> None:
    """socket.setdefaulttimeout() makes every new socket object set O_NONBLOCK
    on its fd and wait with a timeout in its calls, even one made over an
    existing fd: a relay must neither leave that flag on the caller's fds
    nor behave differently."""
    with default_socket_timeout(0.5):
        relay_leaves_fds_as_they_were(endpoints, src_kind, dst_kind, nonblocking, zerocopy=zerocopy)


@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
def test_a_proxy_under_a_default_socket_timeout_changes_no_flag(nonblocking: bool) -> None:
    """The same for proxy(), whose two workers use the same two fds at once
    and whose half-close goes through a socket object."""
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    for sock in (a, b):
        sock.setblocking(not nonblocking)
    before = fd_state(a.fileno()), fd_state(b.fileno())
    up, down = payload(300_000), payload(200_000)
    got_up, got_down = bytearray(), bytearray()
    try:
        with default_socket_timeout(0.5):
            relay = fastpipe.proxy(a.fileno(), b.fileno(), close=False)
            for peer, data in ((a_peer, up), (b_peer, down)):
                threading.Thread(target=peer.sendall, args=(data,), daemon=True).start()
            while len(got_up) < len(up) or len(got_down) < len(down):
                ready, _, _ = select.select([a_peer, b_peer], [], [], 10)
                assert ready, "nothing arrived for 10 s"
                for peer in ready:
                    (got_down if peer is a_peer else got_up).extend(peer.recv(1 << 20))
            a_peer.shutdown(socket.SHUT_WR)
            b_peer.shutdown(socket.SHUT_WR)
            assert relay.result(timeout=30) == (len(up), len(down))
        assert (fd_state(a.fileno()), fd_state(b.fileno())) == before
        assert (got_up, got_down) == (up, down)
    finally:
        for sock in (a, b, a_peer, b_peer):
            sock.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(min_size=0, max_size=200_000),
    count=st.one_of(st.none(), st.integers(min_value=0, max_value=250_000)),
    zerocopy=st.booleans(),
)
def test_pipe_to_file_any_size_and_count(
    endpoints: Endpoints, data: bytes, count: int | None, zerocopy: bool
) -> None:
    src = endpoints.source("pipe", data)
    dst = endpoints.sink("file")
    expect = data if count is None else data[:count]
    assert fastpipe.copy_fd(src.fd, dst.fd, count, zerocopy=zerocopy) == len(expect)
    assert dst.received() == expect
    assert src.leftover() == data[len(expect) :]
