"""Memory: RSS per relay parked on an idle fd, 1,000 of them, in a fresh process.

A parked relay holds no buffer (it gives its buffers back before it waits),
so what it costs is its worker thread; the benchmark fails above TARGET_KIB.
The timing is how long a fresh pool takes to park that many relays.
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fastpipe._bench import memory

RELAYS = 1000
TARGET_KIB = 24


@pytest.mark.benchmark(group="idle-memory")
def test_idle_relays_rss(benchmark: BenchmarkFixture) -> None:
    results: list[tuple[float, int, int]] = []

    def measure() -> None:
        results.append(memory.measure_idle_rss(RELAYS))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    kib, workers, in_use = results[-1]
    benchmark.extra_info.update(
        {
            "relays": RELAYS,
            "KiB_per_relay": round(kib, 1),
            "workers": workers,
            "buffers_in_use": in_use,
        }
    )
    assert workers == RELAYS
    assert in_use == 0
    assert kib <= TARGET_KIB
