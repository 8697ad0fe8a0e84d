"""A relay's life: cancel while queued or running, asyncio, and pool limits with proxies."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time

import pytest

import fastpipe
from fastpipe import Relay, WorkerPool

from conftest import held_relay, is_closed, tcp_pair, wait_for, wait_until_a_worker_blocks

# The contract asks a cancel to stop a copy within 100 ms: a latency, which
# a busy machine stretches (bench/test_bench_latency.py measures it).  What
# a test can check on any machine is that cancel() stops the copy, where it
# would otherwise wait for the idle fd for ever: the bound is that, generous.
CANCEL_BOUND = 10.0


def drain_in_thread(fd: int) -> tuple[threading.Thread, list[bytes]]:
    """Read ``fd`` to end of file in a thread, then close it."""
    chunks: list[bytes] = []

    def run() -> None:
        try:
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    return t, chunks


def timed_cancel(relay: Relay) -> float:
    start = time.perf_counter()
    assert relay.cancel()
    return time.perf_counter() - start


def check_cancelled(relay: Relay) -> None:
    assert relay.cancelled()
    assert relay.done()
    assert not relay.running()
    with pytest.raises(concurrent.futures.CancelledError):
        relay.result(timeout=0)
    # Moved on to CANCELLED_AND_NOTIFIED: wait() and as_completed() see it.
    done, _ = concurrent.futures.wait([relay], timeout=0)
    assert done == {relay}


# -- cancel a running relay ---------------------------------------------------


def test_cancel_relay_blocked_on_an_idle_pipe() -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    drainer, received = drain_in_thread(out_r)
    relay = fastpipe.relay(r, out_w)
    os.write(w, b"before the cancel")
    wait_for(lambda: relay.bytes_copied == 17)
    called: list[bool] = []
    relay.add_done_callback(lambda f: called.append(f.cancelled()))
    elapsed = timed_cancel(relay)
    assert elapsed < CANCEL_BOUND
    # Returned once the copy had stopped: ends closed, callbacks run.
    assert called == [True]
    assert is_closed(r) and is_closed(out_w)
    check_cancelled(relay)
    drainer.join(10)
    assert b"".join(received) == b"before the cancel"
    assert relay.bytes_copied == 17
    os.close(w)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_cancel_relay_blocked_on_an_idle_socket(family: str) -> None:
    if family == "tcp":
        peer, sock = tcp_pair()
    else:
        peer, sock = socket.socketpair()
    out_r, out_w = os.pipe()
    drainer, received = drain_in_thread(out_r)
    relay = fastpipe.relay(sock, out_w)
    wait_for(relay.running)
    wait_until_a_worker_blocks()  # in poll on the idle socket
    assert timed_cancel(relay) < CANCEL_BOUND
    check_cancelled(relay)
    assert sock.fileno() == -1
    assert is_closed(out_w)
    assert peer.recv(10) == b""  # the proxy side is really closed
    drainer.join(10)
    assert received == []
    peer.close()


def test_cancel_relay_blocked_writing_to_a_full_socket() -> None:
    peer, sock = tcp_pair()  # the peer does not read, at first
    src = os.open("/dev/zero", os.O_RDONLY)
    relay = fastpipe.relay(src, sock)
    wait_for(lambda: relay.bytes_copied > 0)
    wait_until_a_worker_blocks()  # the socket buffers are full: blocked on write
    elapsed: list[float] = []
    canceller = threading.Thread(target=lambda: elapsed.append(timed_cancel(relay)))
    canceller.start()
    canceller.join(CANCEL_BOUND)
    stuck = canceller.is_alive()
    received = 0
    while chunk := peer.recv(1 << 20):  # unblocks a stuck writer; EOF once closed
        received += len(chunk)
    canceller.join(10)
    check_cancelled(relay)
    assert sock.fileno() == -1 and is_closed(src)
    assert received == relay.bytes_copied  # exact: nothing lost or invented
    peer.close()
    assert not stuck, "cancel() did not stop a worker blocked writing"
    assert elapsed[0] < CANCEL_BOUND


def test_cancel_mid_stream_leaves_an_exact_prefix() -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    drainer, received = drain_in_thread(out_r)
    block = bytes(range(256)) * 256  # 64 KiB, position-dependent content
    fed: list[int] = [0]

    def feed() -> None:
        try:
            while True:
                fed[0] += os.write(w, block)
        except OSError:
            pass  # the relay closed the read end: EPIPE

    feeder = threading.Thread(target=feed)
    feeder.start()
    relay = fastpipe.relay(r, out_w)
    wait_for(lambda: relay.bytes_copied > 4 * 1024 * 1024)
    assert timed_cancel(relay) < CANCEL_BOUND
    check_cancelled(relay)
    copied = relay.bytes_copied
    drainer.join(10)
    feeder.join(10)
    data = b"".join(received)
    assert len(data) == copied
    assert copied <= fed[0]
    whole, rest = divmod(copied, len(block))
    assert data == block * whole + block[:rest]
    assert relay.bytes_copied == copied  # it does not move after the cancel
    os.close(w)


def test_cancel_with_close_false_leaves_the_ends_open() -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    relay = fastpipe.relay(r, out_w, close=False)
    wait_for(relay.running)
    assert relay.cancel()
    check_cancelled(relay)
    # Still usable: nothing was read ahead and lost.
    os.write(w, b"later")
    assert os.read(r, 10) == b"later"
    for fd in (r, w, out_r, out_w):
        os.close(fd)


def test_cancel_after_the_end_returns_false_and_keeps_the_result() -> None:
    r, w = os.pipe()
    relay = fastpipe.relay(r, os.open(os.devnull, os.O_WRONLY))
    os.write(w, b"abc")
    os.close(w)
    assert relay.result(timeout=10) == 3
    assert not relay.cancel()
    assert relay.result() == 3


def test_cancel_twice() -> None:
    r, w = os.pipe()
    relay = fastpipe.relay(r, os.open(os.devnull, os.O_WRONLY))
    wait_for(relay.running)
    assert relay.cancel()
    assert relay.cancel()  # already cancelled: True, as Future.cancel says
    check_cancelled(relay)
    os.close(w)


def test_cancel_a_proxy() -> None:
    client, a = tcp_pair()
    b, server = tcp_pair()
    relay = fastpipe.proxy(a, b)
    client.sendall(b"half a request")
    assert server.recv(100) == b"half a request"
    wait_until_a_worker_blocks()  # parked on the idle connection
    assert timed_cancel(relay) < CANCEL_BOUND
    check_cancelled(relay)
    assert relay.bytes_copied == 14
    assert a.fileno() == -1 and b.fileno() == -1
    assert client.recv(10) == b"" and server.recv(10) == b""
    client.close()
    server.close()


def test_cancel_from_a_done_callback_does_not_deadlock() -> None:
    """Callbacks run in a completion thread, which must not wait for itself."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    first = fastpipe.relay(r1, os.open(os.devnull, os.O_WRONLY))
    second = fastpipe.relay(r2, os.open(os.devnull, os.O_WRONLY))
    answers: list[bool] = []
    first.add_done_callback(lambda _f: answers.append(second.cancel()))
    try:
        wait_for(second.running)
        os.close(w1)
        assert first.result(timeout=10) == 0
        with pytest.raises(concurrent.futures.CancelledError):
            second.result(timeout=10)
        # second's future can end (in this thread, which helps with
        # completions) before cancel() has returned in the callback's thread.
        wait_for(lambda: bool(answers))
        assert answers == [True]
    finally:
        os.close(w2)


def test_cancel_queued_proxies_behind_a_held_worker() -> None:
    pairs = [socket.socketpair() for _ in range(4)]
    with WorkerPool(max_workers=1) as pool:
        holder, held = held_relay(pool)
        try:
            assert held.flushing.wait(10)
            first = pool.proxy(pairs[0][0], pairs[1][0])
            second = pool.proxy(pairs[2][0], pairs[3][0])
            # Both directions of both proxies wait for the one worker.
            assert pool.stats()["queued"] == 4
            assert second.cancel()
            check_cancelled(second)
            assert pool.stats()["queued"] == 2
            assert first.cancel()
            check_cancelled(first)
            for sock, _ in pairs:
                assert sock.fileno() == -1
            assert pool.stats()["queued"] == 0
        finally:
            held.release()
            for sock, peer in pairs:
                sock.close()
                peer.close()
        assert holder.result(timeout=10) == 0


# -- asyncio --------------------------------------------------------------------


def test_await_relay_does_not_block_the_loop() -> None:
    async def main() -> tuple[int, int]:
        r, w = os.pipe()
        relay = fastpipe.relay(r, os.open(os.devnull, os.O_WRONLY))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        def finish() -> None:
            os.write(w, b"x" * 1000)
            os.close(w)

        tick_task = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(0.3, finish)
        copied = await relay
        tick_task.cancel()
        return copied, ticks

    copied, ticks = asyncio.run(main())
    assert copied == 1000
    assert ticks >= 5  # the loop ran other tasks while the relay copied


def test_await_proxy_and_asyncio_done_callbacks() -> None:
    async def main() -> tuple[tuple[int, int], list[str]]:
        client, a = tcp_pair()
        b, server = tcp_pair()
        relay = fastpipe.proxy(a, b)
        seen: list[str] = []
        loop_thread = threading.get_ident()
        wrapped = asyncio.wrap_future(relay)
        wrapped.add_done_callback(
            lambda _f: seen.append("loop" if threading.get_ident() == loop_thread else "?")
        )
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, server.recv, 10) == b"ping"
        server.sendall(b"pong!")
        server.close()
        result = await wrapped
        assert client.recv(10) == b"pong!"
        client.close()
        await asyncio.sleep(0)  # the callback runs soon after the result
        return result, seen

    result, seen = asyncio.run(main())
    assert result == (4, 5)
    assert seen == ["loop"]


def test_cancelling_the_awaiting_task_cancels_the_relay() -> None:
    """asyncio.wrap_future propagates the cancellation: the relay stops."""
    r, w = os.pipe()

    async def main() -> Relay:
        relay = fastpipe.relay(r, os.open(os.devnull, os.O_WRONLY))

        async def waiter() -> int:
            return await relay

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the propagation is a callback on the loop
            if relay.done():
                break
            await asyncio.sleep(0.005)
        return relay

    relay = asyncio.run(main())
    check_cancelled(relay)
    assert is_closed(r)
    os.close(w)


def test_wait_for_timeout_cancels_the_relay() -> None:
    r, w = os.pipe()

    async def main() -> Relay:
        relay = fastpipe.relay(r, os.open(os.devnull, os.O_WRONLY))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(relay, timeout=0.1)  # type: ignore[arg-type]
        return relay

    relay = asyncio.run(main())
    wait_for(relay.done)
    check_cancelled(relay)
    os.close(w)


# -- pool limits with proxies -----------------------------------------------------


def test_one_worker_serves_many_proxies_both_ways() -> None:
    """max_workers bounds threads, not connections: a direction that waits
    parks and gives the worker to the next one."""
    conns = []
    with WorkerPool(max_workers=1) as pool:
        try:
            for _ in range(8):
                client, a = socket.socketpair()
                b, server = socket.socketpair()
                conns.append((client, a, b, server, pool.proxy(a, b)))
            wait_for(lambda: pool.stats()["parked"] == 16)
            for i, (client, _, _, server, _) in enumerate(conns):
                round_trip(client, server, os.urandom(1000 + i))
            for client, _, _, server, _ in conns:
                client.shutdown(socket.SHUT_WR)
                server.shutdown(socket.SHUT_WR)
            for i, (_, _, _, _, relay) in enumerate(conns):
                assert relay.result(timeout=10) == (1000 + i, 1000 + i)
            stats = pool.stats()
            assert stats["workers"] <= 1 and stats["peak"] == 1
        finally:
            for conn in conns:
                for sock in conn[:4]:
                    sock.close()


def round_trip(client: socket.socket, server: socket.socket, message: bytes) -> None:
    """One request and its reply through a proxy, each checked byte for byte."""
    client.sendall(message)
    server.settimeout(10)
    client.settimeout(10)
    got = b""
    while len(got) < len(message):
        got += server.recv(len(message) - len(got))
    assert got == message
    server.sendall(message[::-1])
    got = b""
    while len(got) < len(message):
        got += client.recv(len(message) - len(got))
    assert got == message[::-1]


def test_a_queued_proxy_starts_when_a_worker_is_free() -> None:
    client, a = socket.socketpair()
    b, server = socket.socketpair()
    with WorkerPool(max_workers=1) as pool:
        holder, held = held_relay(pool)
        try:
            assert held.flushing.wait(10)
            proxied = pool.proxy(a, b)
            client.sendall(b"early")
            assert pool.stats()["queued"] == 2
            assert proxied.bytes_copied == 0
        finally:
            held.release()
        try:
            assert holder.result(timeout=10) == 0
            server.settimeout(10)
            assert server.recv(5) == b"early"
            round_trip(client, server, os.urandom(5000))
            client.shutdown(socket.SHUT_WR)
            server.shutdown(socket.SHUT_WR)
            assert proxied.result(timeout=10) == (5005, 5000)
            assert pool.stats()["peak"] == 1
        finally:
            for sock in (client, a, b, server):
                sock.close()


def test_a_relay_behind_a_queued_proxy_runs_too() -> None:
    """A proxy's directions and a later relay queue behind a held worker;
    freed, the worker runs them all, each to its right end."""
    r2, w2 = os.pipe()
    out_r, out_w = os.pipe()
    client, a = socket.socketpair()
    b, server = socket.socketpair()
    with WorkerPool(max_workers=1) as pool:
        holder, held = held_relay(pool)
        try:
            assert held.flushing.wait(10)
            proxied = pool.proxy(a, b)
            later = pool.relay(r2, out_w)
            os.write(w2, b"later")
            os.close(w2)
            assert pool.stats()["queued"] == 3
            assert not later.done()
        finally:
            held.release()
        try:
            assert holder.result(timeout=10) == 0
            assert later.result(timeout=10) == 5
            assert os.read(out_r, 10) == b"later"
            round_trip(client, server, b"first")
            client.shutdown(socket.SHUT_WR)
            server.shutdown(socket.SHUT_WR)
            assert proxied.result(timeout=10) == (5, 5)
        finally:
            os.close(out_r)
            for sock in (client, a, b, server):
                sock.close()


def test_shutdown_without_cancel_lets_a_queued_proxy_run() -> None:
    client, a = socket.socketpair()
    b, server = socket.socketpair()
    pool = WorkerPool(max_workers=1)
    holder, held = held_relay(pool)
    try:
        assert held.flushing.wait(10)
        proxied = pool.proxy(a, b)
        assert pool.stats()["queued"] == 2
        pool.shutdown(wait=False)
        held.release()
        assert holder.result(timeout=10) == 0
        round_trip(client, server, os.urandom(100_000))
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        assert proxied.result(timeout=10) == (100_000, 100_000)
        pool.shutdown(wait=True)
        assert pool.stats()["workers"] == 0
    finally:
        held.release()
        pool.shutdown(wait=False, cancel_relays=True)
        for sock in (client, a, b, server):
            sock.close()


def test_idle_workers_exit_while_proxies_stay_parked() -> None:
    with WorkerPool(idle_worker_timeout=0.05) as pool:
        pairs = [socket.socketpair() for _ in range(4)]
        relays = [pool.proxy(pairs[0][0], pairs[1][0]), pool.proxy(pairs[2][0], pairs[3][0])]
        wait_for(lambda: pool.stats()["parked"] == 4)
        # Parked copies need one thread, the one polling for them: every
        # other worker retires meanwhile.
        wait_for(lambda: pool.stats()["workers"] == 1)
        for _, peer in pairs:
            peer.close()
        assert [r.result(timeout=10) for r in relays] == [(0, 0), (0, 0)]
        wait_for(lambda: pool.stats()["workers"] == 0)


def test_shutdown_cancel_relays_cancels_a_queued_proxy() -> None:
    pool = WorkerPool(max_workers=1)
    r, w = os.pipe()
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    parked = pool.relay(r, os.open(os.devnull, os.O_WRONLY))
    wait_for(lambda: pool.stats()["parked"] == 1)
    holder, held = held_relay(pool)
    stopper = None
    try:
        assert held.flushing.wait(10)
        queued = pool.proxy(a, b)
        assert pool.stats()["queued"] == 2
        # shutdown() cancels the queue first, then every live relay; the held
        # one can stop only once its flush returns, so it runs in a thread.
        stopper = threading.Thread(
            target=pool.shutdown, kwargs={"wait": False, "cancel_relays": True}
        )
        stopper.start()
        # Waited for as wait() sees it: done() turns True before the stopper
        # has run the callbacks and moved the relay on to
        # CANCELLED_AND_NOTIFIED, which check_cancelled() asserts.
        concurrent.futures.wait([queued], timeout=30)
        check_cancelled(queued)
        assert a.fileno() == -1 and b.fileno() == -1
        with pytest.raises(RuntimeError):
            pool.proxy(a_peer, b_peer)
    finally:
        held.release()
        if stopper is not None:
            stopper.join(10)
    assert stopper is not None and not stopper.is_alive()
    check_cancelled(parked)
    assert is_closed(r)
    # Released as the cancel came: it either saw the cancel or reached its end.
    wait_for(holder.done)
    assert holder.cancelled() or holder.result() == 0
    os.close(w)
    pool.shutdown(wait=True)
    a_peer.close()
    b_peer.close()
