"""The bulk workloads: a file, a pipe or a TCP connection relayed into a new
file or a TCP connection, and TCP while the main thread spins in Python."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import threading
from typing import Any, ClassVar

from fastpipe._bench.baselines import copyfileobj_in_thread, spin_until_done
from fastpipe._bench.cases import Case
from fastpipe._bench.common import TIMEOUT, BenchError, MiB
from fastpipe._bench.endpoints import Endpoint
from fastpipe._bench.host import warm_page_lists
from fastpipe._bench.methods import (
    BASELINE_HOW,
    COPYFILE,
    COPYFILEOBJ,
    FASTPIPE,
    FASTPIPE_IDLE,
    FASTPIPE_RW,
    READWRITE_LOOP,
    SOCKET_SENDFILE,
    SPLICE_LOOP,
)
from fastpipe._bench.pattern import PatternCheck, describe_mismatch, write_pattern_file

#: copyfileobj in a thread against a spinning main thread waits for the GIL
#: at every 64 KiB read and write (up to the 5 ms switch interval each), so
#: that case moves this fraction of the bytes: compare MiB/s, not time.
SPIN_BASELINE_DIVISOR = 32

#: Less than this for copyfileobj under a spinning main thread comes mostly
#: out of loopback socket buffers (several MiB), without blocking reads, so
#: without the GIL waits that a sustained stream has.
SPIN_SUSTAINED = 16 * MiB


def _new_file(path: str) -> int:
    if os.path.exists(path):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


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

    # The first copies of a run are up to 3x slower for every method, and
    # would all fall to the first method to run: one round each first.
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

    # The first copy of a run is the slowest for every method (as with
    # _IntoNewFile), and would fall to the first method: one round each first.
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
