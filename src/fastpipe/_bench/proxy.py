"""Proxy workloads for ``bench/test_bench_proxy.py``: ``proxy()`` beside the usual relays.

Three ways to relay one TCP connection both ways, each in this process
between two peers that run in other processes (on a 2-core machine the
peers must not share the relay's GIL, or the figures measure them):

* ``fastpipe-proxy``: ``fastpipe.proxy(a, b).result()``.
* ``asyncio-streams``: the way an asyncio proxy is usually written, two pump
  tasks ``reader.read(65536)`` / ``writer.write`` / ``await writer.drain()``
  over ``asyncio.open_connection(sock=...)`` streams, ``write_eof()`` at end
  of file.
* ``copyfileobj-threads``: two threads, each ``shutil.copyfileobj`` between
  unbuffered ``makefile()`` objects (a buffered reader would wait for 64 KiB
  before passing on a 100-byte request), then ``shutdown(SHUT_WR)``.

Workloads: ``proxy-bulk`` (the sender endpoint process -> proxy -> the
sink endpoint process, which checks every byte) and ``proxy-round-trips``
(``_bench.proxy_peers``: a client making request/response round trips of
100 bytes through the proxy to an echo server).  The accept and the connect
happen in setup; the timed part is the relaying only, and its CPU time is
this process's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
from typing import ClassVar

import fastpipe
from fastpipe._bench.cases import Case
from fastpipe._bench.common import TIMEOUT, BenchError
from fastpipe._bench.endpoints import Endpoint
from fastpipe._bench.pattern import describe_mismatch

FASTPIPE_PROXY = "fastpipe-proxy"
ASYNCIO_STREAMS = "asyncio-streams"
COPYFILEOBJ_THREADS = "copyfileobj-threads"

MESSAGE_SIZE = 100
ROUND_TRIPS = 2000

_HOW = {
    FASTPIPE_PROXY: "fastpipe.proxy(a, b).result(): two pool workers, the caller waits",
    ASYNCIO_STREAMS: "asyncio streams: two pump tasks read(65536)/write/drain, write_eof",
    COPYFILEOBJ_THREADS: "two threads: shutil.copyfileobj on unbuffered makefile()s",
}


class Peer(Endpoint):
    """A ``_bench.proxy_peers`` process, driven like ``endpoints.Endpoint``."""

    def __init__(self, role: str, *args: object) -> None:
        self.role = role
        peers = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy_peers.py")
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", peers, role, *(str(a) for a in args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._reaped = False


def _pump_threads(a: socket.socket, b: socket.socket) -> None:
    errors: list[BaseException] = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            with (
                src.makefile("rb", buffering=0) as fsrc,
                dst.makefile("wb", buffering=0) as fdst,
            ):
                shutil.copyfileobj(fsrc, fdst)
            dst.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # noqa: B036 - re-raised by the caller
            errors.append(exc)

    threads = [threading.Thread(target=pump, args=pair) for pair in ((a, b), (b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    b.close()
    if errors:
        raise errors[0]


async def _pump_asyncio(a: socket.socket, b: socket.socket) -> None:
    reader_a, writer_a = await asyncio.open_connection(sock=a)
    reader_b, writer_b = await asyncio.open_connection(sock=b)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    try:
        await asyncio.gather(pump(reader_a, writer_b), pump(reader_b, writer_a))
    finally:
        for writer in (writer_a, writer_b):
            writer.close()
        for writer in (writer_a, writer_b):
            await writer.wait_closed()


class _ProxyCase(Case):
    """A client peer -> this process -> a server peer, relayed both ways by ``method``."""

    methods: ClassVar[tuple[str, ...]] = (FASTPIPE_PROXY, ASYNCIO_STREAMS, COPYFILEOBJ_THREADS)
    how: ClassVar[dict[str, str]] = _HOW

    def __init__(self, method: str, nbytes: int) -> None:
        super().__init__(method, nbytes)
        self._listener: socket.socket | None = None
        self._a: socket.socket | None = None
        self._b: socket.socket | None = None

    def _prepare(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT)

    @property
    def _port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def _connect(self, server_port: int) -> None:
        """Accept the client peer's connection and connect to the server peer."""
        assert self._listener is not None
        a, _ = self._listener.accept()
        self._held.ends.append(a)
        b = socket.create_connection(("127.0.0.1", server_port))
        self._held.ends.append(b)
        for sock in (a, b):
            sock.setblocking(True)
            # As asyncio does for every TCP transport; a proxy wants it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._a, self._b = a, b

    def _relay_both(self) -> None:
        """Relay both ways until both ends are done; every end closed after."""
        a, b = self._a, self._b
        assert a is not None and b is not None
        self._held.hand_over()
        if self.method == FASTPIPE_PROXY:
            fastpipe.proxy(a, b).result(timeout=TIMEOUT)
        elif self.method == ASYNCIO_STREAMS:
            asyncio.run(_pump_asyncio(a, b))
        else:
            _pump_threads(a, b)

    def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class ProxyBulk(_ProxyCase):
    """``nbytes`` one way (the sender's pattern, checked by the sink), nothing back."""

    workload = "proxy-bulk"
    title = "TCP -> proxy -> TCP, bulk"

    def _setup_round(self) -> None:
        self._sink = Endpoint("tcp-sink")
        self._held.endpoints.append(self._sink)
        self._sender = Endpoint("tcp-send", self._port, self.nbytes)
        self._held.endpoints.append(self._sender)
        (sink_port,) = self._sink.ready()
        self._sender.ready()
        self._connect(int(sink_port))

    def _round(self) -> None:
        self._sender.go()
        self._relay_both()

    def _verify_round(self) -> None:
        self._sender.finish()
        total, first_bad, _ = self._sink.finish()
        problem = describe_mismatch(int(total), int(first_bad), self.nbytes)
        if problem:
            raise BenchError(f"{self.workload}/{self.method}: the sink says {problem}")


class ProxyRoundTrips(_ProxyCase):
    """``trips`` request/response round trips of ``MESSAGE_SIZE`` bytes each way."""

    workload = "proxy-round-trips"
    title = "request/response through a proxy"

    def __init__(self, method: str, trips: int) -> None:
        super().__init__(method, 2 * trips * MESSAGE_SIZE)
        self.trips = trips

    def _setup_round(self) -> None:
        self._server = Peer("echo-server", MESSAGE_SIZE)
        self._held.endpoints.append(self._server)
        self._client = Peer("rr-client", self._port, self.trips, MESSAGE_SIZE)
        self._held.endpoints.append(self._client)
        (server_port,) = self._server.ready()
        self._client.ready()
        self._connect(int(server_port))

    def _round(self) -> None:
        self._client.go()
        self._relay_both()

    def _verify_round(self) -> None:
        (client_trips,) = self._client.finish()
        (server_trips,) = self._server.finish()
        if int(client_trips) != self.trips or int(server_trips) != self.trips:
            raise BenchError(
                f"{self.workload}/{self.method}: {client_trips}/{server_trips}"
                f" round trips, not {self.trips}"
            )
