"""proxy(): bulk and round trips over TCP loopback, beside the usual relays.

Each group holds ``fastpipe-proxy`` and its two baselines, an asyncio-streams
relay and two threads running ``shutil.copyfileobj`` (see
``fastpipe._bench.proxy``).  The peers run in other processes.

Sizes: FASTPIPE_BENCH_MB for the bulk copy (see conftest.py) and
FASTPIPE_BENCH_ROUND_TRIPS (default 2000) of 100 bytes each way; the smoke
run (``--benchmark-disable``) moves 4 MiB and makes 40 round trips.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from fastpipe._bench import proxy as _bench_proxy
from fastpipe._bench.cases import Case

from conftest import BenchConfig

RunCase = Callable[[Case], None]

SMOKE_ROUND_TRIPS = 40


@pytest.mark.benchmark(group="proxy-bulk")
@pytest.mark.parametrize("method", _bench_proxy.ProxyBulk.methods)
def test_proxy_bulk(run_case: RunCase, bench_size: int, method: str) -> None:
    run_case(_bench_proxy.ProxyBulk(method, bench_size))


@pytest.mark.benchmark(group="proxy-round-trips")
@pytest.mark.parametrize("method", _bench_proxy.ProxyRoundTrips.methods)
def test_proxy_round_trips(run_case: RunCase, bench_config: BenchConfig, method: str) -> None:
    trips = int(os.environ.get("FASTPIPE_BENCH_ROUND_TRIPS", "") or _bench_proxy.ROUND_TRIPS)
    if bench_config.smoke:
        trips = SMOKE_ROUND_TRIPS
    run_case(_bench_proxy.ProxyRoundTrips(method, trips))
