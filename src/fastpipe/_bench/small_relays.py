"""The small-relays workload: many short relays at once over AF_UNIX
socketpairs, beside a thread per relay and a thread pool."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from fastpipe._bench.baselines import copyfileobj_and_close
from fastpipe._bench.cases import Case
from fastpipe._bench.common import TIMEOUT, BenchError
from fastpipe._bench.methods import (
    COPYFILEOBJ,
    COPYFILEOBJ_POOL,
    FASTPIPE,
    SETUP_ONLY,
)
from fastpipe._bench.pattern import pattern_block

#: Small relays: bytes per relay, relays in flight at once, relays per round.
SMALL_PAYLOAD = 16 * 1024
SMALL_IN_FLIGHT = 64
SMALL_RELAYS = 2048


def _drain(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class SmallRelays(Case):
    """Many small relays, ``in_flight`` at a time, over AF_UNIX socketpairs.

    Per relay: a source pair (a, b) gets the payload written into ``a`` and
    ``a``'s write side shut down; the relay copies b -> c, where (c, d) is
    the destination pair; then ``d`` is drained and compared with the
    payload.  A round is ``relays // in_flight`` batches, and the
    socketpairs are made inside the timed part, so ``setup-only`` does all
    of it but the relay (it closes b and c itself and drains an empty d):
    subtract it for figures net of setup.  Every method closes b and c
    (fastpipe through ``close=True``); the round closes a and d.

    Args:
        method: ``fastpipe``, ``copyfileobj`` (a new ``threading.Thread`` per
            relay), ``copyfileobj-pool`` (``ThreadPoolExecutor(in_flight)``)
            or ``setup-only``.
        relays: relays per round, a multiple of ``in_flight``.
        payload: bytes per relay.
        in_flight: relays started before the first is drained.

    Raises:
        ValueError: ``relays`` is not a positive multiple of ``in_flight``.
    """

    workload = "small-relays"
    title = "small relays"
    methods = (FASTPIPE, COPYFILEOBJ, COPYFILEOBJ_POOL, SETUP_ONLY)
    how: ClassVar[dict[str, str]] = {
        FASTPIPE: "fastpipe.relay(b, c) per relay (close=True), results checked",
        COPYFILEOBJ: "a new threading.Thread per relay: shutil.copyfileobj, then b and c closed",
        COPYFILEOBJ_POOL: (
            f"ThreadPoolExecutor({SMALL_IN_FLIGHT}).submit per relay: shutil.copyfileobj, "
            "then b and c closed"
        ),
        SETUP_ONLY: "no relay: b and c closed at once, d drained (empty)",
    }

    def __init__(
        self,
        method: str,
        relays: int = SMALL_RELAYS,
        payload: int = SMALL_PAYLOAD,
        in_flight: int = SMALL_IN_FLIGHT,
    ) -> None:
        if relays <= 0 or relays % in_flight:
            raise ValueError(f"relays must be a positive multiple of {in_flight}, got {relays}")
        super().__init__(method, 0 if method == SETUP_ONLY else relays * payload)
        self.relays = relays
        self.payload = payload
        self.in_flight = in_flight
        block = pattern_block()
        # A different payload per slot, so that crossed wires show.
        self._payloads = [block[i * 4099 : i * 4099 + payload] for i in range(in_flight)]
        self._executor: ThreadPoolExecutor | None = None
        self._errors: list[BaseException] = []
        # One verified, unrecorded round grows fastpipe's pool and the
        # executor to in_flight workers, which both keep for the next rounds.
        self.warmup_rounds = 1 if method in (FASTPIPE, COPYFILEOBJ_POOL) else 0

    def _prepare(self) -> None:
        if self.method == COPYFILEOBJ_POOL:
            self._executor = ThreadPoolExecutor(self.in_flight, thread_name_prefix="bench-pool")

    def _round(self) -> None:
        for _ in range(self.relays // self.in_flight):
            self._batch()

    def _batch(self) -> None:
        srcs: list[tuple[socket.socket, socket.socket]] = []
        dsts: list[tuple[socket.socket, socket.socket]] = []
        handles: list[Any] = []
        ok = False
        try:
            for pairs in (srcs, dsts):
                for _ in range(self.in_flight):
                    pairs.append(socket.socketpair())
            for (a, _), data in zip(srcs, self._payloads, strict=True):
                a.sendall(data)
                a.shutdown(socket.SHUT_WR)
            for _, d in dsts:
                d.settimeout(TIMEOUT)  # a hung relay fails the round, not the whole run
            for (_, b), (c, _) in zip(srcs, dsts, strict=True):
                handles.append(self._start(b, c))
            expected = [b""] * self.in_flight if self.method == SETUP_ONLY else self._payloads
            for i, ((_, d), want) in enumerate(zip(dsts, expected, strict=True)):
                got = _drain(d)
                if got != want:
                    raise BenchError(
                        f"{self.workload}/{self.method}: relay {i} of a batch delivered "
                        f"{len(got)} bytes, not the {len(want)} bytes written"
                    )
            for handle in handles:
                self._wait(handle)
            if self._errors:
                raise BenchError(f"{self.workload}/{self.method}: {self._errors[0]!r}")
            ok = True
        finally:
            # Our own ends first: on an error path, a copy still running
            # then ends (EOF, EPIPE) before its fds are closed under it.
            for a, _ in srcs:
                a.close()
            for _, d in dsts:
                d.close()
            if not ok:
                for handle in handles:
                    with contextlib.suppress(Exception):
                        self._wait(handle)
            for _, b in srcs:
                b.close()  # a no-op when the copy closed it
            for c, _ in dsts:
                c.close()
            self._errors.clear()

    def _copy_close(self, b: socket.socket, c: socket.socket) -> None:
        try:
            copyfileobj_and_close(b, c)
        except BaseException as exc:  # noqa: B036 - reported by the round
            self._errors.append(exc)

    def _start(self, b: socket.socket, c: socket.socket) -> Any:
        if self.method == FASTPIPE:
            return self._fastpipe_relay(b, c)
        if self.method == COPYFILEOBJ:
            thread = threading.Thread(target=self._copy_close, args=(b, c))
            thread.start()
            return thread
        if self.method == COPYFILEOBJ_POOL:
            assert self._executor is not None
            return self._executor.submit(self._copy_close, b, c)
        b.close()
        c.close()
        return None

    def _wait(self, handle: Any) -> None:
        if isinstance(handle, threading.Thread):
            handle.join(TIMEOUT)
            if handle.is_alive():
                raise BenchError(f"{self.workload}: a copyfileobj thread hung")
        elif handle is not None:
            copied = handle.result(timeout=TIMEOUT)
            if self.method == FASTPIPE and copied != self.payload:
                raise BenchError(f"{self.workload}: relay() returned {copied}, not {self.payload}")

    def _close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def extra_info(self) -> dict[str, Any]:
        info = super().extra_info()
        info.update(relays=self.relays, payload=self.payload, in_flight=self.in_flight)
        if self.samples:
            wall = statistics.median(s.wall for s in self.samples)
            info["us_per_relay"] = round(wall * 1e6 / self.relays, 2)
        return info
