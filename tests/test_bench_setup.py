"""The benchmark's own setup: what every method shares must be the same for all."""

from __future__ import annotations

import itertools
import os
import tempfile

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastpipe._bench import baselines, common, host, methods, pattern, runner, workloads
from fastpipe._bench.cases import Case

SIZE = 3 * common.MiB // 2


def test_file_cases_share_one_source_until_the_last_closes(tmp_path) -> None:
    first = workloads.FileToFile(methods.FASTPIPE, SIZE, str(tmp_path))
    second = workloads.FileToFile(methods.COPYFILEOBJ, SIZE, str(tmp_path))
    assert first.src_path == second.src_path
    first.warmup_rounds = second.warmup_rounds = 0  # every round recorded
    try:
        for case in (first, second):
            runner.run_round(case)  # verifies every byte of the destination
            assert len(case.samples) == 1
        first.close()
        assert os.path.exists(second.src_path), "closed while another case reads it"
        runner.run_round(second)
        assert len(second.samples) == 2
    finally:
        first.close()
        second.close()
    assert os.listdir(tmp_path) == []


def test_closing_an_unprepared_case_leaves_the_shared_source(tmp_path) -> None:
    used = workloads.FileToFile(methods.FASTPIPE, SIZE, str(tmp_path))
    unused = workloads.FileToFile(methods.COPYFILEOBJ, SIZE, str(tmp_path))
    try:
        used.prepare()
        unused.close()
        runner.run_round(used)
    finally:
        used.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two CPUs to pin to",
)
def test_warming_frees_pages_on_every_cpu_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    seen: list[tuple[set[int], int, bool]] = []
    real = os.posix_fallocate

    def spy(fd: int, offset: int, length: int) -> None:
        # Where the pages are allocated is the point: on the one CPU the thread is pinned to.
        seen.append((os.sched_getaffinity(0), length, os.fstat(fd).st_nlink == 1))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    monkeypatch.setattr(host, "free_page_reporting", lambda: True)
    mine = os.sched_getaffinity(0)
    host.warm_page_lists(str(tmp_path), SIZE)
    assert [cpus for cpus, _, _ in seen] == [{cpu} for cpu in sorted(mine)]
    assert all(length >= SIZE and linked for _, length, linked in seen)
    assert os.sched_getaffinity(0) == mine, "the caller's own affinity changed"
    assert os.listdir(tmp_path) == []


def test_warming_that_cannot_allocate_leaves_nothing(tmp_path, monkeypatch) -> None:
    calls = []

    def full(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(host, "free_page_reporting", lambda: True)
    host.warm_page_lists(str(tmp_path), SIZE)
    if len(os.sched_getaffinity(0)) > 1:
        assert calls, "it did not try"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("why", ["turned off", "no free page reporting", "too many CPUs"])
def test_warming_does_nothing_where_it_is_not_wanted(tmp_path, monkeypatch, why) -> None:
    calls = []
    monkeypatch.setattr(os, "posix_fallocate", lambda *args: calls.append(args))
    monkeypatch.setattr(host, "free_page_reporting", lambda: why != "no free page reporting")
    monkeypatch.setattr(host, "WARM_PAGES", why != "turned off")
    if why == "too many CPUs":
        monkeypatch.setattr(host, "WARM_MAX_CPUS", 1)
    host.warm_page_lists(str(tmp_path), SIZE)
    assert calls == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ({"virtio0": ("0x0005", "0110010100" + "0" * 54)}, True),  # this project's machines
        ({"virtio0": ("0x0005", "0110000100" + "0" * 54)}, False),  # a balloon, no reporting
        ({"virtio0": ("0x0001", "1100011010" + "0" * 54)}, False),  # a NIC with bit 5 set
        ({"virtio0": ("0x0002", "0"), "virtio1": ("0x0005", "0000010")}, True),
        ({}, False),
    ],
)
def test_free_page_reporting_is_read_from_the_balloon_features(tmp_path, devices, expected) -> None:
    for name, (device, features) in devices.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "device").write_text(device + "\n")
        (tmp_path / name / "features").write_text(features + "\n")
    assert host.free_page_reporting(str(tmp_path)) is expected
    assert host.free_page_reporting(str(tmp_path / "missing")) is False


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_scratch_space_falls_back_when_tmpfs_is_too_small() -> None:
    """A container's 64 MiB /dev/shm must not stop the default run with ENOSPC."""
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    assert host.scratch_root(free + 1) == tempfile.gettempdir()
    if os.access("/dev/shm", os.W_OK | os.X_OK):
        assert host.scratch_root(0) == "/dev/shm"


def test_a_file_round_leaves_one_destination_at_a_time(tmp_path) -> None:
    cases = [workloads.FileToFile(m, SIZE, str(tmp_path)) for m in workloads.FileToFile.methods]
    cases += [
        workloads.PipeToFile(m, SIZE, str(tmp_path)) for m in workloads.PipeToFile.methods[:2]
    ]
    try:
        for case in cases:
            runner.run_round(case)
            # Verified, then removed: only the shared source stays between rounds.
            assert os.listdir(tmp_path) == [os.path.basename(cases[0].src_path)]
    finally:
        for case in cases:
            case.close()
    assert os.listdir(tmp_path) == []


def test_file_workloads_share_one_source_across_workloads(tmp_path) -> None:
    to_file = workloads.FileToFile(methods.FASTPIPE, SIZE, str(tmp_path))
    to_tcp = workloads.FileToTcp(methods.FASTPIPE, SIZE, str(tmp_path))
    assert to_file.src_path == to_tcp._source.path
    try:
        to_file.prepare()
        to_tcp.prepare()
        to_file.close()
        assert os.path.exists(to_tcp._source.path), "removed while file -> TCP reads it"
        runner.run_round(to_tcp)
    finally:
        to_file.close()
        to_tcp.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("workload", "method"),
    [(workloads.FileToTcp, m) for m in workloads.FileToTcp.methods]
    + [(workloads.PipeToTcp, m) for m in workloads.PipeToTcp.methods],
)
def test_every_method_of_the_tcp_sink_workloads_passes_its_check(
    tmp_path, workload: type[Case], method: str
) -> None:
    if workload is workloads.FileToTcp:
        case: Case = workloads.FileToTcp(method, SIZE, str(tmp_path))
    else:
        case = workloads.PipeToTcp(method, SIZE)
    case.warmup_rounds = 0
    try:
        runner.run_round(case)  # the sink compares every byte with the pattern
        assert len(case.samples) == 1
        assert case.samples[0].endpoint_cpu > 0
    finally:
        case.close()
    assert os.listdir(tmp_path) == []


class _OneByteShort(workloads.FileToTcp):
    def _round(self) -> None:
        self._held.hand_over()
        try:
            os.sendfile(self._dst.fileno(), self._src, 0, self.nbytes - 1)
        finally:
            os.close(self._src)
            self._dst.close()


def test_the_tcp_sink_catches_a_short_copy(tmp_path) -> None:
    case = _OneByteShort(methods.COPYFILEOBJ, SIZE, str(tmp_path))
    case.warmup_rounds = 0
    try:
        with pytest.raises(common.BenchError, match="the sink says"):
            runner.run_round(case)
        assert case.samples == []
    finally:
        case.close()


def test_socket_sendfile_baseline_needs_a_socket_and_closes_both_ends(tmp_path) -> None:
    src = os.open(tmp_path / "src", os.O_RDWR | os.O_CREAT)
    r, w = os.pipe()
    with pytest.raises(common.BenchError, match="socket object"):
        baselines.socket_sendfile_and_close(src, w)
    for fd in (src, w):
        with pytest.raises(OSError):
            os.fstat(fd)
    os.close(r)


def _stream(nbytes: int) -> bytes:
    return b"".join(bytes(piece) for piece in pattern.iter_pattern(nbytes))


LONGEST = 2 * common.MiB + 20_000  # a read may hold two periods' wraps


@given(
    nbytes=st.integers(min_value=1, max_value=LONGEST),
    cuts=st.lists(st.integers(min_value=0, max_value=LONGEST), max_size=8),
    bad=st.one_of(st.none(), st.integers(min_value=0)),
)
@example(nbytes=LONGEST, cuts=[], bad=common.MiB + 10_000)  # one read, past the first wrap
@settings(max_examples=60, deadline=None)
def test_the_sinks_check_finds_the_first_wrong_byte(
    nbytes: int, cuts: list[int], bad: int | None
) -> None:
    """PatternCheck, fed the stream in reads of any size through one buffer
    whose tail holds an earlier read's bytes, finds the first wrong byte or
    none.  A period is 1 MiB + 4093 bytes, so reads cross its wraps."""
    data = bytearray(_stream(nbytes))
    if bad is not None:
        bad %= nbytes
        data[bad] ^= 0x5A
    buf = bytearray(os.urandom(nbytes))  # stale bytes past every read
    check = pattern.PatternCheck()
    edges = sorted({0, nbytes, *(c for c in cuts if c < nbytes)})
    for start, end in itertools.pairwise(edges):
        buf[: end - start] = data[start:end]
        check.update(buf, end - start)
    assert check.total == nbytes
    assert check.first_bad == (-1 if bad is None else bad)
    assert (check.problem(nbytes) is None) == (bad is None)


def test_the_sinks_check_reports_a_short_or_long_stream() -> None:
    check = pattern.PatternCheck()
    check.update(bytearray(_stream(1000)))
    assert check.problem(1000) is None
    assert check.problem(1001) == "1000 bytes arrived, 1001 were sent"
    assert check.problem(999) == "1000 bytes arrived, 999 were sent"
