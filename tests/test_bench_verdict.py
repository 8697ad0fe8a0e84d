"""The verdict of ``fastpipe bench``, on synthetic figures: no timing here.

fastpipe is called faster (or slower) than the fastest standard-library way
only when all of its rounds beat (or lose to) all of that method's rounds by
more than 5%, over at least 5 rounds each; a spread that reaches 1.0x is
"within noise", and too few rounds give no figure at all.
"""

from __future__ import annotations

import io
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpipe._bench import methods, report, suite, verdict
from fastpipe._bench.runner import Result
from fastpipe._cli.main import main

MiB = 1 << 20
FIVE = [1.0, 1.0, 1.0, 1.0, 1.0]


def result(method: str, mib_per_s: list[float], workload: str = "tcp-to-tcp") -> Result:
    """A Result that moved 64 MiB per round at the given rates."""
    nbytes = 64 * MiB
    return Result(
        workload=workload,
        title="TCP -> TCP",
        method=method,
        nbytes=nbytes,
        walls=[nbytes / MiB / rate for rate in mib_per_s],
        cpus=[0.01] * len(mib_per_s),
    )


def test_every_round_well_ahead_is_faster() -> None:
    fast = [200.0, 210.0, 205.0, 198.0, 202.0]
    rival = [100.0, 105.0, 99.0, 101.0, 103.0]
    ratio, low, high, outcome = verdict.judge(fast, rival)
    assert outcome == verdict.FASTER
    assert ratio == pytest.approx(202.0 / 101.0)
    assert low == pytest.approx(198.0 / 105.0)
    assert high == pytest.approx(210.0 / 99.0)


def test_every_round_well_behind_is_slower() -> None:
    _, low, high, outcome = verdict.judge([60.0, 62.0, 58.0, 61.0, 59.0], [100.0] * 5)
    assert outcome == verdict.SLOWER
    assert low < high < 1 / verdict.NOISE


def test_a_spread_across_one_is_within_noise() -> None:
    """One run of TCP -> TCP: 1.25x in some rounds and 0.73x in others.
    The median alone would claim a win; the spread says it is noise."""
    fast = [125.0, 73.0, 110.0, 118.0, 121.0]
    rival = [100.0] * 5
    ratio, low, high, outcome = verdict.judge(fast, rival)
    assert ratio > 1.1
    assert low < 1 < high
    assert outcome == verdict.WITHIN_NOISE


def test_rounds_apart_by_less_than_the_noise_band_are_within_noise() -> None:
    # Every fastpipe round beat every rival round, but by 2-4% at most.
    _, low, _, outcome = verdict.judge([103.0, 104.0, 103.5, 103.2, 103.8], [100.0, 101.0] * 3)
    assert 1 < low < verdict.NOISE
    assert outcome == verdict.WITHIN_NOISE


@pytest.mark.parametrize(
    ("fast", "outcome"),
    [
        (106.0, verdict.FASTER),
        (104.0, verdict.WITHIN_NOISE),
        (100.0, verdict.WITHIN_NOISE),
        (96.0, verdict.WITHIN_NOISE),
        (94.0, verdict.SLOWER),
    ],
)
def test_the_band_is_five_percent_either_way(fast: float, outcome: str) -> None:
    assert verdict.judge([fast] * 5, [100.0] * 5)[3] == outcome


def test_one_round_more_or_less_decides_whether_there_is_a_verdict() -> None:
    few = verdict.MIN_ROUNDS - 1
    assert verdict.judge([300.0] * few, [100.0] * 9)[3] == verdict.TOO_FEW_ROUNDS
    assert verdict.judge([300.0] * 9, [100.0] * few)[3] == verdict.TOO_FEW_ROUNDS
    assert verdict.judge([300.0] * (few + 1), [100.0] * (few + 1))[3] == verdict.FASTER


def test_a_verdict_needs_positive_rounds_of_both() -> None:
    with pytest.raises(ValueError):
        verdict.judge([], FIVE)
    with pytest.raises(ValueError):
        verdict.judge(FIVE, [1.0, 0.0, 1.0, 1.0, 1.0])


rates = st.lists(st.floats(min_value=1.0, max_value=1e5, allow_nan=False), min_size=1, max_size=9)


@given(fast=rates, rival=rates)
def test_the_verdict_never_claims_what_a_pair_of_rounds_contradicts(
    fast: list[float], rival: list[float]
) -> None:
    ratio, low, high, outcome = verdict.judge(fast, rival)
    pairs = [f / r for f, r in itertools.product(fast, rival)]
    assert low <= ratio <= high
    assert low == min(pairs) and high == max(pairs)
    if outcome == verdict.FASTER:
        assert all(p > verdict.NOISE for p in pairs)
    if outcome == verdict.SLOWER:
        assert all(p < 1 / verdict.NOISE for p in pairs)
    if min(pairs) <= 1 <= max(pairs):  # some round won, some lost: it straddles 1.0x
        assert outcome in (verdict.WITHIN_NOISE, verdict.TOO_FEW_ROUNDS)
    if min(len(fast), len(rival)) < verdict.MIN_ROUNDS:
        assert outcome == verdict.TOO_FEW_ROUNDS


@given(fast=rates, rival=rates, scale=st.floats(min_value=1e-3, max_value=1e3))
def test_the_verdict_does_not_depend_on_the_unit(
    fast: list[float], rival: list[float], scale: float
) -> None:
    ratio, _, _, outcome = verdict.judge(fast, rival)
    scaled = verdict.judge([f * scale for f in fast], [r * scale for r in rival])
    assert scaled[0] == pytest.approx(ratio)
    low = min(fast) / max(rival)
    high = max(fast) / min(rival)
    near_an_edge = any(
        edge * 0.999 < x < edge * 1.001
        for x in (low, high)
        for edge in (verdict.NOISE, 1 / verdict.NOISE)
    )
    if not near_an_edge:
        assert scaled[3] == outcome


def test_the_rival_is_the_fastest_standard_library_method() -> None:
    results = [
        result(methods.FASTPIPE, [150.0] * 5),
        result(methods.COPYFILEOBJ, [50.0] * 5),
        result(methods.SPLICE_LOOP, [140.0] * 5),
        result(methods.READWRITE_LOOP, [80.0] * 5),
        # fastpipe in other settings is no rival, however fast.
        result(methods.FASTPIPE_RW, [500.0] * 5),
        result(methods.FASTPIPE_TWIN, [500.0] * 5),
    ]
    (v,) = verdict.verdicts(results)
    assert v.rival == methods.SPLICE_LOOP
    assert v.ratio == pytest.approx(150 / 140)
    assert v.outcome == verdict.FASTER
    assert v.rounds == 5


def test_throughput_not_time_when_the_methods_move_different_byte_counts() -> None:
    """The spinning main thread's copyfileobj moves 1/32 of the bytes: it
    takes less time, yet moves them far slower."""
    fast = Result("tcp-main-spins", "TCP, main spins", methods.FASTPIPE, 32 * MiB, [1.0] * 5, [])
    slow = Result("tcp-main-spins", "TCP, main spins", methods.COPYFILEOBJ, MiB, [0.5] * 5, [])
    (v,) = verdict.verdicts([fast, slow])
    assert v.ratio == pytest.approx(16.0)
    assert v.outcome == verdict.FASTER


def test_no_verdict_without_fastpipe_or_without_a_standard_library_method() -> None:
    assert verdict.verdicts([result(methods.COPYFILEOBJ, [1.0] * 5)]) == []
    only_ours = [result(methods.FASTPIPE, [2.0] * 5), result(methods.FASTPIPE_RW, [1.0] * 5)]
    assert verdict.verdicts(only_ours) == []
    small = [
        result(methods.FASTPIPE, [2.0] * 5, "small-relays"),
        result(methods.SETUP_ONLY, [9.0] * 5, "small-relays"),
    ]
    assert verdict.verdicts(small) == []


def test_workloads_keep_the_order_of_the_run() -> None:
    results = [
        result(methods.FASTPIPE, [2.0] * 5, "b"),
        result(methods.COPYFILEOBJ, [1.0] * 5, "b"),
        result(methods.FASTPIPE, [2.0] * 5, "a"),
        result(methods.COPYFILEOBJ, [1.0] * 5, "a"),
    ]
    assert [v.workload for v in verdict.verdicts(results)] == ["b", "a"]


@pytest.mark.parametrize(
    ("fast", "words"),
    [
        ([200.0] * 5, "faster than os.splice loop"),
        ([50.0] * 5, "slower than os.splice loop"),
        ([80.0, 120.0, 100.0, 90.0, 110.0], "within noise of os.splice loop"),
    ],
)
def test_the_line_says_ratio_spread_and_verdict(fast: list[float], words: str) -> None:
    (v,) = verdict.verdicts(
        [result(methods.FASTPIPE, fast), result(methods.SPLICE_LOOP, [100.0] * 5)]
    )
    line = verdict.describe(v)
    assert line.endswith(words)
    assert line.startswith(f"{v.ratio:.2f}x [{v.low:.2f}-{v.high:.2f}]")


def test_too_few_rounds_show_no_ratio_at_all() -> None:
    """One round's ratio is what a rerun may reverse: not even a figure."""
    (v,) = verdict.verdicts(
        [result(methods.FASTPIPE, [10.0]), result(methods.COPYFILEOBJ, [100.0])]
    )
    line = verdict.describe(v)
    assert v.outcome == verdict.TOO_FEW_ROUNDS
    assert "x [" not in line and "0.10" not in line
    assert f"1 of {verdict.MIN_ROUNDS} rounds: too few to judge against copyfileobj" in line


def test_the_report_opens_with_the_verdicts_and_explains_them() -> None:
    results = [
        result(methods.FASTPIPE, [125.0, 73.0, 110.0, 118.0, 121.0]),
        result(methods.COPYFILEOBJ, [50.0] * 5),
        result(methods.SPLICE_LOOP, [100.0] * 5),
    ]
    text = report.format_report(results, "HEADER")
    lines = text.splitlines()
    assert lines[0] == "HEADER"
    assert lines[2].startswith("verdict")
    assert lines[3].startswith("TCP -> TCP       64 MiB")
    assert lines[3].endswith("within noise of os.splice loop")
    assert "slower" not in lines[3] and "faster" not in lines[3]
    assert "clears 1.0x by more than 5%" in " ".join(text.split())
    assert text.index("verdict") < text.index("wall ms: median [best]")


def test_the_json_document_carries_the_verdicts(tmp_path) -> None:
    results = [result(methods.FASTPIPE, [200.0] * 5), result(methods.COPYFILEOBJ, [100.0] * 5)]
    path = tmp_path / "bench.json"
    idle = {"relays": 1000, "rss_kib_per_relay": 1.0, "workers": 1, "buffers_in_use": 0}
    suite._write_json(str(path), results, 64 * MiB, 2048, 5, idle, io.StringIO())
    doc = json.loads(path.read_text())
    assert doc["verdict_rule"] == {"noise": verdict.NOISE, "min_rounds": verdict.MIN_ROUNDS}
    (v,) = doc["verdicts"]
    assert v["workload"] == "tcp-to-tcp"
    assert v["rival"] == methods.COPYFILEOBJ
    assert v["outcome"] == verdict.FASTER
    assert v["ratio"] == pytest.approx(2.0)


def test_the_default_run_has_rounds_enough_for_a_verdict() -> None:
    assert suite.DEFAULT_REPEAT >= verdict.MIN_ROUNDS


def test_bench_help_states_the_statistic(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "fastest standard-library way" in text
    assert "spread runs from fastpipe's slowest round over the other's fastest" in text
    assert "within noise" in text
    assert f"at least {verdict.MIN_ROUNDS} rounds" in text
