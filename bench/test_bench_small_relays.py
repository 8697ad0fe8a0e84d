"""Many small relays: 16 KiB each, 64 in flight, over AF_UNIX socketpairs.

One group: fastpipe.relay, a new threading.Thread per relay running
copyfileobj, ThreadPoolExecutor(64) running copyfileobj, and ``setup-only``,
which makes the same socketpairs, writes, closes and drains without a relay,
so that the others can be quoted net of setup (subtract its time and CPU).
Every method closes the same ends.  Relays per round: FASTPIPE_BENCH_RELAYS.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastpipe._bench import small_relays
from fastpipe._bench.cases import Case

RunCase = Callable[[Case], None]


@pytest.mark.benchmark(group="small-relays")
@pytest.mark.parametrize("method", small_relays.SmallRelays.methods)
def test_small_relays(run_case: RunCase, bench_relays: int, method: str) -> None:
    run_case(small_relays.SmallRelays(method, bench_relays))
