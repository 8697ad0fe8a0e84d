"""A TCP relay while the main thread spins in pure Python.

The sender and the sink run in other processes.  fastpipe relays in its
worker; copyfileobj copies in a threading.Thread; meanwhile the main thread
runs a Python loop until the copy's future is done.  ``fastpipe-idle-main``
is the same relay with the main thread waiting in ``result()``: spinning/idle
is the cost of a busy main thread.

copyfileobj competes with the spinning thread for the GIL at every 64 KiB
read and write, so it moves 1/32 of the bytes: compare ``MiB_per_s`` or
``ms_per_MiB`` in extra_info, not the raw times.  ``relay_cpu_s`` is the
process's CPU time minus the main thread's; ``main_loops_per_s`` is how much
Python the main thread got done meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastpipe._bench import workloads
from fastpipe._bench.cases import Case

RunCase = Callable[[Case], None]


@pytest.mark.benchmark(group="tcp-main-spins")
@pytest.mark.parametrize("method", workloads.TcpMainSpins.methods)
def test_tcp_main_spins(run_case: RunCase, bench_size: int, method: str) -> None:
    run_case(workloads.TcpMainSpins(method, bench_size))
