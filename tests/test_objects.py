"""relay() on Python objects: read-ahead first, flush first, close semantics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import fastpipe

from conftest import open_fds, tcp_pair


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_buffered_file_readahead_is_delivered_first(tmp_path) -> None:
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)
    src = open(tmp_path / "src", "rb")
    assert src.read(10) == data[:10]  # the object has read ahead 8 KiB or more
    dst = open(tmp_path / "dst", "wb")
    assert fastpipe.relay(src, dst).result(timeout=10) == len(data) - 10
    assert src.closed and dst.closed
    assert (tmp_path / "dst").read_bytes() == data[10:]


@pytest.mark.parametrize("count", [0, 5, 50, 5000, 60_000])
def test_readahead_respects_count(tmp_path, count: int) -> None:
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        src.read(10)
        relay = fastpipe.relay(src, dst, count=count, close=False)
        assert relay.result(timeout=10) == count
    assert (tmp_path / "dst").read_bytes() == data[10 : 10 + count]


def test_socket_makefile_readahead_is_delivered_first() -> None:
    client, server = tcp_pair()
    out_a, out_b = socket.socketpair()
    body = os.urandom(300_000)
    client.sendall(b"HEADER\r\n" + body[:1000])
    reader = server.makefile("rb")
    assert reader.readline() == b"HEADER\r\n"
    relay = fastpipe.relay(reader, out_a)
    received: list[bytes] = []
    t = threading.Thread(target=lambda: received.append(read_all(out_b)))
    t.start()
    time.sleep(0.05)
    client.sendall(body[1000:])
    client.shutdown(socket.SHUT_WR)
    assert relay.result(timeout=10) == len(body)
    t.join(10)
    assert received == [body]
    assert reader.closed and out_a.fileno() == -1
    for s in (client, server, out_b):
        s.close()


def test_buffered_reader_on_idle_pipe_does_not_block_the_caller() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.stdout.buffer.write(b'A' * 10); "
            "sys.stdout.flush(); time.sleep(0.3); sys.stdout.buffer.write(b'B' * 70000)",
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.read(1) == b"A"  # the rest of the A's sit in its buffer
    r, w = os.pipe()
    start = time.monotonic()
    relay = fastpipe.relay(proc.stdout, w)
    assert time.monotonic() - start < 0.2
    got = b"".join(iter(lambda: os.read(r, 1 << 16), b""))
    assert relay.result(timeout=10) == 9 + 70000
    assert got == b"A" * 9 + b"B" * 70000
    os.close(r)
    proc.wait(10)


def test_buffered_writer_is_flushed_first(tmp_path) -> None:
    data = os.urandom(50_000)
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    dst = open(tmp_path / "dst", "wb")
    dst.write(b"written-before")  # still in the object's buffer
    assert fastpipe.relay(r, dst).result(timeout=10) == len(data)
    assert (tmp_path / "dst").read_bytes() == b"written-before" + data


def test_close_true_closes_int_fds_and_objects() -> None:
    before = open_fds()
    r, w = os.pipe()
    a, b = socket.socketpair()
    os.write(w, b"hello")
    os.close(w)
    relay = fastpipe.relay(r, a)
    assert relay.result(timeout=10) == 5
    assert a.fileno() == -1
    with pytest.raises(OSError):
        os.fstat(r)
    assert b.recv(10) == b"hello"
    b.close()
    assert open_fds() <= before


def test_close_false_leaves_both_open() -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    os.write(w, b"hello")
    os.close(w)
    assert fastpipe.relay(r, a, close=False).result(timeout=10) == 5
    os.fstat(r)
    assert a.fileno() >= 0
    a.sendall(b"!")
    assert b.recv(10) == b"hello!"
    for x in (a, b):
        x.close()
    os.close(r)


def test_close_true_closes_ends_after_an_error_too() -> None:
    before = open_fds()
    src = open("/dev/zero", "rb")
    full = open("/dev/full", "wb")
    relay = fastpipe.relay(src, full)
    assert isinstance(relay.exception(timeout=10), OSError)
    assert src.closed and full.closed
    assert open_fds() <= before


def test_same_object_on_both_ends_is_closed_once() -> None:
    a, b = socket.socketpair()
    b.sendall(b"ping")
    b.shutdown(socket.SHUT_WR)
    # An echo: a reads what b sent and writes it back to b.
    assert fastpipe.relay(a, a).result(timeout=10) == 4
    assert a.fileno() == -1
    assert read_all(b) == b"ping"
    b.close()


def test_await_relay_in_asyncio() -> None:
    import asyncio

    async def main() -> int:
        r, w = os.pipe()
        devnull = os.open(os.devnull, os.O_WRONLY)
        relay = fastpipe.relay(r, devnull)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: (os.write(w, b"x" * 100), os.close(w)))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.ensure_future(ticker())
        n = await relay
        t.cancel()
        assert ticks >= 3  # the loop kept running while we awaited
        return n

    assert asyncio.run(main()) == 100
