"""The one-line verdict per workload: fastpipe against the fastest standard-library way.

For each workload, the *rival* is the standard-library method (``STDLIB``)
with the highest median throughput in the run.  Then:

* the ratio is fastpipe's median MiB/s over the rival's (the tables'
  speed-up against that method);
* the spread runs from fastpipe's slowest round over the rival's fastest,
  to fastpipe's fastest round over the rival's slowest: every ratio that a
  round of one and a round of the other could give;
* the verdict is "faster" only when the whole spread is above ``NOISE``
  (fastpipe's slowest round beat the rival's fastest by more than 5%),
  "slower" only when it is all below ``1 / NOISE``, and "within noise"
  otherwise.  With fewer than ``MIN_ROUNDS`` rounds of either method there
  is no verdict, only the ratio ("too few rounds").

Why this statistic: a newcomer must not be shown a win or a loss that a
rerun reverses.  Throughput, not time, because some workloads give the
methods different byte counts (the spinning main thread's copyfileobj).
Round against round over all pairs, not per-round pairs, because a noisy
neighbour does not keep to the rounds: two methods that are in fact equal
have their five rounds fall wholly apart by chance with a probability of
2 in 252 (under 1%), and more than 5% apart more rarely still, where
five per-round ratios all fall on one side of 1.0 one time in sixteen.
The spread covers the variation between rounds of one run on one machine;
it says nothing of other machines.

Standard library only, and no timing: it works on the figures a run made.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fastpipe._bench.methods import (
    COPYFILE,
    COPYFILEOBJ,
    COPYFILEOBJ_POOL,
    FASTPIPE,
    METHOD_TITLES,
    READWRITE_LOOP,
    SOCKET_SENDFILE,
    SPLICE_LOOP,
)
from fastpipe._bench.runner import Result

#: The methods that count as "the standard library's way": every baseline
#: that is not fastpipe itself in another setting.
STDLIB = (COPYFILEOBJ, COPYFILEOBJ_POOL, COPYFILE, SOCKET_SENDFILE, SPLICE_LOOP, READWRITE_LOOP)

#: A spread must clear 1.0x by this factor for a win (or 1 / NOISE for a loss).
NOISE = 1.05

#: Rounds each of fastpipe and the rival needs before a verdict is given.
MIN_ROUNDS = 5

FASTER = "faster"
SLOWER = "slower"
WITHIN_NOISE = "within noise"
TOO_FEW_ROUNDS = "too few rounds"


@dataclass(frozen=True)
class Verdict:
    """fastpipe against one rival on one workload.

    Attributes:
        workload: the workload's name.
        rival: the rival method's name.
        ratio: fastpipe's median throughput over the rival's.
        low: fastpipe's slowest round over the rival's fastest.
        high: fastpipe's fastest round over the rival's slowest.
        rounds: the fewer of the two methods' rounds.
        outcome: ``FASTER``, ``SLOWER``, ``WITHIN_NOISE`` or ``TOO_FEW_ROUNDS``.
    """

    workload: str
    rival: str
    ratio: float
    low: float
    high: float
    rounds: int
    outcome: str


def judge(fastpipe: Sequence[float], rival: Sequence[float]) -> tuple[float, float, float, str]:
    """Compare two methods' per-round throughputs (any unit, the same for both).

    Args:
        fastpipe: fastpipe's throughput in each round.
        rival: the rival's throughput in each round.

    Returns:
        ``(ratio, low, high, outcome)``: the ratio of the medians, the
        spread's ends and the verdict, as the module docstring defines them.

    Raises:
        ValueError: a sequence is empty or holds a throughput that is not
            positive.
    """
    if not fastpipe or not rival:
        raise ValueError("a verdict needs at least one round of each method")
    if min(fastpipe) <= 0 or min(rival) <= 0:
        raise ValueError("throughputs must be positive")
    ratio = statistics.median(fastpipe) / statistics.median(rival)
    low = min(fastpipe) / max(rival)
    high = max(fastpipe) / min(rival)
    if min(len(fastpipe), len(rival)) < MIN_ROUNDS:
        outcome = TOO_FEW_ROUNDS
    elif low > NOISE:
        outcome = FASTER
    elif high < 1 / NOISE:
        outcome = SLOWER
    else:
        outcome = WITHIN_NOISE
    return ratio, low, high, outcome


def throughputs(result: Result) -> list[float]:
    """Bytes per second in each of ``result``'s rounds."""
    return [result.nbytes / wall for wall in result.walls if wall > 0]


def verdicts(results: Iterable[Result]) -> list[Verdict]:
    """One verdict per workload that has fastpipe and a standard-library method.

    The rival is the standard-library method with the highest median
    throughput; workloads in the order they first appear in ``results``.
    """
    grouped: dict[str, dict[str, Result]] = {}
    for r in results:
        grouped.setdefault(r.workload, {})[r.method] = r
    found = []
    for workload, cases in grouped.items():
        fast = cases.get(FASTPIPE)
        rivals = [cases[m] for m in STDLIB if m in cases and throughputs(cases[m])]
        if fast is None or not throughputs(fast) or not rivals:
            continue
        rival = max(rivals, key=lambda r: statistics.median(throughputs(r)))
        ratio, low, high, outcome = judge(throughputs(fast), throughputs(rival))
        rounds = min(len(fast.walls), len(rival.walls))
        found.append(Verdict(workload, rival.method, ratio, low, high, rounds, outcome))
    return found


def _x(ratio: float) -> str:
    return f"{ratio:.2f}" if ratio < 10 else f"{ratio:.1f}"


def describe(verdict: Verdict) -> str:
    """The verdict's text after the workload's label, e.g.
    ``1.13x [1.06-1.21]  faster than shutil.copyfile``.

    Without enough rounds it shows no figure at all: one round's ratio is
    exactly what a rerun may reverse.
    """
    rival = METHOD_TITLES.get(verdict.rival, verdict.rival)
    if verdict.outcome == TOO_FEW_ROUNDS:
        return f"{'-':<20}{verdict.rounds} of {MIN_ROUNDS} rounds: too few to judge against {rival}"
    figures = f"{_x(verdict.ratio)}x [{_x(verdict.low)}-{_x(verdict.high)}]"
    if verdict.outcome == FASTER:
        words = f"faster than {rival}"
    elif verdict.outcome == SLOWER:
        words = f"slower than {rival}"
    else:
        words = f"within noise of {rival}"
    return f"{figures:<20}{words}"


#: What the verdict lines mean, for the report and ``fastpipe bench --help``.
EXPLANATION = (
    "Verdict: fastpipe.relay's throughput over the fastest standard-library way's, median "
    "[spread], where the spread runs from fastpipe's slowest round over the other's fastest "
    "to fastpipe's fastest over the other's slowest. It says faster or slower only when the "
    f"whole spread clears 1.0x by more than {round((NOISE - 1) * 100)}%, with at least "
    f"{MIN_ROUNDS} rounds of each; otherwise within noise: a rerun could turn it either way."
)
