"""The buffer free-list: reuse, stats, trimming, and no buffer held while idle."""

from __future__ import annotations

import os
import threading

import fastpipe

from conftest import Endpoints, wait_for


def test_buffer_stats_keys_and_invariants() -> None:
    stats = fastpipe.buffer_stats()
    assert set(stats) == {"buffer_size", "allocated", "free", "in_use", "peak"}
    assert stats["buffer_size"] == fastpipe.BUFFER_SIZE == 32768
    assert stats["allocated"] == stats["free"] + stats["in_use"]
    assert stats["peak"] >= stats["in_use"]


def test_sequential_relays_do_not_allocate_more(endpoints: Endpoints) -> None:
    data = os.urandom(2_000_000)

    def one() -> None:
        src = endpoints.source("file", data)
        dst = endpoints.sink("pipe")
        relay = fastpipe.relay(src.disown(), dst.disown(), zerocopy=False)
        assert relay.result(timeout=10) == len(data)
        assert dst.received() == data

    one()  # warm-up: the free-list grows to what one such relay needs
    allocated = fastpipe.buffer_stats()["allocated"]
    for _ in range(10):
        one()
    assert fastpipe.buffer_stats()["allocated"] == allocated


def test_sequential_copy_fd_reuses_buffers(endpoints: Endpoints) -> None:
    data = os.urandom(500_000)
    for _ in range(2):
        src = endpoints.source("pipe", data)
        dst = endpoints.sink("file")
        fastpipe.copy_fd(src.fd, dst.fd, zerocopy=False)
        assert dst.received() == data
    allocated = fastpipe.buffer_stats()["allocated"]
    for _ in range(10):
        src = endpoints.source("pipe", data)
        dst = endpoints.sink("file")
        fastpipe.copy_fd(src.fd, dst.fd, zerocopy=False)
        assert dst.received() == data
    assert fastpipe.buffer_stats()["allocated"] == allocated


def test_trim_buffers_frees_only_idle_ones(endpoints: Endpoints) -> None:
    data = os.urandom(2_000_000)
    fastpipe.trim_buffers()
    src = endpoints.source("file", data)
    r, w = os.pipe()
    # Nobody reads the pipe yet: the relay fills it and then holds its
    # buffers with the bytes still in flight.
    with fastpipe.WorkerPool() as pool:
        relay = pool.relay(src.disown(), w, zerocopy=False)
        # Parked on the full pipe: no longer taking buffers as it reads ahead.
        wait_for(lambda: pool.stats()["parked"] == 1)
        held = fastpipe.buffer_stats()["in_use"]
        assert held > 0
        fastpipe.trim_buffers()
        stats = fastpipe.buffer_stats()
        assert stats["in_use"] == held
        assert stats["free"] == 0
        assert stats["allocated"] == held
        got = bytearray()
        while chunk := os.read(r, 1 << 20):
            got += chunk
        os.close(r)
        assert relay.result(timeout=10) == len(data)
    assert bytes(got) == data
    stats = fastpipe.buffer_stats()
    assert stats["in_use"] == 0
    assert fastpipe.trim_buffers() == stats["free"] > 0
    assert fastpipe.buffer_stats()["allocated"] == 0
    assert fastpipe.trim_buffers() == 0


def test_a_relay_parked_on_an_idle_fd_holds_no_buffer() -> None:
    pairs = [os.pipe() for _ in range(20)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    with fastpipe.WorkerPool() as pool:
        relays = [pool.relay(r, devnull, close=False) for r, _ in pairs]
        try:
            wait_for(lambda: pool.stats()["parked"] == 20)
            # Bytes flowed through each, then the source went idle again.
            for _, w in pairs:
                os.write(w, b"z" * 100_000)
            wait_for(lambda: sum(r.bytes_copied for r in relays) == 20 * 100_000)
            # Each gives its buffers back once it finds its pipe empty, and
            # then parks: all twenty end up parked, holding none.
            wait_for(lambda: pool.stats()["parked"] == 20, timeout=30)
            assert fastpipe.buffer_stats()["in_use"] == 0, fastpipe.buffer_stats()
            assert fastpipe.pipe_stats()["in_use"] == 0, fastpipe.pipe_stats()
        finally:
            for _, w in pairs:
                os.close(w)
        assert [r.result(timeout=10) for r in relays] == [100_000] * 20
    for r, _ in pairs:
        os.close(r)
    os.close(devnull)


def test_buffers_are_thread_safe_under_concurrent_copies(endpoints: Endpoints) -> None:
    datas = [os.urandom(300_000 + i) for i in range(16)]
    srcs = [endpoints.source("pipe", d) for d in datas]
    dsts = [endpoints.sink("unix") for _ in datas]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fastpipe.copy_fd(srcs[i].fd, dsts[i].fd, zerocopy=False)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for d, dst in zip(datas, dsts, strict=True):
        assert dst.received() == d
    stats = fastpipe.buffer_stats()
    assert stats["in_use"] == 0
    assert stats["allocated"] == stats["free"]
