"""The case framework: one workload run by one method, round by round.

A ``Case`` is driven round by round: ``setup()`` (not timed: endpoint
processes, fds), ``run()`` (timed) and ``finish()`` (not timed: verifies
every byte, reaps the processes), which is the shape of
``benchmark.pedantic(run, setup=..., teardown=...)``.  ``run()`` also
measures itself (wall and CPU time), so the figures are the same whoever
drives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import fastpipe
from fastpipe._bench.baselines import (
    baseline_and_close,
    close_end,
    copyfileobj_and_close,
    socket_sendfile_and_close,
)
from fastpipe._bench.common import TIMEOUT, BenchError, End, GiB, MiB
from fastpipe._bench.endpoints import Endpoint
from fastpipe._bench.methods import (
    COPYFILEOBJ,
    FASTPIPE,
    FASTPIPE_IDLE,
    FASTPIPE_RW,
    READWRITE_LOOP,
    SOCKET_SENDFILE,
    SPLICE_LOOP,
)


@dataclass(frozen=True)
class Sample:
    """One verified round.

    Attributes:
        wall: seconds of the timed part.
        cpu: CPU seconds of the relay: this process's CPU time, minus the
            main thread's when it spins (the endpoints are other processes).
        nbytes: bytes moved.
        main_cpu: CPU seconds of the main thread when it spins, else 0.
        spin_loops: loops the spinning main thread ran.
        endpoint_cpu: CPU seconds the endpoint processes spent in the
            round (sending, receiving and checking the pattern), or 0.
    """

    wall: float
    cpu: float
    nbytes: int
    main_cpu: float = 0.0
    spin_loops: int = 0
    endpoint_cpu: float = 0.0


class _Held:
    """The fds and processes a round holds, released on every path."""

    def __init__(self) -> None:
        self.ends: list[End] = []
        self.endpoints: list[Endpoint] = []

    def hand_over(self) -> None:
        """The copy owns the ends now, and closes them however it ends."""
        self.ends.clear()

    def release(self) -> None:
        for end in self.ends:
            with contextlib.suppress(OSError):
                close_end(end)
        self.ends.clear()
        for endpoint in self.endpoints:
            endpoint.kill()
        self.endpoints.clear()


class Case:
    """One workload run by one method; see the module docstring.

    Subclasses set ``workload``, ``title`` and ``methods``, implement
    ``_round`` (the timed part) and, as needed, ``_prepare``,
    ``_setup_round``, ``_verify_round`` and ``_close``.  What a round opens
    goes in ``self._held``, which is released after every round and on
    every error.

    Args:
        method: one of ``methods``.
        nbytes: bytes moved per round.

    Raises:
        ValueError: an unknown method.
    """

    workload: ClassVar[str]
    title: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]
    #: How each method runs, for the figures' description.
    how: ClassVar[dict[str, str]] = {
        FASTPIPE: "fastpipe.relay(src, dst).result(): a pool worker copies, the caller waits",
        COPYFILEOBJ: "shutil.copyfileobj in the calling thread, then both ends closed",
    }
    #: The main thread spins during the copy: its CPU time is not the relay's.
    main_spins: ClassVar[bool] = False
    #: Verified but unrecorded rounds first; an instance may change it.
    warmup_rounds = 0
    #: The round's two ends, opened by ``_setup_round`` (bulk workloads).
    _src: End
    _dst: End

    def __init__(self, method: str, nbytes: int) -> None:
        if method not in self.methods:
            raise ValueError(f"{self.workload}: unknown method {method!r}")
        self.method = method
        self.nbytes = nbytes
        self.samples: list[Sample] = []
        self._held = _Held()
        self._pending: Sample | None = None
        self._spin_loops = 0
        self._prepared = False
        self._unrecorded = 0
        self._endpoint_cpu = 0.0
        self._relay: Callable[..., Any] | None = None
        if method in (FASTPIPE, FASTPIPE_IDLE, FASTPIPE_RW):
            self._relay = (
                functools.partial(fastpipe.relay, zerocopy=False)
                if method == FASTPIPE_RW
                else fastpipe.relay
            )

    # -- the pedantic protocol ---------------------------------------------

    def prepare(self) -> None:
        """Once, before the first round (``setup`` calls it if need be)."""
        if not self._prepared:
            self._prepared = True
            self._unrecorded = self.warmup_rounds
            self._prepare()

    def setup(self) -> None:
        """Before each round, not timed."""
        self.prepare()
        self._pending = None
        self._spin_loops = 0
        self._setup_round()

    def run(self) -> None:
        """The timed part of a round; measures its own wall and CPU time."""
        cpu0 = time.process_time()
        main0 = time.thread_time()
        t0 = time.perf_counter()
        self._round()
        t1 = time.perf_counter()
        main1 = time.thread_time()
        cpu1 = time.process_time()
        main_cpu = main1 - main0 if self.main_spins else 0.0
        self._pending = Sample(
            wall=t1 - t0,
            cpu=max(0.0, cpu1 - cpu0 - main_cpu),
            nbytes=self.nbytes,
            main_cpu=main_cpu,
            spin_loops=self._spin_loops,
        )

    def finish(self) -> None:
        """After each round, not timed: verify it, then keep its sample.

        Raises:
            BenchError: the round moved the wrong bytes, or did not run.
        """
        try:
            if self._pending is None:
                raise BenchError(f"{self.workload}/{self.method}: the round did not run")
            self._endpoint_cpu = 0.0
            self._verify_round()
            if self._unrecorded > 0:
                self._unrecorded -= 1  # a warm-up round: verified, not kept
            else:
                self.samples.append(
                    dataclasses.replace(self._pending, endpoint_cpu=self._endpoint_cpu)
                )
        finally:
            self._pending = None
            self._held.release()

    def close(self) -> None:
        """After the last round, or on an error: free everything (idempotent)."""
        self._held.release()
        self._close()

    # -- for subclasses ----------------------------------------------------

    def _prepare(self) -> None:
        pass

    def _setup_round(self) -> None:
        pass

    def _round(self) -> None:
        raise NotImplementedError

    def _verify_round(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _fastpipe_relay(self, src: End, dst: End) -> Any:
        assert self._relay is not None
        relay = self._relay(src, dst)
        self._last_relay = relay
        return relay

    def _copy(self, src: End, dst: End) -> None:
        """Copy src to dst by this case's method; both ends end up closed."""
        self._held.hand_over()
        if self.method == COPYFILEOBJ:
            copyfileobj_and_close(src, dst)
            return
        if self.method in (SPLICE_LOOP, READWRITE_LOOP):
            baseline_and_close(self.method, src, dst)
            return
        if self.method == SOCKET_SENDFILE:
            socket_sendfile_and_close(src, dst)
            return
        copied = self._fastpipe_relay(src, dst).result(timeout=TIMEOUT)
        if copied != self.nbytes:
            raise BenchError(f"{self.workload}: relay() returned {copied}, not {self.nbytes}")

    # -- figures -----------------------------------------------------------

    def extra_info(self) -> dict[str, Any]:
        """Figures for pytest-benchmark's ``extra_info``: medians of the rounds."""
        info: dict[str, Any] = {
            "workload": self.workload,
            "method": self.method,
            "how": self.how[self.method],
            "bytes": self.nbytes,
            "size_MiB": round(self.nbytes / MiB, 3),
            "verified_rounds": len(self.samples),
        }
        last = getattr(self, "_last_relay", None)
        if last is not None and last.method:
            info["method_used"] = last.method
        if self.samples:
            wall = statistics.median(s.wall for s in self.samples)
            cpu = statistics.median(s.cpu for s in self.samples)
            info.update(wall_s=round(wall, 6), relay_cpu_s=round(cpu, 6))
            if any(s.endpoint_cpu for s in self.samples):
                total = statistics.median(s.cpu + s.endpoint_cpu for s in self.samples)
                ends = statistics.median(s.endpoint_cpu for s in self.samples)
                info.update(endpoint_cpu_s=round(ends, 6), total_cpu_s=round(total, 6))
            if self.nbytes:
                info.update(
                    MiB_per_s=round(self.nbytes / MiB / wall, 1),
                    ms_per_MiB=round(wall * 1000 / (self.nbytes / MiB), 4),
                    cpu_s_per_GiB=round(cpu * GiB / self.nbytes, 4),
                )
        return info
