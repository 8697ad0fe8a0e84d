"""Properties, on every copy path: what arrives is exactly what was sent.

Hypothesis draws the size, the count (None, or below, at or beyond the
size), how a producer writes (pieces of random sizes with small pauses),
the receive buffers (small ones force short reads and partial writes) and
the blocking mode.  Each test pins one path and checks ``Relay.method``
says it was taken; with a count, the bytes not copied are still in the
source, file offset included.

Budget: 50 examples per path; the file takes a few seconds per twin.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpipe
from fastpipe import _impl

from conftest import Endpoints, Pieces

EXAMPLES = 50

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # tmp_path is shared by the examples of one test; each example builds
    # (and tears down) its own Endpoints in it.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Sizes around the 32 KiB buffer, the 64 KiB splice threshold, and above.
BOUNDARIES = [0, 1, 32 * 1024 - 1, 32 * 1024, 32 * 1024 + 1, 64 * 1024, 64 * 1024 + 1]
sizes = st.one_of(st.sampled_from(BOUNDARIES), st.integers(min_value=0, max_value=400_000))
pieces_strategy: st.SearchStrategy[list[tuple[int, float]]] = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=100_000),
        st.sampled_from([0.0, 0.0, 0.0005, 0.002, 0.005]),
    ),
    max_size=6,
)
# Below the kernel's minimum (it rounds up), a few pages, and roomy.
rcvbufs = st.sampled_from([None, 1024, 4096, 16384, 200_000])


@dataclass
class Case:
    data: bytes
    count: int | None
    pieces: Pieces
    src_rcvbuf: int | None
    dst_rcvbuf: int | None
    nonblocking: bool

    @property
    def expected(self) -> bytes:
        return self.data if self.count is None else self.data[: self.count]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    size = draw(sizes)
    # Deterministic bytes from a drawn seed: shrinkable, and random enough
    # that a repeated, dropped or shifted chunk cannot compare equal.
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    count = draw(
        st.one_of(
            st.none(),
            st.integers(min_value=0, max_value=max(0, size - 1)),
            st.just(size),
            st.integers(min_value=size + 1, max_value=size + 100_000),
        )
    )
    return Case(
        data=data,
        count=count,
        pieces=draw(pieces_strategy),
        src_rcvbuf=draw(rcvbufs),
        dst_rcvbuf=draw(rcvbufs),
        nonblocking=draw(st.booleans()),
    )


@contextmanager
def endpoints_in(tmp_path: Path) -> Iterator[Endpoints]:
    eps = Endpoints(str(tmp_path))
    try:
        yield eps
    finally:
        eps.close()


@contextmanager
def splice_min_read(nbytes: int | None) -> Iterator[None]:
    """Let a socket source splice from its first byte (0), or keep the default."""
    if nbytes is None:
        yield
        return
    old = _impl._set_splice_min_read(nbytes)
    try:
        yield
    finally:
        _impl._set_splice_min_read(old)


def run_case(
    tmp_path: Path, src_kind: str, dst_kind: str, case: Case, *, zerocopy: bool = True
) -> str | None:
    """Relay one case; check content, count and leftovers; return the method."""
    with endpoints_in(tmp_path) as eps:
        src = eps.source(
            src_kind,
            case.data,
            nonblocking=case.nonblocking,
            pieces=case.pieces,
            rcvbuf=case.src_rcvbuf,
        )
        dst = eps.sink(dst_kind, nonblocking=case.nonblocking, rcvbuf=case.dst_rcvbuf)
        relay = fastpipe.relay(src.fd, dst.fd, close=False, count=case.count, zerocopy=zerocopy)
        n = relay.result(timeout=60)
        assert dst.received() == case.expected
        assert n == relay.bytes_copied == len(case.expected)
        # Not one byte more left the source: the rest is still there.
        assert src.leftover() == case.data[len(case.expected) :]
        return relay.method


def moved_something(case: Case) -> bool:
    return len(case.expected) > 0


def named(case: Case, *methods: str) -> set[str | None]:
    """What ``Relay.method`` may say after ``case``: one of ``methods``, or
    None for ``count=0``, which takes nothing from the source (not even its
    end of file), so no path was ever used."""
    return {None} if case.count == 0 else set(methods)


@SETTINGS
@given(
    case=cases(),
    src_kind=st.sampled_from(["file", "pipe", "unix", "tcp"]),
    dst_kind=st.sampled_from(["file", "pipe", "unix", "tcp"]),
)
def test_readwrite_path(tmp_path: Path, case: Case, src_kind: str, dst_kind: str) -> None:
    assert run_case(tmp_path, src_kind, dst_kind, case, zerocopy=False) in named(case, "readwrite")


@SETTINGS
@given(
    case=cases(),
    kinds=st.sampled_from([("pipe", "pipe"), ("pipe", "unix"), ("pipe", "tcp"), ("file", "pipe")]),
)
def test_splice_with_a_pipe_end(tmp_path: Path, case: Case, kinds: tuple[str, str]) -> None:
    """A pipe at one end: splice straight between the two fds."""
    assert run_case(tmp_path, *kinds, case) in named(case, "splice")


@SETTINGS
@given(
    case=cases(),
    kinds=st.sampled_from([("unix", "unix"), ("tcp", "tcp"), ("unix", "file"), ("tcp", "file")]),
    at_once=st.booleans(),
)
def test_splice_through_the_pooled_pipe(
    tmp_path: Path, case: Case, kinds: tuple[str, str], at_once: bool
) -> None:
    """socket -> socket and socket -> file: splice through one of the pool's pipes.

    By default a socket source starts on read/write and moves to splice once
    a read brings 64 KiB; ``at_once`` splices from the first byte.
    """
    with splice_min_read(0 if at_once else None):
        method = run_case(tmp_path, *kinds, case)
    assert method in (named(case, "splice") if at_once else named(case, "readwrite", "splice"))


@SETTINGS
@given(case=cases())
def test_splice_pipe_to_file_through_the_pooled_pipe(tmp_path: Path, case: Case) -> None:
    assert run_case(tmp_path, "pipe", "file", case) in named(case, "splice")


@SETTINGS
@given(
    case=cases(),
    dst_kind=st.sampled_from(["unix", "tcp"]),
    offset=st.integers(min_value=0, max_value=70_000),
)
def test_sendfile_file_to_socket(tmp_path: Path, case: Case, dst_kind: str, offset: int) -> None:
    case = skip_start_of_file(case, offset)
    method = run_case_from_offset(tmp_path, dst_kind, case, offset)
    if moved_something(case):
        assert method == "sendfile"
    else:
        assert method in named(case, "sendfile", "readwrite")


@SETTINGS
@given(case=cases(), offset=st.integers(min_value=0, max_value=70_000))
def test_copy_file_range_file_to_file(tmp_path: Path, case: Case, offset: int) -> None:
    case = skip_start_of_file(case, offset)
    method = run_case_from_offset(tmp_path, "file", case, offset)
    if moved_something(case):
        assert method == "copy_file_range"
    else:
        # copy_file_range moving nothing is also what procfs does: read()
        # has the last word (docs/design.md: "The kernel paths").
        assert method in named(case, "copy_file_range", "readwrite")


def skip_start_of_file(case: Case, offset: int) -> Case:
    """The case as seen from ``offset`` on: a file source starts there."""
    return Case(
        data=case.data[offset:],
        count=case.count,
        pieces=(),
        src_rcvbuf=None,
        dst_rcvbuf=case.dst_rcvbuf,
        nonblocking=case.nonblocking,
    )


def run_case_from_offset(tmp_path: Path, dst_kind: str, case: Case, offset: int) -> str | None:
    """run_case for a file source whose offset starts at ``offset``."""
    with endpoints_in(tmp_path) as eps:
        head = os.urandom(offset)
        src = eps.source("file", head + case.data)
        os.lseek(src.fd, offset, os.SEEK_SET)
        dst = eps.sink(dst_kind, nonblocking=case.nonblocking, rcvbuf=case.dst_rcvbuf)
        relay = fastpipe.relay(src.fd, dst.fd, close=False, count=case.count)
        n = relay.result(timeout=60)
        assert dst.received() == case.expected
        assert n == relay.bytes_copied == len(case.expected)
        # The file offset moved by exactly what was copied.
        assert os.lseek(src.fd, 0, os.SEEK_CUR) == offset + n
        assert src.leftover() == case.data[n:]
        return relay.method


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@SETTINGS
@given(case=cases())
def test_copy_fd_socket_to_socket(tmp_path: Path, case: Case, zerocopy: bool) -> None:
    """The same property through copy_fd in this thread, not a worker."""
    with endpoints_in(tmp_path) as eps:
        src = eps.source("unix", case.data, pieces=case.pieces, rcvbuf=case.src_rcvbuf)
        dst = eps.sink("tcp", nonblocking=case.nonblocking, rcvbuf=case.dst_rcvbuf)
        n = fastpipe.copy_fd(src.fd, dst.fd, case.count, zerocopy=zerocopy)
        assert n == len(case.expected)
        assert dst.received() == case.expected
        assert src.leftover() == case.data[n:]
