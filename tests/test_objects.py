"""relay() on Python objects: read-ahead first, flush first, close semantics."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import fastpipe
from fastpipe import _impl

from conftest import Endpoints, open_fds, socket_pair, tcp_pair, wait_for


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
    wait_for(relay.running)  # the rest comes once the relay has its reader
    client.sendall(body[1000:])
    client.shutdown(socket.SHUT_WR)
    assert relay.result(timeout=10) == len(body)
    t.join(10)
    assert received == [body]
    assert reader.closed and out_a.fileno() == -1
    for s in (client, server, out_b):
        s.close()


def test_buffered_reader_on_idle_pipe_does_not_block_the_caller() -> None:
    """relay() returns while the pipe is idle: the child writes the rest only
    once told, and it is told after relay() has returned (or, should
    relay() block, by a timer 30 s on, which the test then reports)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.stdout.buffer.write(b'A' * 10); sys.stdout.flush(); "
            "sys.stdin.readline(); sys.stdout.buffer.write(b'B' * 70000)",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.read(1) == b"A"  # the rest of the A's sit in its buffer
    told: list[str] = []
    lock = threading.Lock()

    def tell(who: str) -> None:
        with lock:
            if not told:
                told.append(who)
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                proc.stdin.close()

    timer = threading.Timer(30, tell, ("timer",))
    timer.start()
    r, w = os.pipe()
    relay = fastpipe.relay(proc.stdout, w)
    tell("test")
    timer.cancel()
    assert told == ["test"], "relay() waited for the idle pipe"
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
        # A loop blocked in the await would never feed it: the idle_timeout
        # then fails the test instead of hanging it.
        relay = fastpipe.relay(r, devnull, idle_timeout=30)
        ticks = 0

        async def ticker() -> None:
            # The relay's source gets its bytes from the loop, after three
            # turns of it: only a loop that runs while we await ends it.
            nonlocal ticks
            while ticks < 3:
                ticks += 1
                await asyncio.sleep(0)
            assert not relay.done()
            os.write(w, b"x" * 100)
            os.close(w)

        t = asyncio.ensure_future(ticker())
        n = await relay
        await t
        assert ticks == 3
        return n

    assert asyncio.run(main()) == 100


# -- a buffered reader's source takes its fd's own kernel path ----------------

# The path a relay from each source fd kind to each sink kind takes
# (docs/design.md, "The kernel paths"); a socket source splices from the
# first byte here (see splice_at_once), where it would otherwise start on
# read/write.
PATHS = {
    "file": {"file": "copy_file_range", "pipe": "splice", "unix": "sendfile", "tcp": "sendfile"},
    "pipe": {"file": "splice", "pipe": "splice", "unix": "splice", "tcp": "splice"},
    "socket": {"file": "splice", "pipe": "splice", "unix": "splice", "tcp": "splice"},
}
# Each buffered reader a user hands over, and the kind of fd under it.
READERS = {
    "open-rb": "file",
    "open-r+b": "file",
    "Popen.stdout": "pipe",
    "unix-makefile": "socket",
    "tcp-makefile": "socket",
}


@pytest.fixture
def splice_at_once() -> Iterator[None]:
    old = _impl._set_splice_min_read(0)
    try:
        yield
    finally:
        _impl._set_splice_min_read(old)


@dataclass
class Reader:
    """A buffered reader over ``data``, and what must be closed after it."""

    obj: io.BufferedIOBase
    keep: list[object] = field(default_factory=list)

    def close(self) -> None:
        self.obj.close()
        for other in self.keep:
            if isinstance(other, subprocess.Popen):
                assert other.wait(30) == 0
            elif isinstance(other, threading.Thread):
                other.join(30)
            else:
                other.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def buffered_reader(kind: str, data: bytes, tmp_path: Path) -> Iterator[Reader]:
    if kind.startswith("open"):
        path = tmp_path / "src"
        path.write_bytes(data)
        reader = Reader(open(path, kind.removeprefix("open-")))  # noqa: SIM115
    elif kind == "Popen.stdout":
        path = tmp_path / "src"
        path.write_bytes(data)
        proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        reader = Reader(proc.stdout, [proc])
    else:
        ours, theirs = socket_pair(kind.removesuffix("-makefile"))

        def feed() -> None:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)

        feeder = threading.Thread(target=feed)
        feeder.start()
        reader = Reader(ours.makefile("rb"), [feeder, ours, theirs])
    try:
        yield reader
    finally:
        reader.close()


@pytest.mark.usefixtures("splice_at_once")
@pytest.mark.parametrize("read_first", [0, 10], ids=["fresh", "read-10"])
@pytest.mark.parametrize("sink_kind", ["file", "pipe", "unix", "tcp"])
@pytest.mark.parametrize("reader_kind", sorted(READERS))
def test_a_buffered_reader_takes_the_kernel_path_of_its_fd(
    endpoints: Endpoints, tmp_path: Path, reader_kind: str, sink_kind: str, read_first: int
) -> None:
    """The object's read-ahead goes first, the rest by its fd's own path."""
    data = os.urandom((1 << 20) + 7)
    with buffered_reader(reader_kind, data, tmp_path) as reader:
        assert reader.obj.read(read_first) == data[:read_first]
        dst = endpoints.sink(sink_kind)
        relay = fastpipe.relay(reader.obj, dst.disown())
        assert relay.result(timeout=60) == len(data) - read_first
        assert relay.method == PATHS[READERS[reader_kind]][sink_kind]
        assert dst.received() == data[read_first:]


@pytest.mark.parametrize("count", [1, 100, 5000, 100_000])
@pytest.mark.parametrize("reader_kind", sorted(READERS))
def test_count_leaves_the_rest_to_the_reader(
    endpoints: Endpoints, tmp_path: Path, reader_kind: str, count: int
) -> None:
    """A count shorter than the read-ahead takes only its share of it: the
    object goes on from there, with close=False (its own reads and a
    relay's)."""
    data = os.urandom(1 << 18)
    with buffered_reader(reader_kind, data, tmp_path) as reader:
        assert reader.obj.read(10) == data[:10]
        dst = endpoints.sink("pipe")
        relay = fastpipe.relay(reader.obj, dst.fd, count=count, close=False)
        assert relay.result(timeout=60) == count
        assert dst.received() == data[10 : 10 + count]
        assert reader.obj.read(3) == data[10 + count : 13 + count]
        rest = endpoints.sink("file")
        relay = fastpipe.relay(reader.obj, rest.fd, close=False)
        assert relay.result(timeout=60) == len(data) - 13 - count
        assert rest.received() == data[13 + count :]


def test_a_read_write_source_writes_its_pending_bytes_first(tmp_path: Path) -> None:
    """``open(path, "r+b")``: what the object has read ahead is dropped (its
    fd goes back to its position) and what it holds to write reaches the
    file before the relay reads there."""
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)
    f = open(tmp_path / "src", "r+b")  # noqa: SIM115
    assert f.read(10) == data[:10]
    f.write(b"XY")  # lands at 10..12, after the 10 bytes read
    dst = open(tmp_path / "dst", "wb")  # noqa: SIM115
    relay = fastpipe.relay(f, dst)
    assert relay.result(timeout=30) == len(data) - 12
    assert relay.method == "copy_file_range"
    assert (tmp_path / "dst").read_bytes() == data[12:]
    assert (tmp_path / "src").read_bytes() == data[:10] + b"XY" + data[12:]


def test_a_makefile_reader_with_a_socket_timeout_waits_in_the_relay() -> None:
    """The read-ahead step never waits for the peer: a socket with a timeout
    would make a read of its idle makefile() reader wait that long and then
    fail the relay with TimeoutError, which is not the relay's own timeout."""
    a, b = socket.socketpair()
    b.settimeout(0.01)
    reader = b.makefile("rb")
    r, w = os.pipe()
    relay = fastpipe.relay(reader, w)
    wait_for(relay.running)
    # 50 times the socket's timeout without a byte (not synchronisation: a
    # read made in the meantime would have failed by then).
    time.sleep(0.5)
    a.sendall(b"late")
    a.shutdown(socket.SHUT_WR)
    assert relay.result(timeout=30) == 4
    assert os.read(r, 10) == b"late"
    assert b.gettimeout() == 0.01
    for end in (a, b):
        end.close()
    os.close(r)


_EIGHT_RELAYS = textwrap.dedent(
    """
    import json, os, sys
    import fastpipe

    src, out = sys.argv[1], sys.argv[2]

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    # Eight workers (and their stacks and pooled buffers) first: eight
    # relays parked on empty pipes at once, then let go.
    pool = fastpipe.WorkerPool()
    pipes = [os.pipe() for _ in range(8)]
    warm = [pool.relay(r, os.open(os.devnull, os.O_WRONLY)) for r, _ in pipes]
    for _, w in pipes:
        os.write(w, b"x")
        os.close(w)
    assert [relay.result(timeout=60) for relay in warm] == [1] * 8
    readers = [open(src, "rb") for _ in range(8)]
    for reader in readers[1::2]:
        reader.read(10)  # these hold read-ahead, as a user's reader may
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak starts again from here
    except OSError:
        pass
    before = status("VmHWM")
    relays = [
        pool.relay(reader, open(os.path.join(out, f"dst{i}"), "wb"))
        for i, reader in enumerate(readers)
    ]
    counts = [relay.result(timeout=120) for relay in relays]
    rise = status("VmHWM") - before
    print(json.dumps({"rise": rise, "counts": counts, "methods": [r.method for r in relays]}))
    """
)


def test_eight_relays_from_buffered_readers_cost_no_memory_per_byte(tmp_path: Path) -> None:
    """Each relay takes its reader's read-ahead (none, or 8 KiB after a
    read(10)) and copies the rest in the kernel: eight 64 MiB relays at once
    raise the peak RSS of a fresh process by less than 8 MiB (not by a
    buffer of the file's size each)."""
    size = 64 << 20
    src = tmp_path / "src"
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _EIGHT_RELAYS, str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(f"peak RSS rise: {report['rise'] / 1024:.0f} KiB")
    skipped = [0, 10] * 4
    assert report["counts"] == [size - n for n in skipped]
    assert report["methods"] == ["copy_file_range"] * 8
    assert report["rise"] < 8 << 20
    with open(src, "rb") as expected:
        for i in range(8):
            expected.seek(skipped[i])
            with open(out / f"dst{i}", "rb") as got:
                while chunk := expected.read(1 << 20):
                    assert got.read(len(chunk)) == chunk
                assert got.read(1) == b""
            os.unlink(out / f"dst{i}")


def bytes_held_by(job: object) -> list[bytes]:
    """The non-empty bytes objects a job references (its own fields, or for
    the twin those of its __dict__)."""
    found = []
    for ref in gc.get_referents(job):
        for obj in [ref, *gc.get_referents(ref)] if isinstance(ref, dict) else [ref]:
            if isinstance(obj, bytes) and obj:
                found.append(obj)
    return found


def test_a_finished_relay_keeps_neither_its_ends_nor_their_bytes(tmp_path: Path) -> None:
    """A finished Relay keeps its job, for bytes_copied and method; the job
    keeps no reader or writer object, and none of the read-ahead it wrote."""
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)
    src = open(tmp_path / "src", "rb")  # noqa: SIM115
    assert src.read(10) == data[:10]
    dst = open(tmp_path / "dst", "wb")  # noqa: SIM115
    dst.write(b"head")
    ends = [weakref.ref(src), weakref.ref(dst)]
    relay = fastpipe.relay(src, dst)
    del src, dst
    assert relay.result(timeout=30) == len(data) - 10
    # The completer lets go of the relay's task just after completing it.
    wait_for(lambda: all(end() is None for end in ends))
    (job,) = relay._jobs
    assert bytes_held_by(job) == []
    assert (relay.bytes_copied, relay.method) == (len(data) - 10, "copy_file_range")
    assert (tmp_path / "dst").read_bytes() == b"head" + data[10:]
