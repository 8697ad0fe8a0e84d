"""``fastpipe bench``: fastpipe.relay side by side with ``shutil.copyfileobj``.

One implementation of every workload, shared by the command line
(``python -m fastpipe bench``) and the pytest-benchmark files in ``bench/``.
Standard library only: this module ships in the wheel and fastpipe has no
run-time dependencies.

A ``Case`` is one workload run by one method.  It is driven round by round:
``setup()`` (not timed: endpoint processes, fds), ``run()`` (timed) and
``finish()`` (not timed: verifies every byte, reaps the processes), which is
the shape of ``benchmark.pedantic(run, setup=..., teardown=...)``.  ``run()``
also measures itself (wall and CPU time), so the figures are the same
whoever drives it.

Endpoints that produce or consume bytes run in other processes, started as
``python -I -S <this file> endpoint ROLE ...``, so that their CPU time is not
counted as the relay's and the relay process does nothing but relay.  They
talk to the parent in lines on stdin/stdout: ``ready ...`` once set up,
``go`` from the parent when the timed part starts, ``done ...`` at the end.

The bytes are a pseudo-random block repeated with a period that is not a
power of two, so a lost, repeated or reordered chunk shows.  Whoever receives
them (the sink process, or this process reading the destination file after
the round) compares every byte with the pattern and reports the length and
the offset of the first wrong byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import platform
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TextIO, TypeAlias

# No ``import fastpipe`` up here: this file also runs as a script, in
# isolated mode, for the endpoint processes, where fastpipe may not be
# importable.  The cases import it when they are built.

MiB = 1 << 20
GiB = 1 << 30

DEFAULT_SIZE_MIB = 64
DEFAULT_REPEAT = 3
#: Small relays: bytes per relay, relays in flight at once, relays per round.
SMALL_PAYLOAD = 16 * 1024
SMALL_IN_FLIGHT = 64
SMALL_RELAYS = 2048
#: copyfileobj in a thread against a spinning main thread waits for the GIL
#: at every 64 KiB read and write (up to the 5 ms switch interval each), so
#: that case moves this fraction of the bytes: compare MiB/s, not time.
SPIN_BASELINE_DIVISOR = 32

#: Less than this for copyfileobj under a spinning main thread comes mostly
#: out of loopback socket buffers (several MiB), without blocking reads, so
#: without the GIL waits that a sustained stream has.
SPIN_SUSTAINED = 16 * MiB

#: The longest wait for a relay, an endpoint or a drain before failing
#: loudly: a hang is a bug to report, not something to wait out.
TIMEOUT = 120.0

# The pattern's period: 1 MiB plus an odd amount, so that no copy chunk (all
# powers of two) lines up with it.
_PERIOD = MiB + 4093
_SEED = 0xFA57

# Method names, also the pytest parametrize ids.
FASTPIPE = "fastpipe"
COPYFILEOBJ = "copyfileobj"
COPYFILEOBJ_POOL = "copyfileobj-pool"
SETUP_ONLY = "setup-only"
FASTPIPE_IDLE = "fastpipe-idle-main"
# The kernel-path baselines (issue: "each path next to copyfileobj ...").
FASTPIPE_RW = "fastpipe-readwrite"
SPLICE_LOOP = "splice-loop"
READWRITE_LOOP = "readwrite-256k"
COPYFILE = "shutil-copyfile"
SOCKET_SENDFILE = "socket-sendfile"
#: fastpipe.relay on the other implementation (issue 6: "``fastpipe bench``
#: shows both" twins), measured in a child process: see ``measure_other_twin``.
FASTPIPE_TWIN = "fastpipe-twin"

METHOD_TITLES = {
    FASTPIPE: "fastpipe.relay",
    COPYFILEOBJ: "copyfileobj",
    COPYFILEOBJ_POOL: "copyfileobj+pool",
    FASTPIPE_RW: "fastpipe zerocopy=False",
    SPLICE_LOOP: "os.splice loop",
    READWRITE_LOOP: "read/write 256 KiB",
    COPYFILE: "shutil.copyfile",
    SOCKET_SENDFILE: "socket.sendfile",
    FASTPIPE_TWIN: "fastpipe (other twin)",
}

#: How each extra baseline copies (shared by the workloads that run it).
BASELINE_HOW = {
    FASTPIPE_RW: "fastpipe.relay(src, dst, zerocopy=False).result(): the read/write path",
    SPLICE_LOOP: (
        "a Python loop: os.splice(src -> pipe) then os.splice(pipe -> dst), through one "
        "1 MiB pipe, in the calling thread"
    ),
    READWRITE_LOOP: "a Python loop of os.readv into one 256 KiB bytearray and os.write",
    COPYFILE: "shutil.copyfile(src_path, dst_path) (os.sendfile on Linux)",
    SOCKET_SENDFILE: "socket.sendfile(open(src_fd, 'rb')) in the calling thread (os.sendfile)",
}

#: One end of a copy: an fd, or a socket (relay() closes either kind).
End: TypeAlias = "int | socket.socket"


class BenchError(RuntimeError):
    """A benchmark could not run, or moved the wrong bytes."""


# ---------------------------------------------------------------------------
# The byte pattern
# ---------------------------------------------------------------------------


@functools.cache
def pattern_block() -> bytes:
    """Return one period of the pattern (about 1 MiB of pseudo-random bytes)."""
    import random  # here: only the processes that need it pay for it

    return random.Random(_SEED).randbytes(_PERIOD)


@functools.cache
def _doubled_block() -> memoryview:
    # Two periods back to back: any piece of up to one period is one slice.
    return memoryview(pattern_block() * 2)


def iter_pattern(nbytes: int, chunk: int = MiB) -> Iterator[memoryview]:
    """Yield the first ``nbytes`` of the endless pattern, ``chunk`` at a time.

    Args:
        nbytes: how many bytes in all.
        chunk: the most bytes per piece (at most one period).

    Yields:
        Read-only views into one doubled block: nothing is copied.
    """
    doubled = _doubled_block()
    chunk = min(chunk, _PERIOD)
    pos = 0
    left = nbytes
    while left > 0:
        n = min(chunk, left)
        yield doubled[pos : pos + n]
        pos = (pos + n) % _PERIOD
        left -= n


class PatternCheck:
    """Compare a byte stream, piece by piece, with the pattern.

    Every byte is compared: ``bytearray == memoryview`` is a ``memcmp`` (over
    10 GB/s), stronger than a checksum and cheaper than one, which matters
    because a sink must stay far faster than the copy it helps to measure.
    """

    def __init__(self) -> None:
        self._doubled = _doubled_block()
        self.total = 0
        #: The offset of the first wrong byte, or -1.
        self.first_bad = -1

    def update(self, data: bytearray, n: int | None = None) -> None:
        """Check the next ``n`` bytes of the stream, ``data[:n]`` (default: all of it)."""
        if n is None:
            n = len(data)
        done = 0
        while done < n and self.first_bad < 0:
            pos = (self.total + done) % _PERIOD
            step = min(n - done, _PERIOD)
            expect = self._doubled[pos : pos + step]
            # startswith() over data[done:done + step], with a prefix of that
            # very length, is one memcmp and copies nothing.  Slicing a short
            # read out of the buffer first was another pass over every byte;
            # memoryview.__eq__ compares item by item, 50 times slower.
            if not data.startswith(expect, done, done + step):
                bad = next(i for i in range(step) if data[done + i] != expect[i])
                self.first_bad = self.total + done + bad
            done += step
        self.total += n

    def problem(self, nbytes: int) -> str | None:
        """None if exactly the first ``nbytes`` of the pattern went by, else what differs."""
        return describe_mismatch(self.total, self.first_bad, nbytes)


def describe_mismatch(total: int, first_bad: int, nbytes: int) -> str | None:
    """None if ``total == nbytes`` and no byte was wrong, else a description."""
    if first_bad >= 0:
        return f"byte {first_bad} differs from the byte sent ({total} bytes received)"
    if total != nbytes:
        return f"{total} bytes arrived, {nbytes} were sent"
    return None


def write_pattern_file(path: str, nbytes: int) -> None:
    """Write the first ``nbytes`` of the pattern to a new file at ``path``."""
    with open(path, "wb") as f:
        for piece in iter_pattern(nbytes):
            f.write(piece)


def check_file(path: str, nbytes: int, what: str) -> None:
    """Check that ``path`` holds exactly the first ``nbytes`` of the pattern.

    Raises:
        BenchError: a byte or the length differs.
    """
    check = PatternCheck()
    buf = bytearray(MiB)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            check.update(buf, n)
    problem = check.problem(nbytes)
    if problem:
        raise BenchError(f"{what}: {problem}")


# ---------------------------------------------------------------------------
# Endpoint processes
# ---------------------------------------------------------------------------


class Endpoint:
    """A producer or consumer of bytes running in another process.

    Args:
        role: ``tcp-send`` (args: PORT NBYTES), ``tcp-sink`` (no args) or
            ``pipe-send`` (args: FD NBYTES).
        args: the role's arguments.
        pass_fds: fds the child inherits (the write end of a pipe).

    Raises:
        BenchError: the interpreter is unknown.
        OSError: the process could not start.
    """

    def __init__(self, role: str, *args: object, pass_fds: Sequence[int] = ()) -> None:
        if not sys.executable:
            raise BenchError("sys.executable is unknown: cannot start endpoint processes")
        self.role = role
        # -I: no PYTHON* variables and no script directory on sys.path (this
        # file lives inside the package); -S: no site, a faster start.
        cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), "endpoint", role]
        self.proc = subprocess.Popen(
            cmd + [str(a) for a in args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=tuple(pass_fds),
        )
        self._reaped = False

    def ready(self) -> list[str]:
        """Wait for the ``ready`` line; return its words after ``ready``.

        Raises:
            BenchError: the process died, or said nothing for TIMEOUT seconds.
        """
        stdout = self.proc.stdout
        assert stdout is not None
        readable, _, _ = select.select([stdout], [], [], TIMEOUT)
        line = stdout.readline() if readable else b""
        words = line.decode("ascii", "replace").split()
        if not words or words[0] != "ready":
            err = self.kill().decode("utf-8", "replace").strip()
            raise BenchError(f"endpoint {self.role}: not ready (said {line!r}): {err}")
        return words[1:]

    def go(self) -> None:
        """Tell the endpoint to start sending."""
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(b"go\n")
        stdin.flush()

    def finish(self) -> list[str]:
        """Wait for the endpoint to exit; return its words after ``done``.

        Raises:
            BenchError: it failed, said nothing, or ran for TIMEOUT seconds more.
        """
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"endpoint {self.role}: still running after {TIMEOUT:g} s") from None
        self._reaped = True
        words = out.decode("ascii", "replace").split()
        if self.proc.returncode != 0 or "done" not in words:
            tail = " / ".join(err.decode("utf-8", "replace").strip().splitlines()[-3:])
            raise BenchError(
                f"endpoint {self.role}: exit status {self.proc.returncode}, said {out!r}: {tail}"
            )
        return words[words.index("done") + 1 :]

    def kill(self) -> bytes:
        """Kill the process if it still runs, and reap it (idempotent).

        Returns:
            What it wrote on stderr, unless that was collected already.
        """
        if self._reaped:
            return b""
        if self.proc.poll() is None:
            self.proc.kill()
        # communicate() closes our ends of its pipes and waits: no zombie.
        _, err = self.proc.communicate()
        self._reaped = True
        return err or b""


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode("ascii"))


def _wait_go() -> None:
    if sys.stdin.buffer.readline() != b"go\n":
        raise SystemExit("endpoint: no 'go' from the parent")


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _endpoint_main(argv: list[str]) -> int:
    """Run one endpoint role in this (child) process; see ``Endpoint``."""
    role, args = argv[0], argv[1:]
    _doubled_block()  # before "ready": making the pattern is not part of the copy
    if role == "tcp-sink":
        check = PatternCheck()
        buf = bytearray(MiB)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            _say(f"ready {listener.getsockname()[1]}")
            conn, _ = listener.accept()
        cpu0 = time.process_time()
        with conn:
            while n := conn.recv_into(buf):
                check.update(buf, n)
        _say(f"done {check.total} {check.first_bad} {time.process_time() - cpu0:.6f}")
    elif role == "tcp-send":
        port, nbytes = int(args[0]), int(args[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            _say("ready")
            _wait_go()
            cpu0 = time.process_time()
            for piece in iter_pattern(nbytes):
                sock.sendall(piece)
        _say(f"done {nbytes} {time.process_time() - cpu0:.6f}")
    elif role == "pipe-send":
        fd, nbytes = int(args[0]), int(args[1])
        _say("ready")
        _wait_go()
        cpu0 = time.process_time()
        for piece in iter_pattern(nbytes):
            _write_all(fd, piece)
        os.close(fd)
        _say(f"done {nbytes} {time.process_time() - cpu0:.6f}")
    else:
        raise SystemExit(f"endpoint: unknown role {role!r}")
    return 0


# ---------------------------------------------------------------------------
# The baseline, and the main thread's busy loop
# ---------------------------------------------------------------------------


def close_end(end: End) -> None:
    """Close an end the way ``relay(close=True)`` does."""
    if isinstance(end, int):
        os.close(end)
    else:
        end.close()


def copyfileobj_fds(src_fd: int, dst_fd: int) -> None:
    """The baseline copy: ``shutil.copyfileobj`` between two fds.

    The reader is raw (``FileIO``: no read-ahead buffer to copy through);
    the writer is buffered only so that a short ``write`` is finished: each
    64 KiB chunk (``shutil.COPY_BUFSIZE``) is larger than its buffer and
    goes straight to the fd.  Neither fd is closed.
    """
    with (
        open(src_fd, "rb", buffering=0, closefd=False) as fsrc,
        open(dst_fd, "wb", closefd=False) as fdst,
    ):
        shutil.copyfileobj(fsrc, fdst)


def splice_loop_fds(src_fd: int, dst_fd: int) -> None:
    """The usual Python relay on the kernel path: two splices per chunk
    through one 1 MiB pipe, blocking, in the calling thread."""
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):  # over the pipe quota: keep the default
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, MiB)
        while n := os.splice(src_fd, w, MiB):
            while n:
                n -= os.splice(r, dst_fd, n)
    finally:
        os.close(r)
        os.close(w)


def readwrite_loop_fds(src_fd: int, dst_fd: int) -> None:
    """A plain Python read/write loop with one 256 KiB buffer."""
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    while n := os.readv(src_fd, [buf]):
        out = view[:n]
        while out:
            out = out[os.write(dst_fd, out) :]


def _fd_of(end: End) -> int:
    return end if isinstance(end, int) else end.fileno()


def baseline_and_close(method: str, src: End, dst: End) -> None:
    """Run a fd-level baseline, then close both ends, as ``relay`` does."""
    copy = {SPLICE_LOOP: splice_loop_fds, READWRITE_LOOP: readwrite_loop_fds}[method]
    try:
        copy(_fd_of(src), _fd_of(dst))
    finally:
        close_end(src)
        close_end(dst)


def copyfileobj_and_close(src: End, dst: End) -> None:
    """``copyfileobj_fds``, then close both ends, as ``relay`` does."""
    try:
        src_fd = src if isinstance(src, int) else src.fileno()
        dst_fd = dst if isinstance(dst, int) else dst.fileno()
        copyfileobj_fds(src_fd, dst_fd)
    finally:
        close_end(src)
        close_end(dst)


def socket_sendfile_and_close(src: End, dst: End) -> None:
    """The standard library's kernel path for file -> socket, then close both ends.

    Raises:
        BenchError: ``dst`` is not a socket object.
    """
    try:
        if not isinstance(dst, socket.socket):
            raise BenchError("socket.sendfile needs a socket object as the destination")
        with open(_fd_of(src), "rb", buffering=0, closefd=False) as f:
            dst.sendfile(f)
    finally:
        close_end(src)
        close_end(dst)


def copyfileobj_in_thread(
    src: End, dst: End, start: threading.Event
) -> tuple[Future[None], threading.Thread]:
    """Run ``copyfileobj_and_close`` in a new thread once ``start`` is set.

    Returns:
        A future that completes with the copy, and the thread.
    """
    future: Future[None] = Future()
    future.set_running_or_notify_cancel()

    def target() -> None:
        try:
            start.wait()
            copyfileobj_and_close(src, dst)
        except BaseException as exc:  # noqa: B036 - delivered through the future
            future.set_exception(exc)
        else:
            future.set_result(None)

    thread = threading.Thread(target=target, name="bench-copyfileobj")
    thread.start()
    return future, thread


def spin_until_done(future: Future[Any]) -> int:
    """Keep this thread busy in pure Python until ``future`` is done.

    Returns:
        How many 200-step loops ran: what the thread got done meanwhile.
    """
    loops = 0
    x = 1
    while not future.done():
        for _ in range(200):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        loops += 1
    return loops


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One verified round.

    Attributes:
        wall: seconds of the timed part.
        cpu: CPU seconds of the relay: this process's CPU time, minus the
            main thread's when it spins (the endpoints are other processes).
        nbytes: bytes moved.
        main_cpu: CPU seconds of the main thread when it spins, else 0.
        spin_loops: loops the spinning main thread ran.
        endpoint_cpu: CPU seconds the endpoint processes spent in the
            round (sending, receiving and checking the pattern), or 0.
    """

    wall: float
    cpu: float
    nbytes: int
    main_cpu: float = 0.0
    spin_loops: int = 0
    endpoint_cpu: float = 0.0


class _Held:
    """The fds and processes a round holds, released on every path."""

    def __init__(self) -> None:
        self.ends: list[End] = []
        self.endpoints: list[Endpoint] = []

    def hand_over(self) -> None:
        """The copy owns the ends now, and closes them however it ends."""
        self.ends.clear()

    def release(self) -> None:
        for end in self.ends:
            with contextlib.suppress(OSError):
                close_end(end)
        self.ends.clear()
        for endpoint in self.endpoints:
            endpoint.kill()
        self.endpoints.clear()


class Case:
    """One workload run by one method; see the module docstring.

    Subclasses set ``workload``, ``title`` and ``methods``, implement
    ``_round`` (the timed part) and, as needed, ``_prepare``,
    ``_setup_round``, ``_verify_round`` and ``_close``.  What a round opens
    goes in ``self._held``, which is released after every round and on
    every error.

    Args:
        method: one of ``methods``.
        nbytes: bytes moved per round.

    Raises:
        ValueError: an unknown method.
    """

    workload: ClassVar[str]
    title: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]
    #: How each method runs, for the figures' description.
    how: ClassVar[dict[str, str]] = {
        FASTPIPE: "fastpipe.relay(src, dst).result(): a pool worker copies, the caller waits",
        COPYFILEOBJ: "shutil.copyfileobj in the calling thread, then both ends closed",
    }
    #: The main thread spins during the copy: its CPU time is not the relay's.
    main_spins: ClassVar[bool] = False
    #: Verified but unrecorded rounds first; an instance may change it.
    warmup_rounds = 0
    #: The round's two ends, opened by ``_setup_round`` (bulk workloads).
    _src: End
    _dst: End

    def __init__(self, method: str, nbytes: int) -> None:
        if method not in self.methods:
            raise ValueError(f"{self.workload}: unknown method {method!r}")
        self.method = method
        self.nbytes = nbytes
        self.samples: list[Sample] = []
        self._held = _Held()
        self._pending: Sample | None = None
        self._spin_loops = 0
        self._prepared = False
        self._unrecorded = 0
        self._endpoint_cpu = 0.0
        self._relay: Callable[..., Any] | None = None
        if method in (FASTPIPE, FASTPIPE_IDLE, FASTPIPE_RW):
            import fastpipe

            self._relay = (
                functools.partial(fastpipe.relay, zerocopy=False)
                if method == FASTPIPE_RW
                else fastpipe.relay
            )

    # -- the pedantic protocol ---------------------------------------------

    def prepare(self) -> None:
        """Once, before the first round (``setup`` calls it if need be)."""
        if not self._prepared:
            self._prepared = True
            self._unrecorded = self.warmup_rounds
            self._prepare()

    def setup(self) -> None:
        """Before each round, not timed."""
        self.prepare()
        self._pending = None
        self._spin_loops = 0
        self._setup_round()

    def run(self) -> None:
        """The timed part of a round; measures its own wall and CPU time."""
        cpu0 = time.process_time()
        main0 = time.thread_time()
        t0 = time.perf_counter()
        self._round()
        t1 = time.perf_counter()
        main1 = time.thread_time()
        cpu1 = time.process_time()
        main_cpu = main1 - main0 if self.main_spins else 0.0
        self._pending = Sample(
            wall=t1 - t0,
            cpu=max(0.0, cpu1 - cpu0 - main_cpu),
            nbytes=self.nbytes,
            main_cpu=main_cpu,
            spin_loops=self._spin_loops,
        )

    def finish(self) -> None:
        """After each round, not timed: verify it, then keep its sample.

        Raises:
            BenchError: the round moved the wrong bytes, or did not run.
        """
        try:
            if self._pending is None:
                raise BenchError(f"{self.workload}/{self.method}: the round did not run")
            self._endpoint_cpu = 0.0
            self._verify_round()
            if self._unrecorded > 0:
                self._unrecorded -= 1  # a warm-up round: verified, not kept
            else:
                self.samples.append(
                    dataclasses.replace(self._pending, endpoint_cpu=self._endpoint_cpu)
                )
        finally:
            self._pending = None
            self._held.release()

    def close(self) -> None:
        """After the last round, or on an error: free everything (idempotent)."""
        self._held.release()
        self._close()

    # -- for subclasses ----------------------------------------------------

    def _prepare(self) -> None:
        pass

    def _setup_round(self) -> None:
        pass

    def _round(self) -> None:
        raise NotImplementedError

    def _verify_round(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _fastpipe_relay(self, src: End, dst: End) -> Any:
        assert self._relay is not None
        relay = self._relay(src, dst)
        self._last_relay = relay
        return relay

    def _copy(self, src: End, dst: End) -> None:
        """Copy src to dst by this case's method; both ends end up closed."""
        self._held.hand_over()
        if self.method == COPYFILEOBJ:
            copyfileobj_and_close(src, dst)
            return
        if self.method in (SPLICE_LOOP, READWRITE_LOOP):
            baseline_and_close(self.method, src, dst)
            return
        if self.method == SOCKET_SENDFILE:
            socket_sendfile_and_close(src, dst)
            return
        copied = self._fastpipe_relay(src, dst).result(timeout=TIMEOUT)
        if copied != self.nbytes:
            raise BenchError(f"{self.workload}: relay() returned {copied}, not {self.nbytes}")

    # -- figures -----------------------------------------------------------

    def extra_info(self) -> dict[str, Any]:
        """Figures for pytest-benchmark's ``extra_info``: medians of the rounds."""
        info: dict[str, Any] = {
            "workload": self.workload,
            "method": self.method,
            "how": self.how[self.method],
            "bytes": self.nbytes,
            "size_MiB": round(self.nbytes / MiB, 3),
            "verified_rounds": len(self.samples),
        }
        last = getattr(self, "_last_relay", None)
        if last is not None and last.method:
            info["method_used"] = last.method
        if self.samples:
            wall = statistics.median(s.wall for s in self.samples)
            cpu = statistics.median(s.cpu for s in self.samples)
            info.update(wall_s=round(wall, 6), relay_cpu_s=round(cpu, 6))
            if any(s.endpoint_cpu for s in self.samples):
                total = statistics.median(s.cpu + s.endpoint_cpu for s in self.samples)
                ends = statistics.median(s.endpoint_cpu for s in self.samples)
                info.update(endpoint_cpu_s=round(ends, 6), total_cpu_s=round(total, 6))
            if self.nbytes:
                info.update(
                    MiB_per_s=round(self.nbytes / MiB / wall, 1),
                    ms_per_MiB=round(wall * 1000 / (self.nbytes / MiB), 4),
                    cpu_s_per_GiB=round(cpu * GiB / self.nbytes, 4),
                )
        return info


def _new_file(path: str) -> int:
    if os.path.exists(path):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


#: Whether the rounds that fill a new file may first let every CPU free
#: pages itself (``warm_page_lists``), where that is needed.  Clear it to
#: see what the rounds cost without it.
WARM_PAGES = True

#: More CPUs than this and warming each one costs more than it evens out.
WARM_MAX_CPUS = 16

#: ``VIRTIO_BALLOON_F_REPORTING``: the balloon reports free pages to the host.
_BALLOON_DEVICE_ID = 5
_BALLOON_F_REPORTING = 5


@functools.cache
def free_page_reporting(root: str = "/sys/bus/virtio/devices") -> bool:
    """Whether a virtio balloon here hands free pages back to the host."""
    try:
        devices = os.listdir(root)
    except OSError:
        return False
    for name in devices:
        try:
            with open(os.path.join(root, name, "device"), encoding="ascii") as f:
                if int(f.read(), 16) != _BALLOON_DEVICE_ID:
                    continue
            with open(os.path.join(root, name, "features"), encoding="ascii") as f:
                bits = f.read().strip()  # one character per feature bit, bit 0 first
        except (OSError, ValueError):
            continue
        if bits[_BALLOON_F_REPORTING : _BALLOON_F_REPORTING + 1] == "1":
            return True
    return False


def _cpus_to_warm() -> list[int]:
    """The CPUs ``warm_page_lists`` frees pages on; empty where it does nothing."""
    if not WARM_PAGES or not hasattr(os, "sched_getaffinity") or not free_page_reporting():
        return []
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if 2 <= len(cpus) <= WARM_MAX_CPUS else []


def _warm_size(nbytes: int) -> int:
    """The bytes ``warm_page_lists`` frees on each CPU for ``nbytes``-byte
    copies: a margin for what else allocates meanwhile."""
    return nbytes + nbytes // 4


def warm_page_lists(directory: str, nbytes: int) -> None:
    """Let each CPU this process may use allocate and free ``nbytes`` of pages itself.

    Why: where the kernel keeps large per-CPU lists of free pages and
    reports free pages to a hypervisor (free page reporting, as on this
    project's Firecracker machines), a page freed on one CPU stays in that
    CPU's list, still backed by the host, while a page taken from the shared
    free lists was handed back to the host and costs a host fault when it is
    first touched.  A copy into a new file then runs 2-3x slower on a CPU
    other than the one that freed the last round's file, so the method whose
    thread happens to land there loses for reasons that have nothing to do
    with it.  Freeing a file's worth of pages on every CPU before each round
    gives every method, on every CPU, the same pages.  It is untimed.  It
    does nothing without free page reporting (the host takes nothing back),
    on one CPU, on more than ``WARM_MAX_CPUS``, and where ``fallocate``
    fails (a full tmpfs, or a file system without it).
    """
    cpus = _cpus_to_warm()
    if nbytes == 0 or not cpus:
        return
    size = _warm_size(nbytes)

    def free_on(cpu: int, path: str) -> None:
        os.sched_setaffinity(0, {cpu})  # this thread only: pid 0 is the calling thread
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # on tmpfs: zeroed pages from this CPU
        except OSError:
            pass  # best effort: the round is still correct, only unwarmed
        finally:
            os.close(fd)
            os.unlink(path)  # the pages go to this CPU's free list

    for cpu in cpus:
        path = os.path.join(directory, f"warm-pages-{os.getpid()}-{cpu}")
        thread = threading.Thread(target=free_on, args=(cpu, path), name="fastpipe-bench-warm")
        thread.start()
        thread.join()


class _SharedSource:
    """The pattern file that the cases of one size read, written once.

    Every method reads the same pages, and a run keeps one file's worth of
    tmpfs for them instead of one per method.  Cases ``hold`` it in their
    ``_prepare`` and ``release`` it in their ``_close``; the last release
    removes it.
    """

    #: How many prepared cases read each source file, by path.
    _users: ClassVar[dict[str, int]] = {}

    def __init__(self, directory: str, nbytes: int) -> None:
        self.path = os.path.join(directory, f"source-{os.getpid()}-{nbytes}.src")
        self.nbytes = nbytes
        self._holding = False

    def hold(self) -> None:
        users = self._users.get(self.path, 0)
        if users == 0:
            write_pattern_file(self.path, self.nbytes)
        self._users[self.path] = users + 1
        self._holding = True

    def open(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def release(self) -> None:
        """Idempotent; a case that never held the file leaves it alone."""
        if not self._holding:
            return
        self._holding = False
        users = self._users.pop(self.path) - 1
        if users:
            self._users[self.path] = users
        elif os.path.exists(self.path):
            os.unlink(self.path)


class _IntoNewFile(Case):
    """A workload whose copy fills a new file each round.

    The destination's life is kept in one place, so that every such
    workload gives its methods the same memory (``warm_page_lists``) and
    keeps one destination on tmpfs at a time.
    """

    # The first copies of a run were up to 3x slower for every method, and
    # the first method (fastpipe) took them every time: one round each first.
    warmup_rounds = 1

    def __init__(self, method: str, nbytes: int, directory: str) -> None:
        super().__init__(method, nbytes)
        self.dst_path = os.path.join(directory, f"{self.workload}-{method}-{id(self):x}.dst")

    def _new_destination(self) -> None:
        # A new file each round: freeing the last round's pages is not timed.
        self._dst = _new_file(self.dst_path)
        self._held.ends.append(self._dst)
        warm_page_lists(os.path.dirname(self.dst_path), self.nbytes)

    def _check_destination(self) -> None:
        check_file(self.dst_path, self.nbytes, f"{self.workload}/{self.method}")
        os.unlink(self.dst_path)  # one destination at a time on tmpfs, not one per method

    def _close(self) -> None:
        if os.path.exists(self.dst_path):
            os.unlink(self.dst_path)


class FileToFile(_IntoNewFile):
    """A file on tmpfs relayed into a new file next to it.

    Args:
        method: ``fastpipe``, or ``copyfileobj`` in the calling thread.
        nbytes: the file size.
        directory: where to put the two files (tmpfs if possible).
    """

    workload = "file-to-file"
    title = "file -> file"
    methods = (FASTPIPE, COPYFILEOBJ, FASTPIPE_RW, COPYFILE, READWRITE_LOOP)
    how: ClassVar[dict[str, str]] = {**Case.how, **BASELINE_HOW}

    def __init__(self, method: str, nbytes: int, directory: str) -> None:
        super().__init__(method, nbytes, directory)
        self._source = _SharedSource(directory, nbytes)
        self.src_path = self._source.path

    def _prepare(self) -> None:
        self._source.hold()

    def _setup_round(self) -> None:
        self._src = self._source.open()
        self._held.ends.append(self._src)
        self._new_destination()

    def _round(self) -> None:
        if self.method == COPYFILE:
            # It opens both paths itself: ours are closed first (untimed
            # closes would favour it, but they cost microseconds).
            self._held.release()
            shutil.copyfile(self.src_path, self.dst_path)
            return
        self._copy(self._src, self._dst)

    def _verify_round(self) -> None:
        self._check_destination()

    def _close(self) -> None:
        super()._close()
        self._source.release()


class _FromPipeProducer(Case):
    """A workload whose source is an ordinary pipe that a producer process fills.

    Mixed in before the base that owns the destination (``self._dst``).
    """

    def _start_producer(self) -> None:
        """The pipe (``self._src``) and its producer, both held by the round."""
        self._src, w = os.pipe()
        self._held.ends.append(self._src)
        try:
            self._producer = Endpoint("pipe-send", w, self.nbytes, pass_fds=(w,))
        finally:
            os.close(w)  # the producer holds the only write end: EOF when it is done
        self._held.endpoints.append(self._producer)

    def _round(self) -> None:
        self._producer.go()
        self._copy(self._src, self._dst)

    def _producer_cpu(self) -> float:
        """Wait for the producer; return its CPU seconds."""
        (_, cpu) = self._producer.finish()
        return float(cpu)


class PipeToFile(_FromPipeProducer, _IntoNewFile):
    """A producer process writes into an ``os.pipe``; the pipe is relayed to a file.

    Args:
        method: ``fastpipe``, or ``copyfileobj`` in the calling thread.
        nbytes: bytes the producer writes.
        directory: where to put the file (tmpfs if possible).
    """

    workload = "pipe-to-file"
    title = "pipe -> file"
    methods = (FASTPIPE, COPYFILEOBJ, FASTPIPE_RW, SPLICE_LOOP, READWRITE_LOOP)
    how: ClassVar[dict[str, str]] = {**Case.how, **BASELINE_HOW}

    def _setup_round(self) -> None:
        self._start_producer()
        self._new_destination()
        self._producer.ready()

    def _verify_round(self) -> None:
        self._endpoint_cpu = self._producer_cpu()
        self._check_destination()


class _IntoTcpSink(Case):
    """A workload whose copy goes into a TCP connection to a sink process.

    The sink compares every byte with the pattern and reports the length;
    its CPU time counts as the round's endpoint CPU.
    """

    # The first copy of a run was the slowest for every method (as with
    # _IntoNewFile), and the first method took it: one round each first.
    warmup_rounds = 1

    def _start_sink(self) -> None:
        self._sink = Endpoint("tcp-sink")
        self._held.endpoints.append(self._sink)

    def _connect_sink(self) -> None:
        (port,) = self._sink.ready()
        self._dst = socket.create_connection(("127.0.0.1", int(port)))
        self._held.ends.append(self._dst)
        # Blocking, as copyfileobj needs (FileIO.write returns None on EAGAIN).
        self._dst.setblocking(True)

    def _sink_verdict(self) -> float:
        """Wait for the sink; return its CPU seconds.

        Raises:
            BenchError: a byte or the length differs.
        """
        total_word, first_bad_word, sink_cpu = self._sink.finish()
        problem = describe_mismatch(int(total_word), int(first_bad_word), self.nbytes)
        if problem:
            raise BenchError(f"{self.workload}/{self.method}: the sink says {problem}")
        return float(sink_cpu)


class TcpToTcp(_IntoTcpSink):
    """A sender process -> this process -> a sink process, over TCP loopback.

    This process accepts the sender's connection and connects to the sink,
    both in setup; the timed part tells the sender to go and relays until
    end of file.  The sink compares every byte and reports the length.

    Args:
        method: ``fastpipe``, or ``copyfileobj`` in the calling thread.
        nbytes: bytes the sender sends.
    """

    workload = "tcp-to-tcp"
    title = "TCP -> TCP"
    methods: ClassVar[tuple[str, ...]] = (
        FASTPIPE,
        COPYFILEOBJ,
        FASTPIPE_RW,
        SPLICE_LOOP,
        READWRITE_LOOP,
    )
    how: ClassVar[dict[str, str]] = {**Case.how, **BASELINE_HOW}

    def __init__(self, method: str, nbytes: int) -> None:
        super().__init__(method, nbytes)
        self._listener: socket.socket | None = None

    def _prepare(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT)

    def _setup_round(self) -> None:
        assert self._listener is not None
        self._start_sink()
        self._sender = Endpoint("tcp-send", self._listener.getsockname()[1], self.nbytes)
        self._held.endpoints.append(self._sender)
        self._connect_sink()
        self._sender.ready()
        self._src, _ = self._listener.accept()
        self._held.ends.append(self._src)
        self._src.setblocking(True)  # accept() gave it the listener's timeout

    def _round(self) -> None:
        self._sender.go()
        self._copy(self._src, self._dst)

    def _verify_round(self) -> None:
        (_, send_cpu) = self._sender.finish()
        self._endpoint_cpu = float(send_cpu) + self._sink_verdict()

    def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class FileToTcp(_IntoTcpSink):
    """A file on tmpfs sent to a sink process over TCP loopback: a file server.

    fastpipe's path here is ``sendfile``; ``socket.sendfile`` is the
    standard library's own.

    Args:
        method: one of ``methods``.
        nbytes: the file size.
        directory: where to put the file (tmpfs if possible).
    """

    workload = "file-to-tcp"
    title = "file -> TCP"
    methods = (FASTPIPE, COPYFILEOBJ, FASTPIPE_RW, SOCKET_SENDFILE, READWRITE_LOOP)
    how: ClassVar[dict[str, str]] = {**Case.how, **BASELINE_HOW}

    def __init__(self, method: str, nbytes: int, directory: str) -> None:
        super().__init__(method, nbytes)
        self._source = _SharedSource(directory, nbytes)

    def _prepare(self) -> None:
        self._source.hold()

    def _setup_round(self) -> None:
        self._start_sink()
        self._src = self._source.open()
        self._held.ends.append(self._src)
        self._connect_sink()

    def _round(self) -> None:
        self._copy(self._src, self._dst)

    def _verify_round(self) -> None:
        self._endpoint_cpu = self._sink_verdict()

    def _close(self) -> None:
        self._source.release()


class PipeToTcp(_FromPipeProducer, _IntoTcpSink):
    """A producer process's pipe relayed to a sink process over TCP loopback.

    A command's output streamed to the network: fastpipe splices straight
    from the producer's pipe into the socket.

    Args:
        method: one of ``methods``.
        nbytes: bytes the producer writes.
    """

    workload = "pipe-to-tcp"
    title = "pipe -> TCP"
    methods = (FASTPIPE, COPYFILEOBJ, FASTPIPE_RW, SPLICE_LOOP, READWRITE_LOOP)
    how: ClassVar[dict[str, str]] = {**Case.how, **BASELINE_HOW}

    def _setup_round(self) -> None:
        self._start_sink()
        self._start_producer()
        self._connect_sink()
        self._producer.ready()

    def _verify_round(self) -> None:
        self._endpoint_cpu = self._producer_cpu() + self._sink_verdict()


class TcpMainSpins(TcpToTcp):
    """``TcpToTcp`` while the main thread runs a pure-Python loop.

    ``fastpipe`` relays in its worker and ``copyfileobj`` copies in a
    ``threading.Thread``; meanwhile the main thread spins until the copy's
    future is done.  ``fastpipe-idle-main`` is the same relay with the main
    thread waiting in ``result()``, for the spinning/idle ratio.
    ``copyfileobj`` moves ``size // SPIN_BASELINE_DIVISOR`` bytes, as it
    waits for the GIL at every chunk: compare MiB/s or ms/MiB.

    Args:
        method: ``fastpipe``, ``copyfileobj`` or ``fastpipe-idle-main``.
        size: the fastpipe cases' byte count.
    """

    workload = "tcp-main-spins"
    title = "TCP, main spins"
    methods = (FASTPIPE, COPYFILEOBJ, FASTPIPE_IDLE)
    main_spins = True
    how: ClassVar[dict[str, str]] = {
        FASTPIPE: "fastpipe.relay(src, dst) in a pool worker; the main thread spins until done",
        COPYFILEOBJ: (
            f"shutil.copyfileobj in a threading.Thread, 1/{SPIN_BASELINE_DIVISOR} of the "
            "bytes; the main thread spins until done"
        ),
        FASTPIPE_IDLE: "fastpipe.relay(src, dst).result(): the main thread just waits",
    }

    def __init__(self, method: str, size: int) -> None:
        nbytes = size
        if method == COPYFILEOBJ:
            nbytes = max(MiB, size // SPIN_BASELINE_DIVISOR)
        super().__init__(method, nbytes)

    def _round(self) -> None:
        self._sender.go()
        if self.method == FASTPIPE_IDLE:
            self._copy(self._src, self._dst)
            return
        self._held.hand_over()
        if self.method == FASTPIPE:
            relay = self._fastpipe_relay(self._src, self._dst)
            self._spin_loops = spin_until_done(relay)
            copied = relay.result()
            if copied != self.nbytes:
                raise BenchError(f"{self.workload}: relay() returned {copied}, not {self.nbytes}")
        else:
            # The thread starts copying once this thread spins: a new thread
            # holds the GIL as Thread.start() returns, and a short copy could
            # finish before the spinning even began.
            start = threading.Event()
            future, thread = copyfileobj_in_thread(self._src, self._dst, start)
            start.set()
            self._spin_loops = spin_until_done(future)
            thread.join()
            future.result()

    def extra_info(self) -> dict[str, Any]:
        info = super().extra_info()
        if self.method == COPYFILEOBJ:
            info["note"] = (
                f"moves 1/{SPIN_BASELINE_DIVISOR} of the bytes: compare MiB_per_s or "
                "ms_per_MiB, not the time"
            )
        if self.samples and self.method != FASTPIPE_IDLE:
            loops = sum(s.spin_loops for s in self.samples)
            wall = sum(s.wall for s in self.samples)
            info["main_loops_per_s"] = round(loops / wall)
            info["main_cpu_s"] = round(statistics.median(s.main_cpu for s in self.samples), 6)
        return info


def _drain(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class SmallRelays(Case):
    """Many small relays, ``in_flight`` at a time, over AF_UNIX socketpairs.

    Per relay: a source pair (a, b) gets the payload written into ``a`` and
    ``a``'s write side shut down; the relay copies b -> c, where (c, d) is
    the destination pair; then ``d`` is drained and compared with the
    payload.  A round is ``relays // in_flight`` batches, and the
    socketpairs are made inside the timed part, so ``setup-only`` does all
    of it but the relay (it closes b and c itself and drains an empty d):
    subtract it for figures net of setup.  Every method closes b and c
    (fastpipe through ``close=True``); the round closes a and d.

    Args:
        method: ``fastpipe``, ``copyfileobj`` (a new ``threading.Thread`` per
            relay), ``copyfileobj-pool`` (``ThreadPoolExecutor(in_flight)``)
            or ``setup-only``.
        relays: relays per round, a multiple of ``in_flight``.
        payload: bytes per relay.
        in_flight: relays started before the first is drained.

    Raises:
        ValueError: ``relays`` is not a positive multiple of ``in_flight``.
    """

    workload = "small-relays"
    title = "small relays"
    methods = (FASTPIPE, COPYFILEOBJ, COPYFILEOBJ_POOL, SETUP_ONLY)
    how: ClassVar[dict[str, str]] = {
        FASTPIPE: "fastpipe.relay(b, c) per relay (close=True), results checked",
        COPYFILEOBJ: "a new threading.Thread per relay: shutil.copyfileobj, then b and c closed",
        COPYFILEOBJ_POOL: (
            f"ThreadPoolExecutor({SMALL_IN_FLIGHT}).submit per relay: shutil.copyfileobj, "
            "then b and c closed"
        ),
        SETUP_ONLY: "no relay: b and c closed at once, d drained (empty)",
    }

    def __init__(
        self,
        method: str,
        relays: int = SMALL_RELAYS,
        payload: int = SMALL_PAYLOAD,
        in_flight: int = SMALL_IN_FLIGHT,
    ) -> None:
        if relays <= 0 or relays % in_flight:
            raise ValueError(f"relays must be a positive multiple of {in_flight}, got {relays}")
        super().__init__(method, 0 if method == SETUP_ONLY else relays * payload)
        self.relays = relays
        self.payload = payload
        self.in_flight = in_flight
        block = pattern_block()
        # A different payload per slot, so that crossed wires show.
        self._payloads = [block[i * 4099 : i * 4099 + payload] for i in range(in_flight)]
        self._executor: ThreadPoolExecutor | None = None
        self._errors: list[BaseException] = []
        # One verified, unrecorded round grows fastpipe's pool and the
        # executor to in_flight workers, which both keep for the next rounds.
        self.warmup_rounds = 1 if method in (FASTPIPE, COPYFILEOBJ_POOL) else 0

    def _prepare(self) -> None:
        if self.method == COPYFILEOBJ_POOL:
            self._executor = ThreadPoolExecutor(self.in_flight, thread_name_prefix="bench-pool")

    def _round(self) -> None:
        for _ in range(self.relays // self.in_flight):
            self._batch()

    def _batch(self) -> None:
        srcs: list[tuple[socket.socket, socket.socket]] = []
        dsts: list[tuple[socket.socket, socket.socket]] = []
        handles: list[Any] = []
        ok = False
        try:
            for pairs in (srcs, dsts):
                for _ in range(self.in_flight):
                    pairs.append(socket.socketpair())
            for (a, _), data in zip(srcs, self._payloads, strict=True):
                a.sendall(data)
                a.shutdown(socket.SHUT_WR)
            for _, d in dsts:
                d.settimeout(TIMEOUT)  # a hung relay fails the round, not the whole run
            for (_, b), (c, _) in zip(srcs, dsts, strict=True):
                handles.append(self._start(b, c))
            expected = [b""] * self.in_flight if self.method == SETUP_ONLY else self._payloads
            for i, ((_, d), want) in enumerate(zip(dsts, expected, strict=True)):
                got = _drain(d)
                if got != want:
                    raise BenchError(
                        f"{self.workload}/{self.method}: relay {i} of a batch delivered "
                        f"{len(got)} bytes, not the {len(want)} bytes written"
                    )
            for handle in handles:
                self._wait(handle)
            if self._errors:
                raise BenchError(f"{self.workload}/{self.method}: {self._errors[0]!r}")
            ok = True
        finally:
            # Our own ends first: on an error path, a copy still running
            # then ends (EOF, EPIPE) before its fds are closed under it.
            for a, _ in srcs:
                a.close()
            for _, d in dsts:
                d.close()
            if not ok:
                for handle in handles:
                    with contextlib.suppress(Exception):
                        self._wait(handle)
            for _, b in srcs:
                b.close()  # a no-op when the copy closed it
            for c, _ in dsts:
                c.close()
            self._errors.clear()

    def _copy_close(self, b: socket.socket, c: socket.socket) -> None:
        try:
            copyfileobj_and_close(b, c)
        except BaseException as exc:  # noqa: B036 - reported by the round
            self._errors.append(exc)

    def _start(self, b: socket.socket, c: socket.socket) -> Any:
        if self.method == FASTPIPE:
            return self._fastpipe_relay(b, c)
        if self.method == COPYFILEOBJ:
            thread = threading.Thread(target=self._copy_close, args=(b, c))
            thread.start()
            return thread
        if self.method == COPYFILEOBJ_POOL:
            assert self._executor is not None
            return self._executor.submit(self._copy_close, b, c)
        b.close()
        c.close()
        return None

    def _wait(self, handle: Any) -> None:
        if isinstance(handle, threading.Thread):
            handle.join(TIMEOUT)
            if handle.is_alive():
                raise BenchError(f"{self.workload}: a copyfileobj thread hung")
        elif handle is not None:
            copied = handle.result(timeout=TIMEOUT)
            if self.method == FASTPIPE and copied != self.payload:
                raise BenchError(f"{self.workload}: relay() returned {copied}, not {self.payload}")

    def _close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def extra_info(self) -> dict[str, Any]:
        info = super().extra_info()
        info.update(relays=self.relays, payload=self.payload, in_flight=self.in_flight)
        if self.samples:
            wall = statistics.median(s.wall for s in self.samples)
            info["us_per_relay"] = round(wall * 1e6 / self.relays, 2)
        return info


# ---------------------------------------------------------------------------
# The command line: run every workload, print the tables
# ---------------------------------------------------------------------------


def scratch_room(size: int) -> int:
    """Bytes of scratch space the bulk workloads need at once for ``size``-byte copies.

    The shared source, one destination (each is removed once verified) and
    ``warm_page_lists``'s file.
    """
    return 2 * size + _warm_size(size)


def scratch_root(need: int = 0) -> str:
    """A tmpfs directory (``/dev/shm``) with room for ``need`` bytes, else the temp dir.

    A container's ``/dev/shm`` is often 64 MiB: too small for the default
    run, which would then stop half-way with ENOSPC.
    """
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= need:
            return shm
    return tempfile.gettempdir()


def new_scratch_dir(size: int) -> str:
    """A new directory for ``size``-byte bulk copies, where ``scratch_root`` finds room.

    The caller removes it (``shutil.rmtree``).
    """
    return tempfile.mkdtemp(prefix="fastpipe-bench-", dir=scratch_root(scratch_room(size)))


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


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def _fmt_size(nbytes: int) -> str:
    if nbytes >= MiB and nbytes % MiB == 0:
        return f"{nbytes // MiB} MiB"
    return f"{nbytes / MiB:.1f} MiB"


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if x > 0 and y > 0 else "-"


_COLUMNS = (FASTPIPE, COPYFILEOBJ, COPYFILEOBJ_POOL)
_WIDTHS = (26, 17, 17, 18)  # the label, then one per method; the last column is free


@dataclass
class _Row:
    """One table row: a workload's results, or the same net of setup."""

    label: str
    cases: dict[str, Result]
    #: Subtracted from every case (the setup-only figures, for the net row).
    minus_wall: float = 0.0
    minus_cpu: float = 0.0

    def wall(self, method: str) -> float:
        return self.cases[method].median - self.minus_wall

    def mib_s(self, method: str) -> float:
        wall = self.wall(method)
        return self.cases[method].nbytes / MiB / wall if wall > 0 else 0.0

    def cpu(self, method: str) -> float:
        return max(0.0, self.cases[method].cpu - self.minus_cpu)

    def cpu_per_byte(self, method: str) -> float:
        return self.cpu(method) / self.cases[method].nbytes

    def ratios(self, value: Callable[[str], float], *, baseline_over_fastpipe: bool) -> str:
        parts = []
        for method in _COLUMNS[1:]:
            if method in self.cases:
                fp, base = value(FASTPIPE), value(method)
                parts.append(_ratio(base, fp) if baseline_over_fastpipe else _ratio(fp, base))
        return " | ".join(parts)


def _line(cells: Sequence[str]) -> str:
    padded = [c.ljust(w) for c, w in zip(cells, _WIDTHS, strict=False)]
    return "".join(padded + list(cells[len(_WIDTHS) :])).rstrip()


def _rows(grouped: dict[str, dict[str, Result]]) -> list[_Row]:
    rows = []
    for workload, cases in grouped.items():
        fp = cases[FASTPIPE]
        if workload == SmallRelays.workload:
            label = f"small relays {fp.extra['relays']}x{fp.extra['payload'] // 1024} KiB"
        else:
            label = f"{fp.title:<16} {_fmt_size(fp.nbytes)}"
        rows.append(_Row(label, cases))
        if SETUP_ONLY in cases:
            setup = cases[SETUP_ONLY]
            rows.append(_Row("  net of setup", cases, setup.median, setup.cpu))
    return rows


def _wall_table(rows: list[_Row]) -> list[str]:
    head = [METHOD_TITLES[m] for m in _COLUMNS]
    lines = [_line(["wall ms: median [best]", *head, "reference"])]
    for row in rows:
        cells = [row.label]
        for method in _COLUMNS:
            r = row.cases.get(method)
            if r is None:
                cells.append("-")
            elif row.minus_wall:
                cells.append(_fmt_ms(row.wall(method)))
            else:
                # The spinning copyfileobj moves fewer bytes: flag its time.
                mark = "*" if r.workload == TcpMainSpins.workload and method != FASTPIPE else ""
                cells.append(f"{_fmt_ms(r.median)} [{_fmt_ms(r.best)}]{mark}")
        ref = ""
        for method, what in ((SETUP_ONLY, "setup only"), (FASTPIPE_IDLE, "fastpipe, main idle")):
            r = row.cases.get(method)
            if r is not None and not row.minus_wall:
                ref = f"{_fmt_ms(r.median)} [{_fmt_ms(r.best)}] {what}"
        lines.append(_line([*cells, ref]))
    return lines


def _throughput_table(rows: list[_Row]) -> list[str]:
    head = [METHOD_TITLES[m] for m in _COLUMNS]
    pool = any(COPYFILEOBJ_POOL in row.cases for row in rows)
    title = "speed-up" + (" (vs copyfileobj | +pool)" if pool else "")
    lines = [_line(["MiB/s (median)", *head, title])]
    for row in rows:
        cells = [row.label]
        cells += [f"{row.mib_s(m):.0f}" if m in row.cases else "-" for m in _COLUMNS]
        lines.append(_line([*cells, row.ratios(row.mib_s, baseline_over_fastpipe=False)]))
    return lines


def _cpu_table(rows: list[_Row]) -> list[str]:
    head = [METHOD_TITLES[m] for m in _COLUMNS]
    lines = [_line(["relay CPU s [s/GiB]", *head, "CPU/byte: baseline/fastpipe"])]
    for row in rows:
        cells = [row.label]
        for method in _COLUMNS:
            if method in row.cases:
                per_gib = row.cpu_per_byte(method) * GiB
                cells.append(f"{row.cpu(method):.3f} [{per_gib:.2f}]")
            else:
                cells.append("-")
        lines.append(_line([*cells, row.ratios(row.cpu_per_byte, baseline_over_fastpipe=True)]))
    return lines


_EXTRA_METHODS = (FASTPIPE_RW, SPLICE_LOOP, READWRITE_LOOP, COPYFILE, SOCKET_SENDFILE)


def _baselines_table(grouped: dict[str, dict[str, Result]]) -> list[str]:
    """Each bulk workload's fastpipe row next to the kernel-path baselines.

    Total CPU adds the endpoint processes' CPU to the relay's: a kernel path
    can move work onto them (splice leaves the copying to the receiver).
    """
    widths = (26, 28, 16, 8, 10, 10, 0)  # 28: "fastpipe (copy_file_range)"
    lines = [
        "".join(
            c.ljust(w)
            for c, w in zip(
                (
                    "more baselines",
                    "method",
                    "ms: med [best]",
                    "MiB/s",
                    "CPU s/GiB",
                    "+ends",
                    "fastpipe: speed-up, CPU/byte",
                ),
                widths,
                strict=True,
            )
        ).rstrip()
    ]
    for cases in grouped.values():
        extra = [m for m in _EXTRA_METHODS if m in cases]
        if not extra or FASTPIPE not in cases:
            continue
        fp = cases[FASTPIPE]
        label = f"{fp.title:<16} {_fmt_size(fp.nbytes)}"
        for i, method in enumerate((FASTPIPE, COPYFILEOBJ, *extra)):
            r = cases.get(method)
            if r is None:
                continue
            total = r.extra.get("total_cpu_s")
            per_gib = GiB / r.nbytes if r.nbytes else 0.0
            vs = ""
            if method != FASTPIPE:
                vs = f"{_ratio(fp.mib_s, r.mib_s)}, {_ratio(r.cpu, fp.cpu)}"
                if total and fp.extra.get("total_cpu_s"):
                    vs += f" (total {_ratio(total, fp.extra['total_cpu_s'])})"
            name = METHOD_TITLES[method]
            if method == FASTPIPE and fp.extra.get("method_used"):
                name = f"fastpipe ({fp.extra['method_used']})"
            cells = (
                label if i == 0 else "",
                name,
                f"{_fmt_ms(r.median)} [{_fmt_ms(r.best)}]",
                f"{r.mib_s:.0f}",
                f"{r.cpu_per_gib:.2f}",
                f"{total * per_gib:.2f}" if total else "-",
                vs,
            )
            lines.append("".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    if len(lines) == 1:
        return []
    lines.append(
        "  speed-up = baseline's time / fastpipe's; CPU/byte = baseline's relay CPU / fastpipe's "
        "(above 1 is fastpipe cheaper); +ends = relay and endpoint processes together, s/GiB."
    )
    return lines


def _twins_table(grouped: dict[str, dict[str, Result]]) -> list[str]:
    """fastpipe.relay on this process's implementation and on the other twin."""
    pairs = [
        (cases[FASTPIPE], cases[FASTPIPE_TWIN])
        for cases in grouped.values()
        if FASTPIPE in cases and FASTPIPE_TWIN in cases
    ]
    if not pairs:
        return []
    twin = pairs[0][1].extra["implementation"]
    this = _TWIN_NAMES["c" if twin == "py" else "py"]
    other = _TWIN_NAMES[twin]
    widths = (26, 24, 10, 24, 10, 0)
    head = ("both twins", f"{this}: ms", "MiB/s", f"{other}: ms", "MiB/s", "time ratio")
    lines = ["".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    for fp, tw in pairs:
        if fp.workload == SmallRelays.workload:
            label = f"small relays {fp.extra['relays']}x{fp.extra['payload'] // 1024} KiB"
        else:
            label = f"{fp.title:<16} {_fmt_size(fp.nbytes)}"
        cells = (
            label,
            f"{_fmt_ms(fp.median)} [{_fmt_ms(fp.best)}]",
            f"{fp.mib_s:.0f}",
            f"{_fmt_ms(tw.median)} [{_fmt_ms(tw.best)}]",
            f"{tw.mib_s:.0f}",
            _ratio(tw.median, fp.median),
        )
        lines.append("".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    note = (
        f"time ratio = {other}'s / {this}'s. Both run fastpipe.relay through the same "
        f"WorkerPool, the {other} in a child process (FASTPIPE_NO_EXTENSIONS="
        f"{'1' if twin == 'py' else '0'}) that runs the same cases and verifies every byte."
    )
    lines += textwrap.wrap(note, width=98, initial_indent="  ", subsequent_indent="    ")
    return lines


def _footnotes(grouped: dict[str, dict[str, Result]]) -> list[str]:
    # Paragraphs; one starting with "  " continues the one before it.
    paragraphs = [
        "copyfileobj = shutil.copyfileobj (64 KiB chunks) from open(fd, 'rb', buffering=0) to "
        "open(fd, 'wb'), in the calling thread for the bulk rows; fastpipe = relay(...).result() "
        "(a pool worker copies). Both close the same ends. The endpoints run in other processes: "
        "CPU is this process's, i.e. the relay's (plus the main thread's when it only waits).",
    ]
    small = grouped.get(SmallRelays.workload)
    if small:
        n = small[FASTPIPE].extra["in_flight"]
        paragraphs += [
            f"small relays: AF_UNIX socketpairs, {n} in flight; copyfileobj = a new "
            f"threading.Thread per relay, +pool = ThreadPoolExecutor({n}); setup only = the same "
            "socketpairs, writes, closes and drain without a relay.",
        ]
    spin = grouped.get(TcpMainSpins.workload)
    if spin:
        paragraphs.append(
            "TCP, main spins: the main thread runs a Python loop until the copy is done; "
            "relay CPU excludes it."
        )
        if COPYFILEOBJ in spin:
            loops = ", ".join(
                f"{METHOD_TITLES[m]} {spin[m].extra.get('main_loops_per_s', 0):,}"
                for m in (FASTPIPE, COPYFILEOBJ)
            )
            paragraphs += [
                f"  * copyfileobj runs in a thread and moves {_fmt_size(spin[COPYFILEOBJ].nbytes)}"
                f" (1/{SPIN_BASELINE_DIVISOR}): compare MiB/s and s/GiB, not ms.",
                f"  Main-thread loops/s meanwhile: {loops}.",
            ]
            if spin[COPYFILEOBJ].nbytes < SPIN_SUSTAINED:
                # Measured: 2 MiB in 7-29 ms, every read and write taking
                # 0.01-0.25 ms; 16 MiB in 3-4 s, 5 ms (the GIL's switch
                # interval) for each.
                paragraphs.append(
                    f"  At this size the sender has put most of copyfileobj's bytes in the socket"
                    f" buffers before it starts: its reads do not block, so it seldom waits for"
                    f" the GIL. Its sustained rate is the one with --size"
                    f" {SPIN_SUSTAINED * SPIN_BASELINE_DIVISOR // MiB} or more."
                )
        if FASTPIPE_IDLE in spin:
            ratio = _ratio(spin[FASTPIPE].median, spin[FASTPIPE_IDLE].median)
            paragraphs.append(
                f"  fastpipe spinning/idle wall time: {ratio} (the spinning thread also takes "
                f"one of the {os.cpu_count()} CPUs from the relay and the endpoints)."
            )
    lines = []
    for text in paragraphs:
        indent = "  " if text.startswith("  ") else ""
        lines += textwrap.wrap(
            text.strip(), width=98, initial_indent=indent, subsequent_indent=indent + "  "
        )
    return lines


def format_report(results: Sequence[Result], header: str) -> str:
    """The side-by-side tables: workloads down, methods across.

    Args:
        results: what ``run_workload`` returned, for any of the workloads.
        header: the lines to print first.

    Returns:
        Three tables (wall time, throughput, relay CPU) and their footnotes.
    """
    grouped: dict[str, dict[str, Result]] = {}
    for r in results:
        grouped.setdefault(r.workload, {})[r.method] = r
    rows = _rows(grouped)
    lines = [header, ""]
    for table in (_wall_table, _throughput_table, _cpu_table):
        lines += [*table(rows), ""]
    for extra_table in (_baselines_table, _twins_table):
        extra_lines = extra_table(grouped)
        if extra_lines:
            lines += [*extra_lines, ""]
    lines += _footnotes(grouped)
    return "\n".join(lines)


def _header(size: int, relays: int, repeat: int, directory: str) -> str:
    import fastpipe

    return (
        f"fastpipe {fastpipe.__version__} ({fastpipe.IMPLEMENTATION} core) vs shutil.copyfileobj"
        f" | {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs\n"
        f"bulk: {_fmt_size(size)} per copy; small: {relays} relays x {SMALL_PAYLOAD // 1024} "
        f"KiB, {SMALL_IN_FLIGHT} in flight; {repeat} runs each, every byte verified"
        + f"\nfiles in {os.path.dirname(directory)}"
        + (
            "; the host takes free pages back: every CPU frees a file's worth of pages"
            " before a file round"
            if _cpus_to_warm()
            else ""
        )
    )


def _progress_line(err: TextIO) -> Callable[[str], None]:
    def progress(text: str) -> None:
        err.write(f"\r\x1b[K{text}")
        err.flush()

    return progress


_IDLE_RSS_SCRIPT = r"""
import os, sys, time
import fastpipe

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

n = int(sys.argv[1])
pipes = [os.pipe() for _ in range(n)]
null = os.open(os.devnull, os.O_WRONLY)
pool = fastpipe.WorkerPool()
# Warm up: the completer, one worker and a few buffers exist before we look.
r, w = os.pipe()
os.write(w, b"x" * 60000)
os.close(w)
pool.relay(r, null, close=False).result()
os.close(r)
time.sleep(0.1)
before = rss_kib()
relays = [pool.relay(rr, null, close=False) for rr, _ in pipes]
deadline = time.monotonic() + 60
while pool.stats()["busy"] < n:
    if time.monotonic() > deadline:
        sys.exit("the relays never all started")
    time.sleep(0.01)
time.sleep(0.3)
after = rss_kib()
workers = pool.stats()["workers"]
in_use = fastpipe.buffer_stats()["in_use"]
for _, w in pipes:
    os.write(w, b"bye")
    os.close(w)
assert all(x.result(timeout=60) == 3 for x in relays)
print(after - before, workers, in_use)
"""


def measure_idle_rss(relays: int = 1000) -> tuple[float, int, int]:
    """RSS per relay parked on an idle pipe, measured in a fresh process.

    Returns:
        (KiB of RSS per relay, workers started, buffers in use while parked).

    Raises:
        BenchError: the child failed.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _IDLE_RSS_SCRIPT, str(relays)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"idle-memory child failed: {proc.stderr.strip()[-500:]}")
    delta, workers, in_use = (int(x) for x in proc.stdout.split())
    return delta / relays, workers, in_use


IDLE_RELAYS = 1000

_TWIN_NAMES = {"c": "compiled core", "py": "python twin"}
_TWIN_CHILD = "import sys; from fastpipe import _bench; sys.exit(_bench._twin_child(sys.argv[1:]))"


def other_twin() -> str | None:
    """The implementation this process does not run: ``"py"``, ``"c"``, or None.

    None when this process runs the pure-Python twin because the compiled
    core is not built: there is no other twin to measure.
    """
    import importlib.util

    import fastpipe

    if fastpipe.IMPLEMENTATION == "c":
        return "py"
    return "c" if importlib.util.find_spec("fastpipe._core") is not None else None


def measure_other_twin(size: int, relays: int, repeat: int, implementation: str) -> list[Result]:
    """The ``fastpipe`` method of every workload, run by the other implementation.

    A child process, because the implementation is chosen once per process
    (``fastpipe._impl``, from ``FASTPIPE_NO_EXTENSIONS``): the twin's relays
    then go through the same ``WorkerPool`` and ``Relay`` code as a user's
    would.  The child runs the same cases, verifies every byte the same way
    and sends its results back as JSON; they come back as method
    ``fastpipe-twin``, with ``extra["implementation"]`` saying which twin.

    Raises:
        BenchError: the child failed, or ran the wrong implementation.
    """
    import fastpipe

    env = dict(os.environ, FASTPIPE_NO_EXTENSIONS="1" if implementation == "py" else "0")
    # The child imports this very package, wherever it was found.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastpipe.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with subprocess.Popen(
        [sys.executable, "-c", _TWIN_CHILD, implementation, str(size), str(relays), str(repeat)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT * 10)
        except BaseException:
            # SIGTERM, Ctrl-C or the timeout here: SIGTERM lets the child
            # remove its scratch files (on tmpfs: memory) and end its
            # endpoints, which subprocess.run's SIGKILL would leave behind.
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
    if proc.returncode != 0:
        raise BenchError(f"the {_TWIN_NAMES[implementation]} child failed: {err[-500:]}")
    results = []
    for doc in json.loads(out):
        doc["method"] = FASTPIPE_TWIN
        doc["extra"] = {**doc["extra"], "method": FASTPIPE_TWIN, "implementation": implementation}
        results.append(Result(**doc))
    return results


def _twin_child(argv: list[str]) -> int:
    """``measure_other_twin``'s child: IMPLEMENTATION SIZE RELAYS REPEAT -> JSON on stdout."""
    import fastpipe

    implementation, size, relays, repeat = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if fastpipe.IMPLEMENTATION != implementation:
        sys.stderr.write(f"expected the {implementation!r} core, got {fastpipe.IMPLEMENTATION!r}\n")
        return 1
    from fastpipe._cli.args import stop_signals_raise

    directory = new_scratch_dir(size)
    results: list[Result] = []
    # The parent asks with SIGTERM when it is stopped: clean up as on Ctrl-C.
    with stop_signals_raise():
        try:
            for cases in build_cases(size, relays, directory, only=(FASTPIPE,)):
                results += run_workload(cases, repeat)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    sys.stdout.write(json.dumps([asdict(r) for r in results]))
    return 0


def run_bench(
    size_mib: int = DEFAULT_SIZE_MIB,
    repeat: int = DEFAULT_REPEAT,
    relays: int = SMALL_RELAYS,
    json_path: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``fastpipe bench``: run every workload, print the tables, maybe write JSON.

    Args:
        size_mib: bytes per bulk copy, in MiB.
        repeat: rounds per case; the tables show the median and the best.
        relays: small relays per round, a multiple of ``SMALL_IN_FLIGHT``.
        json_path: a file for the machine-readable results; ``-`` for stdout.
        out: where the tables go (stdout; ``err`` when the JSON goes to stdout).
        err: where progress goes, when it is a terminal (stderr).

    Returns:
        The exit status: 0.

    Raises:
        BenchError: a copy moved the wrong bytes, or an endpoint failed.
        ValueError: ``relays`` is not a positive multiple of ``SMALL_IN_FLIGHT``.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    tables = err if json_path == "-" else out
    if json_path not in (None, "-"):
        # Fail before the run, not after it.
        where = os.path.dirname(os.path.abspath(json_path))
        if not os.access(where, os.W_OK):
            raise BenchError(f"cannot write the JSON file {json_path!r}: {where} is not writable")
    size = size_mib * MiB
    progress = _progress_line(err) if err.isatty() else None
    started = time.perf_counter()
    directory = new_scratch_dir(size)
    results: list[Result] = []
    try:
        for cases in build_cases(size, relays, directory):
            results += run_workload(cases, repeat, progress)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if progress is not None:
            progress("")
    twin = other_twin()
    if twin is not None:
        if progress is not None:
            progress(f"fastpipe ({_TWIN_NAMES[twin]}): every workload, in a child process")
        try:
            results += measure_other_twin(size, relays, repeat, twin)
        finally:
            if progress is not None:
                progress("")
    rss_per_relay, workers, in_use = measure_idle_rss(IDLE_RELAYS)
    elapsed = time.perf_counter() - started
    report = format_report(results, _header(size, relays, repeat, directory))
    memory = (
        f"memory: {IDLE_RELAYS} relays parked on idle pipes cost {rss_per_relay:.1f} KiB of RSS"
        f" each ({workers} workers, {in_use} buffers held), measured in a fresh process"
    )
    tables.write(f"{report}\n{memory}\n(total {elapsed:.1f} s)\n")
    if json_path is not None:
        idle = {
            "relays": IDLE_RELAYS,
            "rss_kib_per_relay": round(rss_per_relay, 2),
            "workers": workers,
            "buffers_in_use": in_use,
        }
        _write_json(json_path, results, size, relays, repeat, idle, out)
    return 0


def _write_json(
    path: str,
    results: Sequence[Result],
    size: int,
    relays: int,
    repeat: int,
    idle_memory: dict[str, float | int],
    out: TextIO,
) -> None:
    import fastpipe

    doc = {
        "fastpipe": fastpipe.__version__,
        "implementation": fastpipe.IMPLEMENTATION,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "size_bytes": size,
        "small_relays": relays,
        "small_payload": SMALL_PAYLOAD,
        "small_in_flight": SMALL_IN_FLIGHT,
        "spin_baseline_divisor": SPIN_BASELINE_DIVISOR,
        "repeat": repeat,
        "warm_page_lists": bool(_cpus_to_warm()),
        "results": [
            asdict(r)
            | {
                "median_s": r.median,
                "best_s": r.best,
                "MiB_per_s": r.mib_s,
                "relay_cpu_s": r.cpu,
                "cpu_s_per_GiB": r.cpu_per_gib,
            }
            for r in results
        ],
        "idle_memory": idle_memory,
    }
    text = json.dumps(doc, indent=2) + "\n"
    if path == "-":
        out.write(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    # The endpoint processes: python -I -S _bench/__init__.py endpoint ROLE ARGS...
    if sys.argv[1:2] != ["endpoint"] or len(sys.argv) < 3:
        raise SystemExit(
            "usage: _bench/__init__.py endpoint ROLE [ARGS...] (internal to fastpipe bench)"
        )
    sys.exit(_endpoint_main(sys.argv[2:]))
