"""``fastpipe forward`` against a port forwarder on asyncio streams, both as processes.

Groups: ``forward-bulk`` (a sender process -> forwarder -> a sink process
that checks every byte) and ``forward-round-trips`` (100-byte request/response
round trips through each forwarder, and ``direct`` without one).  See
``fastpipe._bench.forward``.  ``extra_info`` has MiB/s and the forwarder's CPU
time for bulk, and per-round-trip latency (``rtt_median_us``: the median of
the rounds' medians, ``rtt_best_median_us``, ``rtt_p99_us``) for round trips.

Sizes: FASTPIPE_BENCH_MB for bulk (see conftest.py) and
FASTPIPE_BENCH_FORWARD_TRIPS (default 1000) round trips; the smoke run
(``--benchmark-disable``) moves 4 MiB and makes 40 round trips.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from fastpipe._bench import forward as _bench_forward
from fastpipe._bench.cases import Case

from conftest import BenchConfig

RunCase = Callable[[Case], None]

SMOKE_ROUND_TRIPS = 40


@pytest.mark.benchmark(group="forward-bulk")
@pytest.mark.parametrize("method", _bench_forward.ForwardBulk.methods)
def test_forward_bulk(run_case: RunCase, bench_size: int, method: str) -> None:
    run_case(_bench_forward.ForwardBulk(method, bench_size))


@pytest.mark.benchmark(group="forward-round-trips")
@pytest.mark.parametrize("method", _bench_forward.ForwardRoundTrips.methods)
def test_forward_round_trips(run_case: RunCase, bench_config: BenchConfig, method: str) -> None:
    trips = int(os.environ.get("FASTPIPE_BENCH_FORWARD_TRIPS", "") or _bench_forward.ROUND_TRIPS)
    if bench_config.smoke:
        trips = SMOKE_ROUND_TRIPS
    run_case(_bench_forward.ForwardRoundTrips(method, trips))
