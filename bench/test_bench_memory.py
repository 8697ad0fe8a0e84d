"""Parked relays: RSS per relay parked on an idle pipe and per ``proxy()``
connection parked on idle sockets, and the threads they take, each measured
in a fresh process.

A parked relay holds no thread, buffer or pipe: what it costs is its Python
objects and the poller's bookkeeping.  The benchmark fails above the
targets; the timing is how long a fresh process takes to park them all.
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fastpipe._bench import memory

RELAYS = 3000
PROXIES = 2000
TARGET_KIB = {"relay": 2.0, "proxy": 3.0}
MAX_THREADS = 16


@pytest.mark.benchmark(group="parked")
@pytest.mark.parametrize(("kind", "n"), [("relay", RELAYS), ("proxy", PROXIES)])
def test_parked_rss_and_threads(benchmark: BenchmarkFixture, kind: str, n: int) -> None:
    results: list[dict[str, float | int]] = []

    def measure() -> None:
        results.append(memory.measure_parked(kind, n))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    m = results[-1]
    benchmark.extra_info.update(m)
    assert m["ok"] == n
    assert m["buffers_in_use"] == m["pipes_in_use"] == 0
    assert m["threads"] <= MAX_THREADS
    assert m["rss_kib_each"] <= TARGET_KIB[kind]
