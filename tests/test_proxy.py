"""proxy(): both directions at once, half-close, errors, closing, idle_timeout.

Real clients where it matters: urllib through a proxy to ``python -m
http.server``, a protocol that answers only after the client's end of file,
``cat`` behind a pair of pipes, and a peer that resets mid-stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import tty
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

import fastpipe
from fastpipe import WorkerPool, _impl, _proxy

from conftest import held_relay, is_closed, tcp_pair, wait_for, write_all

FAMILIES = ["tcp", "unix"]


def stream_pair(family: str) -> tuple[socket.socket, socket.socket]:
    if family == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return tcp_pair()


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def read_fd_to_eof(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class Proxied:
    """client <-> [a  proxy  b] <-> server, the proxy holding ``a`` and ``b``."""

    def __init__(self, family: str, **kwargs: object) -> None:
        self.client, self.a = stream_pair(family)
        self.b, self.server = stream_pair(family)
        self.relay = fastpipe.proxy(self.a, self.b, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        for sock in (self.client, self.server, self.a, self.b):
            sock.close()


@pytest.fixture(params=FAMILIES)
def proxied(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    p = Proxied(request.param)
    yield p
    p.close()


# -- real clients ---------------------------------------------------------------


def test_http_download_through_proxy(http_server: tuple[int, bytes]) -> None:
    port, data = http_server
    relays: list[fastpipe.Relay] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve_one() -> None:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", port))
            relays.append(fastpipe.proxy(client, upstream))

        acceptor = threading.Thread(target=serve_one)
        acceptor.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/blob.bin"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
        acceptor.join(10)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    (relay,) = relays
    request_bytes, response_bytes = relay.result(timeout=30)
    assert request_bytes > 0
    # The headers, then exactly the file.
    assert response_bytes > len(data)
    assert relay.bytes_copied == request_bytes + response_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_half_close_does_not_wait_for_python(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker shuts the socket down in C: a completion stuck behind the
    GIL (here: held on purpose) must not hold back the peer's end of file."""
    from fastpipe import _proxy

    release = threading.Event()
    real_complete = _proxy.ProxyTask.complete

    def stuck_complete(self: _proxy.ProxyTask, job: object) -> None:
        release.wait(30)
        real_complete(self, job)

    monkeypatch.setattr(_proxy.ProxyTask, "complete", stuck_complete)
    p = Proxied(family)
    try:
        request = os.urandom(300_000)
        p.client.sendall(request)
        p.client.shutdown(socket.SHUT_WR)
        p.server.settimeout(10)
        # Without the shutdown in C this read would only end after release.
        assert read_to_eof(p.server) == request
        assert not p.relay.done()
        p.server.sendall(b"reply")
        p.server.close()
        release.set()
        assert read_to_eof(p.client) == b"reply"
        assert p.relay.result(timeout=10) == (len(request), 5)
    finally:
        release.set()
        p.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_server_that_answers_after_the_clients_eof(family: str) -> None:
    """Half-close: no truncated reply, no hang (tokio#3876)."""
    p = Proxied(family)
    try:
        request = os.urandom(2 * 1024 * 1024)
        reply: list[bytes] = []

        def server() -> None:
            got = read_to_eof(p.server)  # only ends once the proxy half-closes
            answer = hashlib.sha256(got).digest() + got[::-1]
            p.server.sendall(answer)
            p.server.close()
            reply.append(answer)

        t = threading.Thread(target=server)
        t.start()
        p.client.sendall(request)
        p.client.shutdown(socket.SHUT_WR)
        received = read_to_eof(p.client)
        t.join(10)
        assert received == hashlib.sha256(request).digest() + request[::-1]
        assert received == reply[0]
        assert p.relay.result(timeout=10) == (len(request), len(received))
        # close=True: both ends the proxy held are closed.
        assert p.a.fileno() == -1
        assert p.b.fileno() == -1
    finally:
        p.close()


def test_interactive_round_trips(proxied: Proxied) -> None:
    """Request/response over one connection: both directions live at once."""
    for i in range(50):
        message = f"ping {i} ".encode() * (i + 1)
        proxied.client.sendall(message)
        got = b""
        while len(got) < len(message):
            got += proxied.server.recv(1 << 16)
        assert got == message
        proxied.server.sendall(got.upper())
        back = b""
        while len(back) < len(message):
            back += proxied.client.recv(1 << 16)
        assert back == message.upper()
    proxied.client.shutdown(socket.SHUT_WR)
    assert read_to_eof(proxied.server) == b""
    proxied.server.shutdown(socket.SHUT_WR)
    assert read_to_eof(proxied.client) == b""
    total = sum(len(f"ping {i} ".encode() * (i + 1)) for i in range(50))
    assert proxied.relay.result(timeout=10) == (total, total)


def test_peer_reset_mid_stream_fails_the_proxy_and_stops_both() -> None:
    p = Proxied("tcp")
    try:
        stop = threading.Event()

        def server() -> None:
            # Streams towards the client, which stops reading and resets.
            block = b"r" * 65536
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    p.server.sendall(block)

        t = threading.Thread(target=server)
        t.start()
        p.client.sendall(b"hello")
        assert p.server.recv(5, socket.MSG_WAITALL) == b"hello"  # through the proxy
        linger_0 = struct.pack("ii", 1, 0)
        p.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_0)
        p.client.close()  # RST, not FIN
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            p.relay.result(timeout=10)
        stop.set()
        # The other direction stopped too, and the proxy closed its end of
        # the server connection: the server's sendall fails or sees EOF.
        t.join(10)
        assert not t.is_alive()
        assert p.a.fileno() == -1
        assert p.b.fileno() == -1
        assert p.relay.bytes_copied >= 5
    finally:
        p.close()


def test_error_in_one_direction_stops_the_idle_other() -> None:
    """a->b hits EPIPE while b->a waits on an idle pipe: both stop at once."""
    r1, w1 = os.pipe()  # test -> a's reader
    r2, w2 = os.pipe()  # b's writer -> nobody (closed reader: EPIPE)
    r3, w3 = os.pipe()  # b's reader, idle
    r4, w4 = os.pipe()  # a's writer -> test
    os.close(r2)
    relay = fastpipe.proxy((r1, w4), (r3, w2))
    start = time.monotonic()
    os.write(w1, b"data that cannot be delivered")
    with pytest.raises(BrokenPipeError):
        relay.result(timeout=30)
    # It ends, where the idle direction alone would wait for ever; how soon
    # is a latency, which a busy machine stretches.
    elapsed = time.monotonic() - start
    assert elapsed < 30
    for fd in (r1, w2, r3, w4):  # all four ends closed by the proxy
        with pytest.raises(OSError):
            os.fstat(fd)
    assert read_fd_to_eof(r4) == b""  # a's writer closed: EOF, nothing sent
    for fd in (w1, w3, r4):
        os.close(fd)


class _DeafJob:
    """A job whose first cancel() signals are lost, as when a worker's
    wake-up lands just before it enters a syscall."""

    def __init__(self, deaf_for: int, started: bool = True) -> None:
        self.deaf_for = deaf_for
        self.asked = 0
        self.started = started
        self.finished = False

    def cancel(self) -> bool:
        self.asked += 1
        if self.asked > self.deaf_for:
            self.finished = True
        return not self.finished


def test_the_repoker_asks_until_a_job_has_stopped_then_its_thread_exits() -> None:
    from fastpipe._relay import _Repoker

    repoker = _Repoker()
    # A job taken off the queue never starts nor ends: it is not watched,
    # or the thread would ask it for ever.
    never_ran = _DeafJob(10**9, started=False)
    jobs = [_DeafJob(3), _DeafJob(0)]
    repoker.watch([*jobs, never_ran])
    thread = repoker._thread
    assert thread is not None and thread.name == "fastpipe-repoke"
    thread.join(10)
    assert not thread.is_alive(), "the re-poker's thread never ended"
    assert repoker._thread is None
    assert all(job.finished for job in jobs)
    assert jobs[0].asked == 4 and jobs[1].asked == 1  # no ask after the end
    assert never_ran.asked == 0


def test_a_proxy_stopping_its_other_direction_has_it_asked_again(monkeypatch) -> None:
    """The stop after an error goes to the re-poker: nobody else would ask
    again if the worker slept through the first signal."""
    from fastpipe import _proxy

    watched: list[object] = []
    real_watch = _proxy.repoker.watch

    def watch(jobs):
        watched.extend(jobs)
        real_watch(jobs)

    monkeypatch.setattr(_proxy.repoker, "watch", watch)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    r3, w3 = os.pipe()
    r4, w4 = os.pipe()
    os.close(r2)
    relay = fastpipe.proxy((r1, w4), (r3, w2))
    # Started: a direction still waiting for its worker's thread would be
    # taken back and dropped, with nothing to ask again.
    wait_for(lambda: relay._jobs[1].started)
    os.write(w1, b"data that cannot be delivered")
    with pytest.raises(BrokenPipeError):
        relay.result(timeout=10)
    assert relay._jobs[1] in watched  # b->a, idle on r3, was stopped and watched
    for fd in (w1, w3, r4):
        os.close(fd)


# -- pipes, objects and sharing ------------------------------------------------


def test_pipes_through_proxy() -> None:
    """(reader, writer) pairs of pipes: a pipe's write end half-closes by closing."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    r3, w3 = os.pipe()
    r4, w4 = os.pipe()
    relay = fastpipe.proxy((r1, w4), (r3, w2))
    forward = os.urandom(300_000)
    backward = os.urandom(200_000)
    writer = threading.Thread(target=lambda: (os.write(w1, forward), os.close(w1)))
    writer.start()
    # a reached EOF: b's writer (w2) was closed, so r2 ends.
    assert read_fd_to_eof(r2) == forward
    writer.join()
    assert not relay.done()  # b -> a goes on
    writer = threading.Thread(target=lambda: (os.write(w3, backward), os.close(w3)))
    writer.start()
    assert read_fd_to_eof(r4) == backward
    writer.join()
    assert relay.result(timeout=10) == (len(forward), len(backward))
    for fd in (r2, r4):
        os.close(fd)


def test_subprocess_pipes_to_socket_with_half_close() -> None:
    """proxy((proc.stdout, proc.stdin), sock): closing cat's stdin is its EOF."""
    client, a = tcp_pair()
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        relay = fastpipe.proxy((proc.stdout, proc.stdin), a)
        data = os.urandom(1024 * 1024)
        sender = threading.Thread(
            target=lambda: (client.sendall(data), client.shutdown(socket.SHUT_WR))
        )
        sender.start()
        assert read_to_eof(client) == data
        sender.join()
        assert relay.result(timeout=10) == (len(data), len(data))
        assert proc.wait(10) == 0
        assert proc.stdin.closed and proc.stdout.closed
        assert a.fileno() == -1
    finally:
        client.close()
        proc.kill()
        proc.wait()


def test_an_fd_both_sides_share_is_closed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """a = (r, x), b = (x, w): x is written by b -> a and read by it too (an
    echo, one direction); x closes once (a second close could hit a reused
    fd)."""
    client, x = tcp_pair()
    fd = x.detach()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    closes: list[int] = []
    real_close = os.close

    def counting_close(n: int) -> None:
        closes.append(n)
        real_close(n)

    monkeypatch.setattr(os, "close", counting_close)
    try:
        relay = fastpipe.proxy((r1, fd), (fd, w2))
        client.sendall(b"echo me")
        assert client.recv(100) == b"echo me"
        client.shutdown(socket.SHUT_WR)
        os.write(w1, b"through")
        real_close(w1)
        assert read_fd_to_eof(r2) == b"through"
        assert relay.result(timeout=10) == (len(b"through"), len(b"echo me"))
        assert read_to_eof(client) == b""
    finally:
        client.close()
        real_close(r2)
    assert closes.count(fd) <= 1
    for end in (fd, r1, w2):
        with pytest.raises(OSError):
            os.fstat(end)


@pytest.mark.parametrize("family", FAMILIES)
def test_close_false_half_closes_sockets_and_leaves_them_open(family: str) -> None:
    p = Proxied(family, close=False)
    try:
        p.client.sendall(b"question")
        p.client.shutdown(socket.SHUT_WR)
        assert read_to_eof(p.server) == b"question"  # SHUT_WR reached the server
        p.server.sendall(b"answer")
        p.server.shutdown(socket.SHUT_WR)
        assert read_to_eof(p.client) == b"answer"
        assert p.relay.result(timeout=10) == (8, 6)
        # Still open, and ours to close.
        assert p.a.fileno() >= 0 and p.b.fileno() >= 0
        os.fstat(p.a.fileno())
        os.fstat(p.b.fileno())
    finally:
        p.close()


def test_buffered_objects_are_flushed_and_drained() -> None:
    """makefile() ends: read-ahead goes first, written bytes are flushed first."""
    client, a = tcp_pair()
    b, server = tcp_pair()
    client.sendall(b"first line\nrest of the request")
    client.shutdown(socket.SHUT_WR)
    reader = a.makefile("rb")
    assert reader.readline() == b"first line\n"  # reads ahead past the line
    writer = b.makefile("wb")
    writer.write(b"prefix:")  # still in the buffer
    relay = fastpipe.proxy((reader, a.makefile("wb")), (b.makefile("rb"), writer))
    a.close()
    b.close()  # the makefile objects keep the sockets alive until closed
    assert read_to_eof(server) == b"prefix:rest of the request"
    server.sendall(b"ok")
    server.shutdown(socket.SHUT_WR)
    assert read_to_eof(client) == b"ok"
    # The counts are what the proxy copied: read-ahead yes, the writer's own
    # buffered bytes (flushed, not copied) no.
    assert relay.result(timeout=10) == (len(b"rest of the request"), 2)
    client.close()
    server.close()


def test_bad_arguments_raise_at_once() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(TypeError):
            fastpipe.proxy("nope", r)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            fastpipe.proxy((r, w, r), r)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            fastpipe.proxy(-1, r)
        with pytest.raises(ValueError):
            fastpipe.proxy(r, w, idle_timeout=0)
        with pytest.raises(TypeError):
            fastpipe.proxy(r, w, idle_timeout="1")  # type: ignore[arg-type]
        # Nothing was taken over.
        os.fstat(r)
        os.fstat(w)
    finally:
        os.close(r)
        os.close(w)


# -- one stream, one direction -------------------------------------------------


def refused(a: object, b: object) -> str:
    """proxy(a, b) raises ValueError at once, whatever ``close=`` says."""
    with pytest.raises(ValueError) as info:
        fastpipe.proxy(a, b)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fastpipe.proxy(a, b, close=False)  # type: ignore[arg-type]
    return str(info.value)


@dataclass
class Echoable:
    """One stream read and written both ways (``x``), and its far end."""

    x: object
    fd: int
    write_far: Callable[[bytes], None]
    read_far: Callable[[int], bytes]
    end_far: Callable[[], None]
    # A tty has no end of file to give: its echo relay is cancelled instead.
    has_eof: bool
    closing: list[Callable[[], None]] = field(default_factory=list)


@contextlib.contextmanager
def echoable(kind: str) -> Iterator[Echoable]:
    if kind == "pty":
        master, slave = os.openpty()
        tty.setraw(slave)  # bytes as they are: no echo, no line editing

        def read_far(n: int) -> bytes:
            return os.read(master, n)

        stream = Echoable(
            slave,
            slave,
            lambda data: write_all(master, data),
            read_far,
            lambda: None,
            has_eof=False,
            closing=[lambda: os.close(master)],
        )
    else:
        far, x = stream_pair(kind)

        def end_far() -> None:
            far.shutdown(socket.SHUT_WR)

        stream = Echoable(x, x.fileno(), far.sendall, far.recv, end_far, True, [far.close])
    try:
        yield stream
    finally:
        for close in stream.closing:
            close()


def forms_of_one_stream(stream: Echoable, form: str) -> tuple[object, object]:
    """proxy() arguments that make both directions read (and write) ``stream``."""
    x, fd = stream.x, stream.fd
    if form == "same":
        return x, x
    if form == "fd-and-object":
        return fd, x
    if form == "dup":
        other = os.dup(fd)
        stream.closing.append(lambda: os.close(other))
        return x, other
    if form == "two-opens":
        # A second open file description of the same socket or tty.
        other = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_NOCTTY)
        stream.closing.append(lambda: os.close(other))
        return x, other
    r, w = os.pipe()
    stream.closing += [lambda: os.close(r), lambda: os.close(w)]
    if form == "shares-its-reader":
        return x, (x, w)
    assert form == "shares-its-writer"
    return x, (r, x)


ONE_STREAM_FORMS = ["same", "fd-and-object", "dup", "shares-its-reader", "shares-its-writer"]


@pytest.mark.parametrize(
    ("kind", "form"),
    # A socket cannot be opened again through /proc; a tty can.
    [(k, f) for k in ("unix", "tcp", "pty") for f in ONE_STREAM_FORMS] + [("pty", "two-opens")],
)
def test_both_directions_on_one_stream_are_refused(kind: str, form: str) -> None:
    """proxy(x, x) and its kin raise ValueError, pointing to relay(x, x), and
    touch nothing: the bytes waiting in x, and a bulk stream after them,
    then echo byte for byte through relay(x, x)."""
    waiting = os.urandom(1000)
    bulk = os.urandom((256 << 10) if kind == "pty" else (4 << 20))
    with echoable(kind) as stream:
        stream.write_far(waiting)
        a, b = forms_of_one_stream(stream, form)
        message = refused(a, b)
        assert "relay(x, x)" in message
        assert "same stream" in message
        relay = fastpipe.relay(stream.x, stream.x, close=False)

        def feed() -> None:
            stream.write_far(bulk)
            stream.end_far()

        feeder = threading.Thread(target=feed)
        feeder.start()
        got = bytearray()
        while len(got) < len(waiting) + len(bulk):
            chunk = stream.read_far(1 << 20)
            assert chunk, "the echo ended early"
            got += chunk
        feeder.join(30)
        assert bytes(got) == waiting + bulk
        if stream.has_eof:
            assert relay.result(timeout=30) == len(got)
        else:
            assert relay.cancel()
        if isinstance(stream.x, socket.socket):
            stream.x.close()
        else:
            os.close(stream.fd)


@pytest.mark.parametrize(
    "form", ["same-pair", "shares-a-reader", "shares-a-writer", "dup-reader", "reopened-reader"]
)
def test_pipe_pairs_on_one_stream_are_refused(form: str) -> None:
    """Two directions reading one pipe (or writing one) are refused, and the
    pipe keeps every byte written into it."""
    r, w = os.pipe()
    r2, w2 = os.pipe()
    extra: list[int] = []
    if form == "same-pair":
        a, b = (r, w), (r, w)
        names = "a[0] and b[0] read"
    elif form == "shares-a-reader":
        a, b = (r, w2), (r, os.dup(w2))
        extra.append(b[1])
        names = "a[0] and b[0] read"
    elif form == "shares-a-writer":
        r3, w3 = os.pipe()
        a, b = (r2, w), (r3, w)
        extra += (r3, w3)
        names = "a[1] and b[1] write"
    elif form == "dup-reader":
        a, b = (r, w2), (os.dup(r), os.dup(w2))
        extra += b
        names = "a[0] and b[0] read"
    else:
        other = os.open(f"/proc/self/fd/{r}", os.O_RDONLY)
        a, b = (r, w2), (other, os.dup(w2))
        extra += b
        names = "a[0] and b[0] read"
    data = os.urandom(1 << 20)
    writer = threading.Thread(target=write_all, args=(w, data, True))
    writer.start()
    try:
        assert names in refused(a, b)
        assert read_fd_to_eof(r) == data
    finally:
        writer.join(30)
        for fd in (r, r2, w2, *extra):
            os.close(fd)


def test_a_regular_file_read_by_both_directions(tmp_path) -> None:
    """One open file description (one fd, or dup'd) shares its offset: two
    readers would split the file, so that is refused, and the offset is left
    where it was.  Two opens of the file each read all of it: both
    directions send the whole file."""
    data = os.urandom(3 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    dup = os.dup(fd)
    os.lseek(fd, 100, os.SEEK_SET)
    client_a, a = tcp_pair()
    client_b, b = tcp_pair()
    try:
        for other in (fd, dup):
            assert "read the same stream" in refused((fd, a), (other, b))
            assert os.lseek(fd, 0, os.SEEK_CUR) == 100
        again = os.open(path, os.O_RDONLY)
        relay = fastpipe.proxy((again, a), (os.open(path, os.O_RDONLY), b))
        got = {}
        readers = [
            threading.Thread(target=lambda c=c: got.__setitem__(c, read_to_eof(c)))
            for c in (client_a, client_b)
        ]
        for t in readers:
            t.start()
        for t in readers:
            t.join(30)
        assert got == {client_a: data, client_b: data}
        assert relay.result(timeout=30) == (len(data), len(data))
    finally:
        for end in (client_a, client_b, a, b):
            end.close()
        os.close(fd)
        os.close(dup)


def test_a_regular_file_written_by_both_directions_is_refused(tmp_path) -> None:
    """Two opens of one file, written by both directions, would overwrite
    each other's bytes."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    w1 = os.open(path, os.O_WRONLY)
    w2 = os.open(path, os.O_WRONLY)
    r1, x1 = os.pipe()
    r2, x2 = os.pipe()
    try:
        assert "a[1] and b[1] write to the same stream" in refused((r1, w1), (r2, w2))
    finally:
        for fd in (w1, w2, r1, x1, r2, x2):
            os.close(fd)


# -- idle_timeout ----------------------------------------------------------------


def test_idle_timeout_when_no_byte_moves_either_way() -> None:
    # Before the proxy starts its clock: it cannot fire sooner than 0.3 s
    # from here, however this thread is scheduled.
    start = time.monotonic()
    p = Proxied("tcp", idle_timeout=0.3)
    try:
        with pytest.raises(TimeoutError, match="either way"):
            p.relay.result(timeout=30)
        # Not early; the upper bound only says it fired.
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 30
        assert p.a.fileno() == -1 and p.b.fileno() == -1
        assert read_to_eof(p.client) == b""
    finally:
        p.close()


def test_idle_timeout_is_not_triggered_by_one_quiet_direction() -> None:
    """A download keeps the upload direction idle: the proxy is not idle.

    A chunk every 0.05 s for 1.5 s keeps a 1 s idle_timeout off.  Generous:
    only a gap of 1 s between two chunks, twenty times the nominal, would
    let it fire; a per-direction timeout would fire at 1 s."""
    p = Proxied("tcp", idle_timeout=1.0)
    try:
        sent = b""
        for i in range(30):
            chunk = f"chunk {i}\n".encode()
            p.server.sendall(chunk)
            sent += chunk
            time.sleep(0.05)  # the gap between chunks, which is what is tested
        assert not p.relay.done()
        with pytest.raises(TimeoutError):
            p.relay.result(timeout=30)
        assert read_to_eof(p.client) == sent
        assert p.relay.bytes_copied == len(sent)
    finally:
        p.close()


def test_interpreter_exit_does_not_hang_on_blocked_proxies() -> None:
    code = (
        "import socket, fastpipe\n"
        "pairs = [socket.socketpair() for _ in range(4)]\n"
        "relays = [fastpipe.proxy(pairs[0][0], pairs[1][0]),"
        " fastpipe.proxy(pairs[2][0], pairs[3][0], idle_timeout=60)]\n"
        "print('exiting', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "exiting\n"
    assert proc.stderr == ""


def test_idle_timeout_of_a_proxy_still_queued() -> None:
    """No byte moved while it waited: it fails and leaves the queue at once."""
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        with WorkerPool(max_workers=2) as pool:
            holders = [held_relay(pool) for _ in range(2)]
            wait_for(lambda: all(held.flushing.is_set() for _, held in holders))
            # A byte to read on each side: both directions are ready to run,
            # so they queue (a direction with nothing to read would park).
            for _, peer in pairs:
                peer.send(b"x")
            relay = pool.proxy(pairs[0][0], pairs[1][0], idle_timeout=0.2)
            assert pool.stats()["queued"] == 2
            with pytest.raises(TimeoutError):
                relay.result(timeout=10)
            assert pool.stats()["queued"] == 0
            assert pairs[0][0].fileno() == -1 and pairs[1][0].fileno() == -1
            for holder, held in holders:
                held.release()
                assert holder.result(timeout=10) == 0
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_ended_proxies_leave_the_idle_watchdog_at_once() -> None:
    """A proxy with a long idle_timeout that ends is not kept (task, jobs and
    ends) until the watchdog's next look at it, a quarter of the timeout
    later: with many short connections that held every one of them.  The
    watchdog holds at most twice the entries of the proxies still live."""

    def watched() -> int:
        return len(_proxy.watchdog._heap)

    keep_pairs = [socket.socketpair() for _ in range(2)]
    keeper = fastpipe.proxy(keep_pairs[0][0], keep_pairs[1][0], idle_timeout=3600)
    try:
        for _ in range(100):
            pairs = [socket.socketpair() for _ in range(2)]
            relay = fastpipe.proxy(pairs[0][0], pairs[1][0], idle_timeout=3600)
            assert relay.cancel()
            for _, far in pairs:
                far.close()
            # The completer forgets it just after completing the future.
            wait_for(lambda: watched() <= 3)
    finally:
        keeper.cancel()
        for _, far in keep_pairs:
            far.close()
    wait_for(lambda: watched() <= 1)


def test_bytes_each_way_is_there_however_the_proxy_ends() -> None:
    """Per direction, live, and after a cancel (when result() has nothing to say)."""
    p = Proxied("tcp")
    try:
        p.client.sendall(b"up" * 10)
        assert p.server.recv(20, socket.MSG_WAITALL) == b"up" * 10
        p.server.sendall(b"down")
        assert p.client.recv(4, socket.MSG_WAITALL) == b"down"
        # The count moves just after the write returns: a reader can be quicker.
        deadline = time.monotonic() + 5
        while p.relay.bytes_each_way != (20, 4) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert p.relay.bytes_each_way == (20, 4)
        assert p.relay.cancel()
        assert p.relay.bytes_each_way == (20, 4)
        assert p.relay.bytes_copied == 24
    finally:
        p.close()
    r, w = os.pipe()
    os.write(w, b"12345")
    os.close(w)
    r2, w2 = os.pipe()
    relay = fastpipe.relay(r, w2)
    assert relay.result(timeout=10) == 5
    assert relay.bytes_each_way == (5,)
    assert read_fd_to_eof(r2) == b"12345"
    os.close(r2)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_the_last_direction_closes_a_socket_proxys_fds(kind: str) -> None:
    """Whichever direction ends last closes both fds in its worker: once the
    future completes, the fds are shut and the socket objects closed."""
    client, a = socket.socketpair() if kind == "unix" else tcp_pair()
    b, server = socket.socketpair() if kind == "unix" else tcp_pair()
    fds = (a.fileno(), b.fileno())
    with WorkerPool() as pool:
        relay = pool.proxy(a, b)
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(server) == b"ping"
        server.sendall(b"pong")
        server.shutdown(socket.SHUT_WR)
        assert relay.result(timeout=10) == (4, 4)
        assert read_to_eof(client) == b"pong"
        assert a.fileno() == -1 and b.fileno() == -1
        assert all(is_closed(fd) for fd in fds)
    client.close()
    server.close()


def test_close_pair_with_wants_the_other_direction_over_two_fds() -> None:
    r, w = os.pipe()
    try:
        job = _impl.CopyJob(r, w)
        with pytest.raises(ValueError, match="other direction"):
            job.close_pair_with(job)
        with pytest.raises(ValueError, match="other direction"):
            job.close_pair_with(_impl.CopyJob(r, w))
        with pytest.raises(ValueError, match="two different fds"):
            _impl.CopyJob(r, r).close_pair_with(_impl.CopyJob(r, r))
        job.close_pair_with(_impl.CopyJob(w, r))  # the other direction: fine
    finally:
        os.close(r)
        os.close(w)
