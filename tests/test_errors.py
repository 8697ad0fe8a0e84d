"""Bad input fails at once with TypeError/ValueError; OS errors carry their errno."""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

import fastpipe
from fastpipe import _checks, _impl

from conftest import Endpoints, close_quietly, open_fds


@pytest.mark.parametrize(
    ("args", "kwargs", "exc"),
    [
        (("0", 1), {}, TypeError),
        ((0, 1.0), {}, TypeError),
        ((None, 1), {}, TypeError),
        ((True, 1), {}, TypeError),
        ((-1, 1), {}, ValueError),
        ((0, -5), {}, ValueError),
        ((0, 1 << 40), {}, ValueError),
        ((0, 1, -1), {}, ValueError),
        ((0, 1, "10"), {}, TypeError),
        ((0, 1, 2.5), {}, TypeError),
    ],
)
def test_copy_fd_rejects_bad_arguments_at_once(args, kwargs, exc) -> None:
    with pytest.raises(exc):
        fastpipe.copy_fd(*args, **kwargs)


def test_copy_fd_bad_fd_is_ebadf() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        fastpipe.copy_fd(r, w)
    assert info.value.errno == errno.EBADF


def test_copy_fd_directory_source_is_eisdir(tmp_path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(IsADirectoryError):
            fastpipe.copy_fd(fd, devnull)
    finally:
        os.close(fd)
        os.close(devnull)


def test_pipe_with_no_reader_raises_broken_pipe(endpoints: Endpoints) -> None:
    src = endpoints.source("file", os.urandom(100_000))
    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(BrokenPipeError) as info:
            fastpipe.copy_fd(src.fd, w)
        assert info.value.errno == errno.EPIPE
    finally:
        os.close(w)


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_socket_with_closed_peer_raises_epipe_not_sigpipe(endpoints: Endpoints, family) -> None:
    from conftest import socket_pair

    src = endpoints.source("file", os.urandom(3_000_000))
    a, b = socket_pair(family)
    b.close()
    try:
        # A closed TCP peer answers with RST: EPIPE or ECONNRESET, both
        # OSError subclasses; never a SIGPIPE that kills the process.
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            fastpipe.copy_fd(src.fd, a.fileno())
    finally:
        a.close()


def test_full_device_raises_enospc(endpoints: Endpoints) -> None:
    src = endpoints.source("file", os.urandom(100_000))
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            fastpipe.copy_fd(src.fd, full)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(full)


class NoFileno:
    pass


class BadFileno:
    def fileno(self) -> str:
        return "3"


@pytest.mark.parametrize(
    ("obj", "exc"),
    [
        (NoFileno(), TypeError),
        (BadFileno(), TypeError),
        ("/etc/passwd", TypeError),
        (b"data", TypeError),
        (3.0, TypeError),
        (None, TypeError),
        (False, TypeError),
        (io.BytesIO(b"x"), TypeError),
        (io.StringIO("x"), TypeError),
        (-1, ValueError),
    ],
)
def test_relay_rejects_bad_ends_at_once(obj, exc) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(exc):
            fastpipe.relay(obj, devnull)
        with pytest.raises(exc):
            fastpipe.relay(devnull, obj)
    finally:
        os.close(devnull)


def test_relay_rejects_text_mode_files(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_text("hello")
    with open(path) as text, open(os.devnull, "wb") as out, pytest.raises(TypeError):
        fastpipe.relay(text, out)


def test_relay_rejects_closed_socket() -> None:
    a, b = socket.socketpair()
    a.close()
    try:
        with pytest.raises(ValueError):
            fastpipe.relay(a, b)
    finally:
        b.close()


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"count": -1}, ValueError),
        ({"count": "1"}, TypeError),
        ({"count": 1.5}, TypeError),
        ({"idle_timeout": 0}, ValueError),
        ({"idle_timeout": -1.0}, ValueError),
        ({"idle_timeout": "1"}, TypeError),
    ],
)
def test_relay_rejects_bad_keywords_at_once(kwargs, exc) -> None:
    r, w = os.pipe()
    before = fastpipe.default_pool().stats()["busy"]
    try:
        with pytest.raises(exc):
            fastpipe.relay(r, w, **kwargs)
        # Nothing was started, and nothing was closed.
        assert fastpipe.default_pool().stats()["busy"] == before
        os.fstat(r)
        os.fstat(w)
    finally:
        os.close(r)
        os.close(w)


BAD_FDS = ["3", 3.0, None, True, -1, -(1 << 70), 1 << 31, 1 << 70]
BAD_COUNTS = ["10", 2.5, True, -1, -(1 << 70), 1 << 63, 1 << 70]
BAD_TIMEOUTS = ["1", True, b"1", 0, 0.0, -1, -1e300, float("nan"), float("-inf")]


def raised(call: Callable[[], object]) -> tuple[type[BaseException], str]:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("fd", BAD_FDS, ids=repr)
def test_fd_checks_say_the_same_in_both_twins_and_relay(fd: object) -> None:
    """One set of messages: the Python side's checks (the twin, relay() and
    proxy()) and the compiled core's own, for callers of copy_fd."""
    ours = raised(lambda: _checks.check_fd(fd, "src_fd"))
    assert raised(lambda: _impl.CopyJob(fd, 1)) == ours
    assert raised(lambda: fastpipe.copy_fd(fd, 1)) == ours
    assert raised(lambda: _impl.fd_ready(fd)) == (ours[0], ours[1].replace("src_fd", "fd"))
    if isinstance(fd, int) and not isinstance(fd, bool):
        # relay() and proxy() take objects too, so only an int's range and
        # sign are the fd check's to report (a str is "no fileno()").
        expected = (ours[0], ours[1].replace("src_fd", "src"))
        assert raised(lambda: fastpipe.relay(fd, 1, close=False)) == expected
        expected = (ours[0], ours[1].replace("src_fd", "b[0]"))
        assert raised(lambda: fastpipe.proxy(0, (fd, 1), close=False)) == expected


@pytest.mark.parametrize("count", BAD_COUNTS, ids=repr)
def test_count_checks_say_the_same_in_both_twins_and_relay(count: object) -> None:
    ours = raised(lambda: _checks.check_count(count))
    assert raised(lambda: _impl.CopyJob(0, 1, count)) == ours
    assert raised(lambda: fastpipe.copy_fd(0, 1, count)) == ours
    assert raised(lambda: fastpipe.relay(0, 1, count=count, close=False)) == ours


@pytest.mark.parametrize("seconds", BAD_TIMEOUTS, ids=repr)
def test_idle_timeout_checks_say_the_same_in_both_twins_relay_and_proxy(seconds: object) -> None:
    ours = raised(lambda: _checks.check_idle_timeout(seconds))
    assert raised(lambda: _impl.CopyJob(0, 1, idle_timeout=seconds)) == ours
    assert raised(lambda: fastpipe.relay(0, 1, idle_timeout=seconds, close=False)) == ours
    assert raised(lambda: fastpipe.proxy(0, 1, idle_timeout=seconds, close=False)) == ours


def test_relay_reports_os_errors_through_the_future_not_at_once() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    relay = fastpipe.relay(r, w, close=False)  # no exception here
    with pytest.raises(OSError) as info:
        relay.result(timeout=10)
    assert info.value.errno == errno.EBADF
    assert relay.exception() is info.value


def test_relay_enospc_through_the_future_and_ends_are_closed(endpoints: Endpoints) -> None:
    before = open_fds()
    src = endpoints.source("file", os.urandom(100_000))
    full = os.open("/dev/full", os.O_WRONLY)
    relay = fastpipe.relay(src.disown(), full)
    with pytest.raises(OSError) as info:
        relay.result(timeout=10)
    assert info.value.errno == errno.ENOSPC
    assert open_fds() <= before


def test_relay_broken_pipe_through_the_future(endpoints: Endpoints) -> None:
    src = endpoints.source("file", os.urandom(300_000))
    r, w = os.pipe()
    close_quietly(r)
    relay = fastpipe.relay(src.disown(), w)
    assert isinstance(relay.exception(timeout=10), BrokenPipeError)


_SIGPIPE_SCRIPT = r"""
import os, signal, socket, sys
import fastpipe
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as CLI tools do: die under `| head`
how, zerocopy = sys.argv[1], sys.argv[2] == "1"
r, w = os.pipe()
os.write(w, b"x" * 60000)
os.close(w)
if how.endswith("pipe"):
    out_r, out = os.pipe()
    os.close(out_r)
else:
    out, peer = socket.socketpair()
    peer.close()
try:
    if how.startswith("relay"):
        fastpipe.relay(r, out, zerocopy=zerocopy).result(10)
    else:
        fastpipe.copy_fd(r, out if isinstance(out, int) else out.fileno(), zerocopy=zerocopy)
except BrokenPipeError:
    print("BrokenPipeError")
assert signal.SIGPIPE not in signal.pthread_sigmask(signal.SIG_BLOCK, []), "mask not restored"
"""


@pytest.mark.parametrize("zerocopy", [True, False], ids=["zerocopy", "readwrite"])
@pytest.mark.parametrize("how", ["relay-socket", "relay-pipe", "copy_fd-socket", "copy_fd-pipe"])
def test_epipe_never_kills_a_process_with_default_sigpipe(how: str, zerocopy: bool) -> None:
    """writev, splice and sendfile raise SIGPIPE; sendmsg's MSG_NOSIGNAL
    does not cover them.  A program with SIGPIPE at SIG_DFL must get
    BrokenPipeError and live."""
    proc = subprocess.run(
        [sys.executable, "-c", _SIGPIPE_SCRIPT, how, "1" if zerocopy else "0"],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode()[-2000:])
    assert proc.stdout.strip() == b"BrokenPipeError"
