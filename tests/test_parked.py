"""The contract's promises for a parked relay: one waiting for its fds in the
pool's poller, holding no thread, no buffer and no pipe.

Each test first waits until the pool says the relay is parked, so that what
follows happens to a parked relay and not to one still starting.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator

import pytest

import fastpipe
from fastpipe import WorkerPool

from conftest import exit_code_in_child, is_closed, wait_for


def parked(pool: WorkerPool, n: int = 1) -> None:
    wait_for(lambda: pool.stats()["parked"] == n and pool.stats()["busy"] == 0)


def test_a_parked_relay_is_running_and_holds_nothing() -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    with WorkerPool() as pool:
        relay = pool.relay(r, out_w)
        parked(pool)
        assert relay.running() and not relay.done()
        assert fastpipe.buffer_stats()["in_use"] == 0
        assert fastpipe.pipe_stats()["in_use"] == 0
        os.write(w, b"wakes it")
        assert os.read(out_r, 100) == b"wakes it"
        parked(pool)
        os.close(w)
        assert relay.result(timeout=10) == 8
    os.close(out_r)


@pytest.mark.parametrize("zerocopy", [True, False], ids=["splice", "readwrite"])
def test_count_is_exact_across_parks(zerocopy: bool) -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    with WorkerPool() as pool:
        relay = pool.relay(r, out_w, count=10, close=False, zerocopy=zerocopy)
        parked(pool)
        os.write(w, b"0123")
        wait_for(lambda: relay.bytes_copied == 4)
        parked(pool)
        os.write(w, b"456789abcd")
        assert relay.result(timeout=10) == 10
    assert os.read(out_r, 100) == b"0123456789"
    # Nothing past the count was read: the rest is still in the source.
    assert os.read(r, 100) == b"abcd"
    for fd in (r, w, out_r, out_w):
        os.close(fd)


def test_idle_timeout_fires_for_a_parked_relay() -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    with WorkerPool() as pool:
        relay = pool.relay(r, out_w, idle_timeout=0.2)
        with pytest.raises(TimeoutError):
            relay.result(timeout=30)
        assert is_closed(r) and is_closed(out_w)
        assert pool.stats()["parked"] == 0
    os.close(w)
    os.close(out_r)


def test_cancel_stops_a_parked_relay_and_closes_its_ends() -> None:
    a, a_peer = socket.socketpair()
    out_r, out_w = os.pipe()
    with WorkerPool(max_workers=1) as pool:
        relay = pool.relay(a, out_w)
        parked(pool)
        assert relay.cancel()
        assert relay.cancelled()
        assert a.fileno() == -1 and is_closed(out_w)
        assert pool.stats()["parked"] == 0
        assert a_peer.recv(10) == b""
    a_peer.close()
    os.close(out_r)


def test_the_callers_fd_flags_are_left_as_they_were() -> None:
    r, w = os.pipe()
    a, a_peer = socket.socketpair()
    with WorkerPool() as pool:
        relay = pool.relay(r, a, close=False)
        parked(pool)
        # Parked on a read, then on a full socket: neither fd was switched
        # to O_NONBLOCK for it.
        assert os.get_blocking(r) and a.getblocking()
        os.write(w, b"x" * 100_000)
        wait_for(lambda: relay.bytes_copied > 0)
        parked(pool)
        assert os.get_blocking(r) and a.getblocking()
        got = b""
        while len(got) < 100_000:
            got += a_peer.recv(1 << 20)
        assert got == b"x" * 100_000
        assert relay.cancel()
    assert os.get_blocking(r) and a.getblocking()
    for fd in (r, w):
        os.close(fd)
    a.close()
    a_peer.close()


def test_a_proxy_parked_both_ways_half_closes_and_ends() -> None:
    client, a = socket.socketpair()
    b, server = socket.socketpair()
    with WorkerPool(max_workers=1) as pool:
        relay = pool.proxy(a, b)
        parked(pool, 2)
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        assert server.recv(100) == b"request"
        assert server.recv(100) == b""  # the half-close came through
        server.sendall(b"reply")
        server.shutdown(socket.SHUT_WR)
        assert relay.result(timeout=10) == (7, 5)
        assert client.recv(100) == b"reply"
    for sock in (client, server):
        sock.close()


def led(pool: WorkerPool, n: int) -> None:
    """n copies parked and every worker idle: one of them is the leader,
    polling for them (none runs a copy to come back to it)."""
    wait_for(
        lambda: (s := pool.stats())["parked"] == n and s["busy"] == 0 and s["idle"] == s["workers"]
    )


@contextlib.contextmanager
def pool_with_a_leader() -> Iterator[WorkerPool]:
    """A pool whose worker leads, polling for a relay parked on an empty pipe.

    What is left is cancelled on the way out: a failed check must not leave
    shutdown() waiting for parked relays that never end.
    """
    r, w = os.pipe()
    pool = WorkerPool()
    try:
        waiting = pool.relay(r, os.open(os.devnull, os.O_WRONLY))
        led(pool, 1)
        yield pool
        os.close(w)
        w = -1
        assert waiting.result(timeout=10) == 0
    finally:
        if w >= 0:
            os.close(w)
        pool.shutdown(cancel_relays=True)


def test_a_new_proxys_idle_directions_park_in_proxy_itself() -> None:
    """With a leader polling, a direction with nothing to read goes straight
    to the poller: no worker is woken to find its socket empty."""
    client, a = socket.socketpair()
    b, server = socket.socketpair()
    late_client, late_a = socket.socketpair()
    late_b, late_server = socket.socketpair()
    with pool_with_a_leader() as pool:
        relay = pool.proxy(a, b)
        # Both parked by the time proxy() returns, not by a worker later:
        # parked, it is running, as any parked relay is.
        assert pool.stats()["parked"] == 3
        assert pool.stats()["queued"] == 0
        assert relay.running()
        # A direction with bytes waiting runs; the other one parks.
        late_client.sendall(b"early")
        late = pool.proxy(late_a, late_b)
        assert late_server.recv(100) == b"early"
        late_server.sendall(b"reply")
        assert late_client.recv(100) == b"reply"
        # The parked ones wake when their bytes come, in order, both ways.
        data = os.urandom(200_000)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        got = bytearray()
        while len(got) < len(data):
            got += server.recv(65536)
        assert got == data
        assert server.recv(10) == b""
        server.sendall(data[::-1])
        server.shutdown(socket.SHUT_WR)
        assert relay.result(timeout=10) == (len(data), len(data))
        back = bytearray()
        while chunk := client.recv(65536):
            back += chunk
        assert back == data[::-1]
        for sock in (late_client, late_server):
            sock.shutdown(socket.SHUT_WR)
        assert late.result(timeout=10) == (5, 5)
    for sock in (client, server, late_client, late_server):
        sock.close()


def test_a_proxy_parked_in_proxy_itself_is_cancelled_at_once() -> None:
    """Parked before either direction ran: cancel() ends it in the calling
    thread, closes its ends, and leaves the poller clean for the fd numbers
    that come next."""
    client, a = socket.socketpair()
    b, server = socket.socketpair()
    with pool_with_a_leader() as pool:
        relay = pool.proxy(a, b)
        assert pool.stats()["parked"] == 3
        assert relay.cancel() and relay.cancelled()
        assert relay.bytes_each_way == (0, 0)
        assert a.fileno() == -1 and b.fileno() == -1
        assert pool.stats()["parked"] == 1
        assert client.recv(10) == b"" and server.recv(10) == b""
        # New sockets take the freed fd numbers: they park and proxy as any.
        client2, a2 = socket.socketpair()
        b2, server2 = socket.socketpair()
        again = pool.proxy(a2, b2)
        client2.sendall(b"again")
        client2.shutdown(socket.SHUT_WR)
        assert server2.recv(10) == b"again"
        server2.shutdown(socket.SHUT_WR)
        assert again.result(timeout=10) == (5, 0)
        for sock in (client2, server2):
            sock.close()
    client.close()
    server.close()


@pytest.mark.parametrize("end", ["listening", "pipe write end"])
def test_a_new_proxy_whose_source_cannot_be_read_fails_and_does_not_park(end: str) -> None:
    """poll() finds a listening socket, and a pipe's write end, not readable,
    as it finds an idle one; they fail at their first read instead."""
    a, a_peer = socket.socketpair()
    with pool_with_a_leader() as pool:
        if end == "listening":
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            relay = pool.proxy(listener, a)
            errnos = (errno.ENOTCONN, errno.EINVAL, errno.EPIPE)
        else:
            pr, pw = os.pipe()
            relay = pool.proxy((pw, pr), a)
            errnos = (errno.EBADF,)
        exc = relay.exception(timeout=10)
        assert isinstance(exc, OSError) and exc.errno in errnos, exc
    a_peer.close()


def test_a_relay_parks_in_a_forked_child() -> None:
    def child() -> bool:
        r, w = os.pipe()
        out_r, out_w = os.pipe()
        pool = fastpipe.default_pool()
        relay = fastpipe.relay(r, out_w)
        parked(pool)
        os.write(w, b"from the child")
        os.close(w)
        return relay.result(timeout=10) == 14 and os.read(out_r, 100) == b"from the child"

    assert exit_code_in_child(child) == 0


def test_a_child_leaves_its_parents_parked_relay_alone() -> None:
    """After fork() the parent's parked relay is the parent's: in the child
    cancel() touches nothing of it (False), and the parent's relay goes on."""
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    pool = fastpipe.default_pool()
    relay = fastpipe.relay(r, out_w, close=False)

    def child() -> bool:
        refused = relay.cancel() is False and not relay.done()
        # The child's own pool still works.
        r2, w2 = os.pipe()
        out2_r, out2_w = os.pipe()
        mine = fastpipe.relay(r2, out2_w)
        os.write(w2, b"child")
        os.close(w2)
        return refused and mine.result(timeout=10) == 5 and os.read(out2_r, 100) == b"child"

    try:
        parked(pool)
        assert exit_code_in_child(child) == 0
        os.write(w, b"parent")
        os.close(w)
        w = -1
        assert relay.result(timeout=30) == 6
        assert os.read(out_r, 100) == b"parent"
    finally:
        relay.cancel()
        for fd in (r, w, out_r, out_w):
            if fd >= 0:
                os.close(fd)
