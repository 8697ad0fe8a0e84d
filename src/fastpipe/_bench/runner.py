"""Running a workload: each case's warm-up rounds, then the methods taking
turns round by round; the verified rounds come back as ``Result``s."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastpipe._bench.cases import Case
from fastpipe._bench.common import GiB, MiB
from fastpipe._bench.small_relays import SmallRelays
from fastpipe._bench.workloads import (
    FileToFile,
    FileToTcp,
    PipeToFile,
    PipeToTcp,
    TcpMainSpins,
    TcpToTcp,
)


@dataclass
class Result:
    """The verified rounds of one case, as printed and written to JSON."""

    workload: str
    title: str
    method: str
    nbytes: int
    walls: list[float]
    cpus: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    @property
    def best(self) -> float:
        return min(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.median if self.nbytes else 0.0

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu * GiB / self.nbytes if self.nbytes else 0.0


def build_cases(
    size: int, relays: int, directory: str, only: Sequence[str] | None = None
) -> list[list[Case]]:
    """The command line's workloads, each a list of cases (one per method).

    Args:
        only: build just these methods (each workload that has them).
    """

    def methods(cls: type[Case]) -> list[str]:
        return [m for m in cls.methods if only is None or m in only]

    return [
        [FileToFile(m, size, directory) for m in methods(FileToFile)],
        [PipeToFile(m, size, directory) for m in methods(PipeToFile)],
        [TcpToTcp(m, size) for m in methods(TcpToTcp)],
        [FileToTcp(m, size, directory) for m in methods(FileToTcp)],
        [PipeToTcp(m, size) for m in methods(PipeToTcp)],
        [SmallRelays(m, relays) for m in methods(SmallRelays)],
        [TcpMainSpins(m, size) for m in methods(TcpMainSpins)],
    ]


def run_round(case: Case) -> None:
    """One round of ``case``: setup, the timed part, verification."""
    case.setup()
    case.run()
    case.finish()


def run_workload(
    cases: Sequence[Case], repeat: int, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Run each case's warm-up rounds, then ``repeat`` rounds with the methods taking turns.

    Taking turns (A B A B, not A A B B) spreads a noisy neighbour over all
    the methods alike.

    Raises:
        BenchError: a round moved the wrong bytes, or an endpoint failed.
    """
    try:
        for case in cases:
            case.prepare()
            for _ in range(case.warmup_rounds):
                run_round(case)
        for i in range(repeat):
            for case in cases:
                if progress is not None:
                    progress(f"{case.title}: {case.method} {i + 1}/{repeat}")
                run_round(case)
    finally:
        for case in cases:
            case.close()
    return [
        Result(
            workload=case.workload,
            title=case.title,
            method=case.method,
            nbytes=case.nbytes,
            walls=[s.wall for s in case.samples],
            cpus=[s.cpu for s in case.samples],
            extra=case.extra_info(),
        )
        for case in cases
    ]
