"""Latency: how soon a stop reaches a copy that is blocked on an idle fd.

The contract promises about 100 ms for both: ``Relay.cancel()`` stopping a
relay parked on an idle pipe, and Ctrl-C reaching a ``copy_fd`` blocked in
the main thread.  The tests in ``tests/`` check that each arrives at all,
with bounds that no busy machine breaks; the figures are measured here.
Each round's own latency goes to ``extra_info`` (median and worst, in ms):
the timing pytest-benchmark reports includes the set-up in the round.
The 100 ms target is asserted only when measuring, not in the smoke run.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import fastpipe

TARGET_S = 0.1
ROUNDS = 20
# How long a round lets the copy settle into its wait before stopping it.
SETTLE_S = 0.02


def report(benchmark: BenchmarkFixture, latencies: list[float]) -> None:
    median = statistics.median(latencies)
    benchmark.extra_info.update(
        {"median_ms": round(median * 1000, 2), "worst_ms": round(max(latencies) * 1000, 2)}
    )
    if not benchmark.disabled:
        assert median < TARGET_S


@pytest.mark.benchmark(group="latency")
def test_cancel_a_relay_parked_on_an_idle_pipe(benchmark: BenchmarkFixture) -> None:
    latencies: list[float] = []
    writers: list[int] = []

    def cancel_one() -> None:
        r, w = os.pipe()
        writers.append(w)
        relay = pool.relay(r, os.open(os.devnull, os.O_WRONLY))
        os.write(w, b"x")
        while relay.bytes_copied == 0:
            time.sleep(0.001)
        time.sleep(SETTLE_S)  # back in poll on the idle pipe
        start = time.perf_counter()
        assert relay.cancel()
        latencies.append(time.perf_counter() - start)

    with fastpipe.WorkerPool() as pool:
        try:
            benchmark.pedantic(cancel_one, rounds=ROUNDS, iterations=1)
        finally:
            for w in writers:
                os.close(w)
    report(benchmark, latencies)


@pytest.mark.benchmark(group="latency")
def test_ctrl_c_reaches_copy_fd_blocked_in_the_main_thread(benchmark: BenchmarkFixture) -> None:
    latencies: list[float] = []

    def interrupt_one() -> None:
        r, w = os.pipe()
        devnull = os.open(os.devnull, os.O_WRONLY)
        sent: list[float] = []

        def send() -> None:
            time.sleep(SETTLE_S)  # copy_fd is in poll by now
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

        sender = threading.Thread(target=send)
        try:
            sender.start()
            with pytest.raises(KeyboardInterrupt):
                fastpipe.copy_fd(r, devnull)
            latencies.append(time.perf_counter() - sent[0])
        finally:
            sender.join()
            for fd in (r, w, devnull):
                os.close(fd)

    # Python leaves SIGINT ignored when it starts with it ignored (as a
    # background job of a shell without job control does): the default
    # handler is on for this test's duration.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        benchmark.pedantic(interrupt_one, rounds=ROUNDS, iterations=1)
    finally:
        signal.signal(signal.SIGINT, old)
    report(benchmark, latencies)
