"""``Relay.method`` (and ``CopyJob.method``) names a path only once it moves bytes.

Each test stops the copy at a point where it has started, or even chosen its
path, but has moved nothing yet, and looks there: a signal handler that runs
inside ``CopyJob.run()`` in the main thread, or a buffered writer whose
``flush()`` (run by the worker before the copy) waits for the test.
"""

from __future__ import annotations

import io
import os
import signal
import threading
from types import FrameType

import pytest

import fastpipe
from fastpipe import _impl

from conftest import Endpoints, write_all

# The path each sink kind takes from a pipe source once bytes flow.
FROM_PIPE = {"file": "splice", "pipe": "splice", "unix": "splice", "tcp": "splice"}


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("sink_kind", sorted(FROM_PIPE))
def test_a_copy_waiting_for_its_first_byte_names_no_path(
    endpoints: Endpoints, sink_kind: str, zerocopy: bool
) -> None:
    """Blocked on an empty pipe (its path chosen, nothing moved), the copy
    says None; once the bytes have gone through, the path they took."""
    r, w = os.pipe()
    dst = endpoints.sink(sink_kind)
    data = os.urandom(300_000)
    job = _impl.CopyJob(r, dst.fd, zerocopy=zerocopy)
    seen: list[tuple[str | None, int]] = []
    writers: list[threading.Thread] = []

    def look(signum: int, frame: FrameType | None) -> None:
        # Handlers run in the main thread only where the copy waits (after
        # choosing its path); one that comes before run() looks again later.
        if not job.started or seen:
            return
        seen.append((job.method, job.bytes_copied))
        writer = threading.Thread(target=write_all, args=(w, data, True))
        writers.append(writer)
        writer.start()

    old = signal.signal(signal.SIGALRM, look)
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    try:
        n = job.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for writer in writers:
            writer.join(30)
        os.close(r)
    assert seen == [(None, 0)]
    assert n == len(data)
    assert dst.received() == data
    assert job.method == (FROM_PIPE[sink_kind] if zerocopy else "readwrite")


class HeldWriter(io.BufferedWriter):
    """A buffered file writer whose first ``flush()`` waits for the test."""

    def __init__(self, raw: io.RawIOBase) -> None:
        super().__init__(raw)
        self.entered = threading.Event()
        self.release = threading.Event()

    def flush(self) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        super().flush()


def test_a_relay_names_no_path_before_it_has_chosen_one(tmp_path) -> None:
    """A worker that has taken the relay flushes its buffered writer before
    it looks at the fds: running, but no path yet."""
    data = os.urandom(1 << 20)
    (tmp_path / "src").write_bytes(data)
    src = open(tmp_path / "src", "rb")
    dst = HeldWriter(io.FileIO(tmp_path / "dst", "w"))
    dst.write(b"head")  # waits in the object's buffer: flushed first
    relay = fastpipe.relay(src, dst)
    try:
        assert dst.entered.wait(30)
        assert relay.running()
        assert relay.method is None
        assert relay.bytes_copied == 0
    finally:
        dst.release.set()
    assert relay.result(timeout=30) == len(data)
    assert relay.method == "copy_file_range"
    assert (tmp_path / "dst").read_bytes() == b"head" + data


def test_a_relay_that_moved_nothing_names_no_path(tmp_path) -> None:
    """``count=0`` moves nothing, so no path is named, before or after."""
    (tmp_path / "src").write_bytes(b"data")
    relay = fastpipe.relay(open(tmp_path / "src", "rb"), open(tmp_path / "dst", "wb"), count=0)
    assert relay.result(timeout=30) == 0
    assert relay.method is None
    assert (tmp_path / "dst").read_bytes() == b""
