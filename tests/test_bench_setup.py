"""The benchmark's own setup: what every method shares must be the same for all."""

from __future__ import annotations

import os
import tempfile

import pytest

from fastpipe import _bench

SIZE = 3 * _bench.MiB // 2


def test_file_cases_share_one_source_until_the_last_closes(tmp_path) -> None:
    first = _bench.FileToFile(_bench.FASTPIPE, SIZE, str(tmp_path))
    second = _bench.FileToFile(_bench.COPYFILEOBJ, SIZE, str(tmp_path))
    assert first.src_path == second.src_path
    try:
        for case in (first, second):
            _bench.run_round(case)  # verifies every byte of the destination
            assert len(case.samples) == 1
        first.close()
        assert os.path.exists(second.src_path), "closed while another case reads it"
        _bench.run_round(second)
        assert len(second.samples) == 2
    finally:
        first.close()
        second.close()
    assert os.listdir(tmp_path) == []


def test_closing_an_unprepared_case_leaves_the_shared_source(tmp_path) -> None:
    used = _bench.FileToFile(_bench.FASTPIPE, SIZE, str(tmp_path))
    unused = _bench.FileToFile(_bench.COPYFILEOBJ, SIZE, str(tmp_path))
    try:
        used.prepare()
        unused.close()
        _bench.run_round(used)
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
    mine = os.sched_getaffinity(0)
    _bench.warm_page_lists(str(tmp_path), SIZE)
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
    _bench.warm_page_lists(str(tmp_path), SIZE)
    if len(os.sched_getaffinity(0)) > 1:
        assert calls, "it did not try"
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(_bench, "WARM_PAGES", False)
    calls.clear()
    _bench.warm_page_lists(str(tmp_path), SIZE)
    assert calls == []


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_scratch_space_falls_back_when_tmpfs_is_too_small() -> None:
    """A container's 64 MiB /dev/shm must not stop the default run with ENOSPC."""
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    assert _bench.scratch_root(free + 1) == tempfile.gettempdir()
    if os.access("/dev/shm", os.W_OK | os.X_OK):
        assert _bench.scratch_root(0) == "/dev/shm"


def test_a_file_round_leaves_one_destination_at_a_time(tmp_path) -> None:
    cases = [_bench.FileToFile(m, SIZE, str(tmp_path)) for m in _bench.FileToFile.methods]
    cases += [_bench.PipeToFile(m, SIZE, str(tmp_path)) for m in _bench.PipeToFile.methods[:2]]
    try:
        for case in cases:
            _bench.run_round(case)
            # Verified, then removed: only the shared source stays between rounds.
            assert os.listdir(tmp_path) == [os.path.basename(cases[0].src_path)]
    finally:
        for case in cases:
            case.close()
    assert os.listdir(tmp_path) == []
