"""Fixtures for the pytest-benchmark files.

The workloads live in ``fastpipe._bench``, the same code that ``fastpipe bench``
runs: each benchmark builds a ``Case`` (one workload, one method) from the
``bench_size``/``bench_relays`` fixtures and hands it to ``run_case``, which
drives it through ``benchmark.pedantic``: the case's setup (endpoint
processes, fds) and its verification run outside the timing.

Run them explicitly (``testpaths`` is ``tests``)::

    PYTHONPATH=src python -m pytest bench -q                      # measure
    PYTHONPATH=src python -m pytest bench -q --benchmark-disable  # smoke run

Environment:
    FASTPIPE_BENCH_MB: MiB per bulk copy (default 64; full runs use 512).
    FASTPIPE_BENCH_RELAYS: small relays per round, a multiple of 64 (default 2048).
    FASTPIPE_BENCH_ROUNDS: rounds per case (default 5).
    FASTPIPE_BENCH_WARMUP: verified but untimed rounds first (default 1: pytest runs the
        methods one after the other, and the first round after a new 512 MiB file
        or a fresh pool is not like the others).
    FASTPIPE_BENCH_SMOKE: 1 for the smoke sizes even while measuring.

With ``--benchmark-disable`` (or FASTPIPE_BENCH_SMOKE=1) every case runs one
verified round of 4 MiB, or 128 small relays.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import fastpipe
from fastpipe import _pool
from fastpipe._bench import common, host, small_relays, suite
from fastpipe._bench.cases import Case

SMOKE_MB = 4
SMOKE_RELAYS = 2 * small_relays.SMALL_IN_FLIGHT


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


@dataclass(frozen=True)
class BenchConfig:
    """Sizes for one benchmark.

    Attributes:
        size: bytes per bulk copy.
        relays: small relays per round.
        rounds: timed rounds per case.
        warmup: untimed rounds first (at least the case's own).
        smoke: True for a quick correctness run (one round, small sizes).
    """

    size: int
    relays: int
    rounds: int
    warmup: int
    smoke: bool


@pytest.fixture
def bench_config(benchmark: BenchmarkFixture) -> BenchConfig:
    """The sizes: from the environment, or the smoke sizes when benchmarks are off."""
    smoke = benchmark.disabled or _env_int("FASTPIPE_BENCH_SMOKE", 0) > 0
    if smoke:
        return BenchConfig(
            size=SMOKE_MB * common.MiB, relays=SMOKE_RELAYS, rounds=1, warmup=0, smoke=True
        )
    return BenchConfig(
        size=_env_int("FASTPIPE_BENCH_MB", suite.DEFAULT_SIZE_MIB) * common.MiB,
        relays=_env_int("FASTPIPE_BENCH_RELAYS", small_relays.SMALL_RELAYS),
        rounds=_env_int("FASTPIPE_BENCH_ROUNDS", 5),
        warmup=_env_int("FASTPIPE_BENCH_WARMUP", 1),
        smoke=False,
    )


@pytest.fixture
def bench_size(bench_config: BenchConfig) -> int:
    """Bytes per bulk copy."""
    return bench_config.size


@pytest.fixture
def bench_relays(bench_config: BenchConfig) -> int:
    """Small relays per round."""
    return bench_config.relays


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[str]:
    """A directory on tmpfs (``/dev/shm``) when it has room, removed at the end."""
    # The largest size any benchmark of the session may ask for.
    size = max(SMOKE_MB, _env_int("FASTPIPE_BENCH_MB", suite.DEFAULT_SIZE_MIB)) * common.MiB
    path = host.new_scratch_dir(size)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_case(benchmark: BenchmarkFixture, bench_config: BenchConfig) -> Callable[[Case], None]:
    """Return ``run(case)``: benchmark ``case`` and record its figures.

    Timed: ``case.run`` only.  ``case.setup`` (endpoint processes, fds) and
    ``case.finish`` (every byte verified, processes reaped) run around it.
    ``extra_info`` gets the bytes moved, MiB/s, ms/MiB, the relay's CPU
    seconds and CPU s/GiB (medians over the rounds), and how the method runs.
    """

    def run(case: Case) -> None:
        # The smoke run: one round, no warm-up.  Otherwise at least the
        # case's own warm-up (growing worker pools).
        if bench_config.smoke:
            case.warmup_rounds = 0
        else:
            case.warmup_rounds = max(case.warmup_rounds, bench_config.warmup)
        try:
            case.prepare()
            benchmark.pedantic(
                case.run,
                setup=case.setup,
                teardown=case.finish,
                rounds=bench_config.rounds,
                warmup_rounds=case.warmup_rounds,
                iterations=1,
            )
            if benchmark.disabled:
                case.finish()  # pedantic() skips the teardown when disabled
        finally:
            case.close()
        if not case.samples:
            raise AssertionError(f"{case.workload}/{case.method}: no verified round")
        benchmark.extra_info.update(case.extra_info())

    return run


def _child_pids() -> set[int]:
    """Our child processes, zombies included (Linux /proc)."""
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        if int(stat.rsplit(b")", 1)[1].split()[1]) == me:
            kids.add(int(entry))
    return kids


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a benchmark that leaves an fd, a child process, a buffer or a pipe behind."""
    has_proc = os.path.isdir("/proc/self/fd")
    fastpipe.trim_pipes()  # idle pooled pipes are the pool's, not a leak
    fds = set(os.listdir("/proc/self/fd")) if has_proc else set()
    kids = _child_pids() if has_proc else set()
    yield
    fastpipe.trim_pipes()
    if has_proc:
        # A pool's poller (its epoll set and eventfd) opens when a relay
        # first parks and is the pool's, not a leak.
        pollers = {str(fd) for pool in list(_pool._live_pools) for fd in pool._core.poller_fds()}
        leaked = set(os.listdir("/proc/self/fd")) - fds - pollers
        assert not leaked, f"fds left open: {sorted(leaked, key=int)}"
        left = _child_pids() - kids
        assert not left, f"endpoint processes left behind: {sorted(left)}"
    assert fastpipe.buffer_stats()["in_use"] == 0, fastpipe.buffer_stats()
    assert fastpipe.pipe_stats()["in_use"] == 0, fastpipe.pipe_stats()
