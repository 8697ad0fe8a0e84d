"""``fastpipe cp``, driven as a user would: subprocesses, and a pseudo-terminal for the progress.

Contents are compared byte for byte (or by sha256), never by length alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from fastpipe._cli.progress import PlainProgress, format_bytes

from conftest import wait_for

CP = [sys.executable, "-m", "fastpipe", "cp"]


def cp_command(*, tqdm: bool = True, hup: str = "SIG_DFL") -> list[str]:
    """``fastpipe cp`` with Ctrl-C turned back on; optionally with tqdm unimportable.

    Python leaves SIGINT alone when it starts with SIGINT ignored (as under a
    shell without job control, which a CI runner may be), and ``cp`` leaves
    SIGTERM and SIGHUP alone when it starts with them ignored (as under
    ``nohup``), so the tests that interrupt the copy set each one's start
    explicitly: ``hup="SIG_IGN"`` starts it as ``nohup`` would.  Making tqdm
    unimportable selects the plain fallback display.
    """
    hide_tqdm = "" if tqdm else "sys.modules['tqdm'] = None; "
    prelude = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "signal.signal(signal.SIGTERM, signal.SIG_DFL); "
        f"signal.signal(signal.SIGHUP, signal.{hup}); "
        f"{hide_tqdm}from fastpipe.__main__ import main; sys.exit(main())"
    )
    return [sys.executable, "-c", prelude, "cp"]


#: pexpect.spawn with our options, closed at teardown.
Spawn = Callable[[list[str]], Any]
ERROR_LINE = re.compile(rb"fastpipe cp: error: [^\n]+\n")


def cp(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("capture_output", True)
    return subprocess.run([*CP, *args], timeout=20, check=False, **kwargs)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], ending: str) -> None:
    assert proc.returncode == 1, proc
    assert b"Traceback" not in proc.stderr
    assert ERROR_LINE.fullmatch(proc.stderr), proc.stderr
    assert proc.stderr.decode().rstrip("\n").endswith(ending), proc.stderr


@pytest.fixture
def data() -> bytes:
    # Not a multiple of any buffer size, and not compressible or repetitive.
    return os.urandom(3 * (1 << 20) + 12345)


@pytest.fixture
def src(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_file_to_file_is_silent_off_a_terminal(tmp_path: Path, src: Path, data: bytes) -> None:
    os.chmod(src, 0o750)
    dst = tmp_path / "copy.bin"
    proc = cp(str(src), str(dst))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert proc.stdout == b""
    assert sha256(dst.read_bytes()) == sha256(data)
    # Like cp without -p: the source's permission bits, less the umask.
    assert dst.stat().st_mode & 0o777 == 0o750 & ~current_umask()


def test_an_existing_destination_is_overwritten_not_appended(
    tmp_path: Path, src: Path, data: bytes
) -> None:
    dst = tmp_path / "copy.bin"
    dst.write_bytes(b"old content that is longer than nothing" * 100_000)
    proc = cp(str(src), str(dst))
    assert proc.returncode == 0, proc.stderr
    assert dst.read_bytes() == data


def test_stdin_to_file(tmp_path: Path, data: bytes) -> None:
    dst = tmp_path / "copy.bin"
    proc = cp("-", str(dst), input=data, stdin=None)
    assert proc.returncode == 0, proc.stderr
    assert dst.read_bytes() == data


def test_file_to_stdout(src: Path, data: bytes) -> None:
    proc = cp(str(src), "-")
    assert proc.returncode == 0, proc.stderr
    assert sha256(proc.stdout) == sha256(data)


def test_stdin_to_stdout_through_pipes(data: bytes) -> None:
    proc = cp("-", "-", input=data, stdin=None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data


def test_stdin_from_a_file_starts_at_its_offset(tmp_path: Path, src: Path, data: bytes) -> None:
    dst = tmp_path / "copy.bin"
    with open(src, "rb") as f:
        f.seek(1000)
        proc = cp("-", str(dst), stdin=f)
    assert proc.returncode == 0, proc.stderr
    assert dst.read_bytes() == data[1000:]


def feed_fifo(
    path: Path,
    data: bytes,
    chunk: int = 1 << 16,
    delay: float = 0.0,
    hold: threading.Event | None = None,
) -> threading.Thread:
    """Write ``data`` into the FIFO at ``path`` in a thread, ``chunk`` bytes every ``delay`` s.

    With ``hold``, the rest waits after the first chunk until it is set: a
    copy interrupted meanwhile is partial whatever the machine's speed, and
    the rest then finds no reader (a BrokenPipeError, ignored).
    """

    def run() -> None:
        fd = os.open(path, os.O_WRONLY)  # waits for the reader, as a real writer would
        try:
            for i in range(0, len(data), chunk):
                os.write(fd, data[i : i + chunk])
                if hold is not None and i == 0:
                    hold.wait(60)
                time.sleep(delay)
        except BrokenPipeError:
            pass  # the reader was interrupted on purpose
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_named_pipe_source(tmp_path: Path, data: bytes) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dst = tmp_path / "copy.bin"
    feeder = feed_fifo(fifo, data)
    proc = cp(str(fifo), str(dst))
    feeder.join(10)
    assert proc.returncode == 0, proc.stderr
    assert dst.read_bytes() == data


def test_named_pipe_destination(tmp_path: Path, src: Path, data: bytes) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def drain() -> None:
        with open(fifo, "rb") as f:
            received.append(f.read())

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    proc = cp(str(src), str(fifo))
    drainer.join(10)
    assert proc.returncode == 0, proc.stderr
    assert received == [data]
    assert fifo.is_fifo()  # still a FIFO: not replaced by a regular file


def test_directory_destination_takes_the_source_name(
    tmp_path: Path, src: Path, data: bytes
) -> None:
    into = tmp_path / "into"
    into.mkdir()
    proc = cp(str(src), str(into))
    assert proc.returncode == 0, proc.stderr
    assert (into / src.name).read_bytes() == data
    assert [p.name for p in into.iterdir()] == [src.name]


def test_missing_source_leaves_the_destination_alone(tmp_path: Path) -> None:
    dst = tmp_path / "keep.txt"
    dst.write_bytes(b"precious")
    missing = tmp_path / "missing"
    proc = cp(str(missing), str(dst))
    assert_one_line_error(proc, f"{missing}: No such file or directory")
    assert dst.read_bytes() == b"precious"


def test_directory_source(tmp_path: Path) -> None:
    proc = cp(str(tmp_path), str(tmp_path / "out"))
    assert_one_line_error(proc, f"{tmp_path}: Is a directory")
    assert not (tmp_path / "out").exists()


def test_stdin_into_a_directory_needs_a_file_name(tmp_path: Path) -> None:
    proc = cp("-", str(tmp_path), input=b"x", stdin=None)
    assert_one_line_error(proc, "Is a directory (name the file to create)")


def test_missing_directory_in_the_destination(tmp_path: Path, src: Path) -> None:
    dst = tmp_path / "no" / "such" / "dir" / "out"
    proc = cp(str(src), str(dst))
    assert_one_line_error(proc, f"{dst}: No such file or directory")


def test_copying_a_file_onto_itself_is_refused(tmp_path: Path, src: Path, data: bytes) -> None:
    link = tmp_path / "hard-link"
    os.link(src, link)
    for dst in (src, link, tmp_path):
        proc = cp(str(src), str(dst))
        assert_one_line_error(proc, "are the same file")
        assert src.read_bytes() == data


def test_full_device_is_enospc() -> None:
    proc = cp("/dev/zero", "/dev/full")
    assert_one_line_error(proc, "/dev/full: No space left on device")
    assert os.path.exists("/dev/full")  # a device destination is never removed


def _limited_cp(limit_kib: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``fastpipe cp`` under ``ulimit -f``: writes past the limit fail with EFBIG."""
    script = 'trap "" XFSZ; ulimit -f "$1"; shift; exec "$@"'
    return subprocess.run(
        ["bash", "-c", script, "bash", str(limit_kib), *CP, *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=20,
        check=False,
    )


def test_a_failed_copy_removes_the_partial_file(tmp_path: Path, src: Path) -> None:
    dst = tmp_path / "copy.bin"
    proc = _limited_cp(1024, str(src), str(dst))
    assert_one_line_error(proc, f"{dst}: File too large")
    assert not dst.exists()


def test_keep_partial_keeps_a_prefix(tmp_path: Path, src: Path, data: bytes) -> None:
    dst = tmp_path / "copy.bin"
    proc = _limited_cp(1024, "--keep-partial", str(src), str(dst))
    assert_one_line_error(proc, f"{dst}: File too large")
    assert dst.read_bytes() == data[: 1 << 20]


def _without_permission_override() -> list[str]:
    """A command prefix under which file permissions apply (root bypasses them)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_source(tmp_path: Path, src: Path) -> None:
    os.chmod(src, 0)
    dst = tmp_path / "keep.txt"
    dst.write_bytes(b"precious")
    proc = subprocess.run(
        [*_without_permission_override(), *CP, str(src), str(dst)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=20,
        check=False,
    )
    assert_one_line_error(proc, f"{src}: Permission denied")
    assert dst.read_bytes() == b"precious"


def test_unwritable_destination(tmp_path: Path, src: Path) -> None:
    closed = tmp_path / "read-only"
    closed.mkdir()
    locked = closed / "locked"
    locked.write_bytes(b"precious")
    os.chmod(locked, 0o444)
    os.chmod(closed, 0o555)
    try:
        for dst in (locked, closed / "new"):
            proc = subprocess.run(
                [*_without_permission_override(), *CP, str(src), str(dst)],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=20,
                check=False,
            )
            assert_one_line_error(proc, f"{dst}: Permission denied")
        assert locked.read_bytes() == b"precious"
    finally:
        os.chmod(closed, 0o755)


def test_closed_stdout_reader_exits_quietly(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 << 20))
    with subprocess.Popen(
        [*CP, str(big), "-"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.read(10)
        proc.stdout.close()  # like `| head -c 10`
        err = proc.stderr.read()
        status = proc.wait(20)
    assert first == big.read_bytes()[:10]
    assert status == 141  # what a cat killed by SIGPIPE reports to the shell
    assert err == b""


def test_bad_arguments_exit_2() -> None:
    for args in ([], ["only-one"], ["a", "b", "c"], ["--nonsense", "a", "b"]):
        proc = cp(*args)
        assert proc.returncode == 2, args
        assert b"usage: fastpipe" in proc.stderr
        assert b"Traceback" not in proc.stderr


def test_help() -> None:
    proc = cp("--help")
    assert proc.returncode == 0
    assert b"usage: fastpipe cp" in proc.stdout
    assert b"--keep-partial" in proc.stdout


def signal_mid_copy(
    tmp_path: Path, signum: int, *args: str, hup: str = "SIG_DFL", finish: bool = False
) -> tuple[int, bytes, Path, bytes]:
    """``fastpipe cp ARGS FIFO DST``, sent ``signum`` once its first bytes
    are in DST; returns its exit status, its stderr, DST and the bytes fed.

    The rest of the bytes wait until the copy has exited, so an interrupted
    copy is partial whatever the machine's speed; with ``finish`` they come
    once the signal is sent, for a copy that goes on to the end.  ``hup`` is
    as ``cp_command()`` takes it.
    """
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dst = tmp_path / "copy.bin"
    data = os.urandom(1 << 20)
    hold = threading.Event()
    feeder = feed_fifo(fifo, data, chunk=1 << 14, hold=hold)
    try:
        with subprocess.Popen(
            [*cp_command(hup=hup), *args, str(fifo), str(dst)],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        ) as proc:
            try:
                wait_for(lambda: dst.exists() and dst.stat().st_size > 0)
                proc.send_signal(signum)
            finally:
                if finish:
                    hold.set()
            assert proc.stderr is not None
            err = proc.stderr.read()
            status = proc.wait(20)
    finally:
        hold.set()  # the rest finds no reader, if the copy is gone
        feeder.join(10)
    return status, err, dst, data


def test_sigint_without_a_terminal_exits_130_and_removes_the_partial_file(
    tmp_path: Path,
) -> None:
    status, err, dst, _ = signal_mid_copy(tmp_path, signal.SIGINT)
    assert status == 130
    assert err == b"fastpipe: interrupted\n"
    assert not dst.exists()


@pytest.mark.parametrize("keep", [False, True], ids=["removed", "keep-partial"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_interrupts_like_ctrl_c(
    tmp_path: Path, signum: signal.Signals, keep: bool
) -> None:
    """What `timeout`, `kill` or a closed terminal send: the same clean-up as
    Ctrl-C (the partial file removed unless --keep-partial), and 128 + N."""
    extra = ["--keep-partial"] if keep else []
    status, err, dst, data = signal_mid_copy(tmp_path, signum, *extra)
    assert status == 128 + signum
    assert err == f"fastpipe: stopped by {signum.name}\n".encode()
    if keep:
        kept = dst.read_bytes()
        assert 0 < len(kept) < len(data)
        assert kept == data[: len(kept)]
    else:
        assert not dst.exists()


def test_sighup_ignored_at_start_stays_ignored(tmp_path: Path) -> None:
    """Under ``nohup`` a closed terminal does not stop the copy: it goes on
    to the end, whole.  (An ignored signal is dropped when it is sent: once
    kill() returns, it can no longer reach the copy.)"""
    status, err, dst, data = signal_mid_copy(tmp_path, signal.SIGHUP, hup="SIG_IGN", finish=True)
    assert (status, err) == (0, b"")
    assert dst.read_bytes() == data


# ---------------------------------------------------------------------------
# On a terminal: pexpect gives the child a pseudo-terminal for stdin, stdout
# and stderr, and reads all of them.
# ---------------------------------------------------------------------------


BYTES = r"\d+(\.\d+)? ?[kMG]?B"
RATE = BYTES + "/s"


@pytest.fixture(params=["tqdm", "plain"])
def display(request: pytest.FixtureRequest) -> list[str]:
    """The command for each display: tqdm's (if installed) and the fallback."""
    if request.param == "tqdm":
        pytest.importorskip("tqdm")
    return cp_command(tqdm=request.param == "tqdm")


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    children: list[Any] = []

    def start(argv: list[str]) -> Any:
        child = pexpect.spawn(argv[0], argv[1:], timeout=10, dimensions=(24, 100))
        children.append(child)
        return child

    yield start
    for child in children:
        child.close(force=True)


def test_progress_shows_bytes_and_rate_from_a_slow_pipe(
    tmp_path: Path, display: list[str], spawn: Spawn
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dst = tmp_path / "copy.bin"
    data = os.urandom(20 * (1 << 16))
    feeder = feed_fifo(fifo, data, delay=0.05)  # about one second in all
    child = spawn([*display, str(fifo), str(dst)])
    child.expect(f"{BYTES}.*{RATE}")
    child.expect(pexpect.EOF)
    child.close()
    feeder.join(10)
    assert child.exitstatus == 0, child.before
    assert b"Traceback" not in child.before
    assert dst.read_bytes() == data


def test_progress_for_a_regular_file_ends_at_100_percent(
    tmp_path: Path, src: Path, data: bytes, display: list[str], spawn: Spawn
) -> None:
    dst = tmp_path / "copy.bin"
    child = spawn([*display, str(src), str(dst)])
    child.expect("100%")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert dst.read_bytes() == data


def test_quiet_on_a_terminal_shows_nothing(tmp_path: Path, src: Path, spawn: Spawn) -> None:
    dst = tmp_path / "copy.bin"
    child = spawn([*CP, "-q", str(src), str(dst)])
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert child.before == b""


def test_ctrl_c_on_a_terminal(tmp_path: Path, display: list[str], spawn: Spawn) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dst = tmp_path / "copy.bin"
    data = os.urandom(1 << 20)
    hold = threading.Event()
    feeder = feed_fifo(fifo, data, chunk=1 << 14, hold=hold)
    child = spawn([*display, str(fifo), str(dst)])
    child.expect(RATE)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    hold.set()  # the rest finds no reader
    feeder.join(10)
    assert child.exitstatus == 130
    assert b"fastpipe: interrupted" in child.before
    assert b"Traceback" not in child.before
    assert not dst.exists()


# ---------------------------------------------------------------------------
# The fallback display's text, in-process.
# ---------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Screen:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_plain_progress_shows_percentage_rate_and_eta() -> None:
    clock, screen = _Clock(), _Screen()
    bar = PlainProgress(10_000_000, screen, clock)
    clock.now += 1
    bar.update(2_000_000)
    assert screen.text.endswith("\r2.0 MB / 10.0 MB  20%  2.0 MB/s  ETA 0:04\x1b[K")
    clock.now += 1
    bar.update(10_000_000)
    bar.close()
    assert screen.text.endswith("\r10.0 MB / 10.0 MB  100%  5.0 MB/s\x1b[K\n")


def test_plain_progress_without_a_size_shows_bytes_and_rate() -> None:
    clock, screen = _Clock(), _Screen()
    bar = PlainProgress(None, screen, clock)
    clock.now += 2
    bar.update(1500)
    assert screen.text == "\r1.5 kB  750 B/s\x1b[K"


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 999, 1000, 999_949, 999_950, 12_345_678_901)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "999.9 kB",
        "1.0 MB",
        "12.3 GB",
    ]
