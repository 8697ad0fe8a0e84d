"""The pure-Python twin of ``_core``: same names, same behaviour, slower.

It is used where the extension cannot be built or when
FASTPIPE_NO_EXTENSIONS=1.  Each syscall here releases the GIL on its own, but
the loop between them needs it, so it does not keep full speed while other
threads run Python; that is the reason the compiled core exists.  EINTR is
handled by the ``os`` functions themselves (PEP 475).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError

from fastpipe._checks import check_count as _check_count
from fastpipe._checks import check_fd as _check_fd
from fastpipe._checks import check_idle_timeout as _check_idle_timeout

BUFFER_SIZE = 32768
_MAX_IOV = 16
_START_IOV = 2

_lock = threading.Lock()
_free: list[bytearray] = []
_in_use = 0
_peak = 0


def _take(n: int) -> list[bytearray]:
    global _in_use, _peak
    with _lock:
        got = [_free.pop() for _ in range(min(n, len(_free)))]
        fresh = n - len(got)
        _in_use += n
        _peak = max(_peak, _in_use)
    return got + [bytearray(BUFFER_SIZE) for _ in range(fresh)]


def _give(bufs: list[bytearray]) -> None:
    global _in_use
    if not bufs:
        return
    with _lock:
        _free.extend(bufs)
        _in_use -= len(bufs)
    bufs.clear()


def buffer_stats() -> dict[str, int]:
    """Return ``buffer_size``, ``allocated``, ``free``, ``in_use`` and ``peak``."""
    with _lock:
        return {
            "buffer_size": BUFFER_SIZE,
            "allocated": len(_free) + _in_use,
            "free": len(_free),
            "in_use": _in_use,
            "peak": _peak,
        }


def trim_buffers() -> int:
    """Free every idle pooled buffer; return how many were freed."""
    with _lock:
        n = len(_free)
        _free.clear()
    return n


def _after_fork_in_child() -> None:
    global _lock, _in_use, _peak, _view_lock
    _lock = threading.Lock()
    _view_lock = threading.Lock()
    _in_use = 0
    _peak = 0


# The pipe pool (see _core): O_NONBLOCK pipes of up to 1 MiB for splice.
PIPE_SIZE = 1 << 20
PIPE_POOL_MAX = 16
KERNEL_CHUNK = 8 << 20
SPLICE_MIN_READ = 64 * 1024
_splice_min_read = SPLICE_MIN_READ
_pipe_lock = threading.Lock()
_pipes_free: list[tuple[int, int, int]] = []
_pipes_all: set[tuple[int, int, int]] = set()
_pipe_counts = {"in_use": 0, "peak": 0, "created": 0, "small": 0}
_pipe_want = PIPE_SIZE


def _pipe_take() -> tuple[int, int, int]:
    with _pipe_lock:
        if _pipes_free:
            pipe = _pipes_free.pop()
            _note_pipe_in_use(1)
            return pipe
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _pipe_want)
    except OSError:
        pass  # over the per-user pipe quota: a smaller pipe still works
    size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    pipe = (r, w, size)
    with _pipe_lock:
        _pipes_all.add(pipe)
        _pipe_counts["created"] += 1
        _pipe_counts["small"] += size < _pipe_want
        _note_pipe_in_use(1)
    return pipe


def _note_pipe_in_use(delta: int) -> None:
    _pipe_counts["in_use"] += delta
    _pipe_counts["peak"] = max(_pipe_counts["peak"], _pipe_counts["in_use"])


def _pipe_give(pipe: tuple[int, int, int], empty: bool) -> None:
    with _pipe_lock:
        if pipe not in _pipes_all:
            return  # from before a fork: already closed
        _note_pipe_in_use(-1)
        if empty and len(_pipes_free) < PIPE_POOL_MAX:
            _pipes_free.append(pipe)
            return
        _pipes_all.discard(pipe)
    os.close(pipe[0])
    os.close(pipe[1])


def pipe_stats() -> dict[str, int]:
    """Return the state of the intermediate pipe pool (see ``_core``)."""
    with _pipe_lock:
        return {
            "pipe_size": _pipe_want,
            "allocated": len(_pipes_free) + _pipe_counts["in_use"],
            "free": len(_pipes_free),
            "in_use": _pipe_counts["in_use"],
            "peak": _pipe_counts["peak"],
            "max_free": PIPE_POOL_MAX,
            "created": _pipe_counts["created"],
            "small": _pipe_counts["small"],
        }


def _set_pipe_size(size: int) -> None:
    """For tests: smaller pipes from now on, as the pipe quota would make them."""
    global _pipe_want
    _pipe_want = size
    trim_pipes()


# How often the poller looks for fds closed under parked copies.
_sweep_s = 1.0


def _set_sweep_interval(seconds: float) -> None:
    """Set how often a poller looks for fds closed under parked copies."""
    global _sweep_s
    _sweep_s = seconds


def _set_splice_min_read(nbytes: int) -> int:
    """For tests: when a socket source moves to splice (0: at once)."""
    global _splice_min_read
    old, _splice_min_read = _splice_min_read, nbytes
    return old


def trim_pipes() -> int:
    """Close every idle pooled pipe; return how many were closed."""
    with _pipe_lock:
        idle = list(_pipes_free)
        _pipes_free.clear()
        _pipes_all.difference_update(idle)
    for r, w, _ in idle:
        os.close(r)
        os.close(w)
    return len(idle)


def _pipes_after_fork_in_child() -> None:
    # The child shares the parent's pipes: close its copies, forget them all.
    global _pipe_lock
    _pipe_lock = threading.Lock()
    for r, w, _ in _pipes_all:
        _close_quietly(r)
        _close_quietly(w)
    _pipes_all.clear()
    _pipes_free.clear()
    _pipe_counts.update(in_use=0, peak=0)


os.register_at_fork(after_in_child=_after_fork_in_child)
os.register_at_fork(after_in_child=_pipes_after_fork_in_child)


def _check_access(fd: int, wrong_mode: int) -> None:
    """EBADF for an fd opened only the other way (or O_PATH), as read/write say.

    The compiled core reads or writes first and gets EBADF at once; this
    twin polls a blocking source first, and a pipe's write end never
    reports POLLIN: without this check it waited for ever.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_ACCMODE == wrong_mode or flags & os.O_PATH:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def _check_not_listening(fd: int) -> None:
    """Raise the kernel's own error for reading a listening socket.

    The compiled core reads a socket first and gets ENOTCONN (EINVAL for
    AF_UNIX) at once; this twin polls a blocking socket first, and POLLIN on
    a listening socket means "a connection to accept": without this check it
    waited for ever.
    """
    with _socket_view(fd) as view:
        if view.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            view.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)  # raises
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))


_view_lock = threading.Lock()


def _socket_over(fd: int) -> socket.socket:
    """A socket object over the caller's fd, which leaves its flags as they were.

    Under ``socket.setdefaulttimeout()`` a new socket object sets O_NONBLOCK
    on its fd, even an existing one, and its calls then wait up to that
    timeout (and raise TimeoutError).  So the object gets timeout 0 (calls
    that would block raise BlockingIOError, which every caller here handles,
    and no flag changes), and a blocking fd gets its mode back.  Under one
    lock: two workers of a proxy make objects over the same fds, and one
    must not read the flag while the other has it changed.  The caller
    detaches the object; closing it would close the caller's fd.
    """
    if socket.getdefaulttimeout() is None:
        return socket.socket(fileno=fd)
    with _view_lock:
        blocking = os.get_blocking(fd)
        view = socket.socket(fileno=fd)
        view.settimeout(0.0)
        if blocking:
            os.set_blocking(fd, True)
    return view


@contextlib.contextmanager
def _socket_view(fd: int) -> Iterator[socket.socket]:
    """A socket object over the caller's fd, detached again on the way out:
    it never closes the fd.  OSError (ENOTSOCK) if the fd is no socket."""
    view = _socket_over(fd)
    try:
        yield view
    finally:
        view.detach()


def fd_ready(fd: int) -> bool:
    """True if reading ``fd`` now would not block (data, end of file or error)."""
    p = select.poll()
    p.register(_check_fd(fd, "fd"), select.POLLIN)
    return bool(p.poll(0))


class CopyJob:
    """One copy from ``src_fd`` to ``dst_fd``, runnable once (see ``_core``)."""

    def __init__(
        self,
        src_fd: int,
        dst_fd: int,
        count: int | None = None,
        *,
        zerocopy: bool = True,
        idle_timeout: float | None = None,
    ) -> None:
        self._src = _check_fd(src_fd, "src_fd")
        self._dst = _check_fd(dst_fd, "dst_fd")
        self._limit = _check_count(count)
        self._idle = _check_idle_timeout(idle_timeout)
        self._zerocopy = bool(zerocopy)
        self._deadline: float | None = None
        self._prefix = b""
        self._started = False
        self._in_worker = False  # a worker has taken it (as _core's in_worker)
        self._close_src = False
        self._close_dst = False
        self._shut_wr = False
        self._result: int | None = None
        self._error: BaseException | None = None
        self.bytes_copied = 0
        # cancel() sets _cancel_req and pokes _wake (an eventfd that every
        # wait polls beside the data fd) under _wake_lock, so it never writes
        # to an eventfd that the copy has already closed.
        self._cancel_req = False
        self._dst_nowait = False
        self._method = "readwrite"
        # The path that last took bytes (or the end of file) from src, for
        # ``method``: a path chosen and then refused is never reported.
        self._used: str | None = None
        self._via_pipe = False
        self._splice_later = False
        self._kmoved = False
        self._ksrc_wait_first = False
        self._kdst_wait_first = False
        self._pipe: tuple[int, int, int] | None = None
        self._pipe_len = 0
        self._splice_retried = False
        self._wake: int | None = None
        self._wake_lock = threading.Lock()
        self.task: object = None
        self.prologue: Callable[[CopyJob], object] | None = None

    @property
    def started(self) -> bool:
        """True once the copy has begun, in this thread or a worker (from
        the moment a worker takes it, prologue included, as in ``_core``)."""
        return self._started or self._in_worker

    @property
    def finished(self) -> bool:
        return self._result is not None or self._error is not None

    @property
    def cancelled(self) -> bool:
        return isinstance(self._error, CancelledError)

    def cancel(self) -> bool:
        """Ask the copy to stop; True if it had not ended (see ``_core``)."""
        if self.finished:
            return False
        with self._wake_lock:
            self._cancel_req = True
            if self._wake is not None:
                os.eventfd_write(self._wake, 1)
        return True

    def _check_cancel(self) -> None:
        if self._cancel_req:
            raise CancelledError()

    def close_fds(self, src: bool, dst: bool) -> None:
        self._close_src = bool(src)
        self._close_dst = bool(dst)

    def shut_wr_at_eof(self, on: bool) -> None:
        self._shut_wr = bool(on)

    def result(self) -> int:
        if self.finished:
            self._prefix = b""  # written, or dropped with the error (see _core)
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("the job has not finished")
        return self._result

    def run_in_worker(self) -> None:
        """What PoolCore's worker does with a job: never raises."""
        self._in_worker = True
        try:
            if self.prologue is not None and not self._cancel_req:
                self.prologue(self)
            self.run()
            if self._shut_wr:
                _shutdown_wr(self._dst)
        except BaseException as exc:  # noqa: B036 - kept for the completer
            self._error = exc
        finally:
            self._started = True
            if self._close_src:
                _close_quietly(self._src)
            if self._close_dst and not (self._close_src and self._dst == self._src):
                _close_quietly(self._dst)

    @property
    def method(self) -> str | None:
        return self._used

    @property
    def src_fd(self) -> int:
        return self._src

    @property
    def dst_fd(self) -> int:
        return self._dst

    @property
    def remaining(self) -> int | None:
        return None if self._limit < 0 else self._limit

    def prepend(self, data: bytes) -> None:
        if self._started:
            raise RuntimeError("the copy has already started")
        if self._limit >= 0:
            if len(data) > self._limit:
                raise ValueError("the prefix is longer than the remaining count")
            self._limit -= len(data)
        self._prefix = bytes(data)

    def _start_clock(self) -> None:
        if self._idle is not None and self._deadline is None:
            self._deadline = time.monotonic() + self._idle

    def _progress(self) -> None:
        if self._idle is not None:
            self._deadline = time.monotonic() + self._idle

    def _wait(self, fd: int, events: int) -> None:
        p = select.poll()
        p.register(fd, events)
        if self._wake is None:
            with self._wake_lock:
                self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        p.register(self._wake, select.POLLIN)
        while True:
            self._check_cancel()
            timeout = None
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        errno.ETIMEDOUT, f"no byte moved for {self._idle:g} s (idle_timeout)"
                    )
                timeout = left * 1000.0 + 1
            ready = p.poll(timeout)
            for ready_fd, revents in ready:
                if ready_fd == self._wake:
                    self._check_cancel()
                    continue
                if revents & select.POLLNVAL:
                    raise OSError(errno.EBADF, os.strerror(errno.EBADF))
                return

    def _write_all(self, dst_sock: socket.socket | None, views: list[memoryview]) -> None:
        while views:
            self._check_cancel()
            try:
                # Never block in the syscall itself, so that a cancel (which
                # pokes the eventfd in _wait) is seen.
                if dst_sock is not None:
                    n = dst_sock.sendmsg(views, [], socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
                elif self._dst_nowait:
                    try:
                        n = os.pwritev(self._dst, views, -1, os.RWF_NOWAIT)
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                        self._dst_nowait = False
                        continue
                else:
                    n = os.writev(self._dst, views)
            except BlockingIOError:
                self._wait(self._dst, select.POLLOUT)
                continue
            self.bytes_copied += n
            self._progress()
            while n:
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    def run(self) -> int:
        if self._started or self.finished:
            raise RuntimeError("a CopyJob runs only once")
        self._started = True
        # SIGPIPE is blocked in this thread for the copy, and one left
        # pending by an EPIPE is consumed: a program that restored SIG_DFL
        # gets BrokenPipeError, not death (see _core's _compat.h).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
        try:
            self._result = self._copy()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            if signal.SIGPIPE not in old:
                while signal.sigtimedwait({signal.SIGPIPE}, 0) is not None:
                    pass
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return self._result

    def _check_same_file(self, src_st: os.stat_result, dst_st: os.stat_result) -> None:
        """EINVAL if the copy would read what it wrote (see ``_core``).

        ``cat f >> f``: the same regular file at both ends, read to end of
        file, chases its own writes for ever; overlapping ranges read back
        bytes already overwritten.  Counted, non-overlapping ranges are fine.
        """
        if not (stat.S_ISREG(src_st.st_mode) and stat.S_ISREG(dst_st.st_mode)):
            return
        if (src_st.st_dev, src_st.st_ino) != (dst_st.st_dev, dst_st.st_ino) or self._limit == 0:
            return
        if self._limit > 0:
            so = os.lseek(self._src, 0, os.SEEK_CUR)
            if fcntl.fcntl(self._dst, fcntl.F_GETFL) & os.O_APPEND:
                do = dst_st.st_size  # every write lands at the end
            else:
                do = os.lseek(self._dst, 0, os.SEEK_CUR)
            # A shared offset (same fd, dup'd fds) gives so == do: overlapping.
            if so + self._limit <= do or do + self._limit <= so:
                return
        raise OSError(
            errno.EINVAL, "src and dst are the same file: the copy would read what it wrote"
        )

    def _copy(self) -> int:
        src_st = os.fstat(self._src)
        dst_st = os.fstat(self._dst)
        src_mode = src_st.st_mode
        dst_mode = dst_st.st_mode
        self._check_same_file(src_st, dst_st)
        _check_access(self._src, os.O_WRONLY)
        _check_access(self._dst, os.O_RDONLY)
        if stat.S_ISSOCK(src_mode):
            _check_not_listening(self._src)
        src_pollable = not (stat.S_ISREG(src_mode) or stat.S_ISBLK(src_mode))
        dst_pollable = not (stat.S_ISREG(dst_mode) or stat.S_ISBLK(dst_mode))
        src_wait_first = src_pollable and os.get_blocking(self._src)
        dst_blocking = dst_pollable and os.get_blocking(self._dst)
        self._dst_nowait = dst_blocking and stat.S_ISFIFO(dst_mode)
        # A blocking pipe is written with RWF_NOWAIT and a socket with
        # MSG_DONTWAIT; anything else blocking is polled first, so that
        # idle_timeout and cancel() are seen.
        dst_wait_first = (
            dst_blocking and not stat.S_ISFIFO(dst_mode) and not stat.S_ISSOCK(dst_mode)
        )
        dst_sock = None
        if stat.S_ISSOCK(dst_mode):
            # A detached view of the caller's socket, to send with
            # MSG_NOSIGNAL; it is detached again, never closed.
            dst_sock = _socket_over(self._dst)
        self._start_clock()
        if self._zerocopy:
            self._choose_kernel_path(src_mode, dst_mode)
        want = _MAX_IOV if not src_pollable else _START_IOV
        bufs: list[bytearray] = []
        try:
            if self._prefix:
                if dst_wait_first:
                    self._wait(self._dst, select.POLLOUT)
                self._write_all(dst_sock, [memoryview(self._prefix)])
                self._prefix = b""
            while True:
                self._check_cancel()
                if self._method != "readwrite":
                    _give(bufs)
                    if self._kernel_copy():
                        break
                    continue
                if self._pipe is not None:
                    # A sink refused splice: write out what the pipe holds.
                    left = self._pipe_len
                    while left:
                        chunk = os.read(self._pipe[0], min(left, 1 << 20))
                        self._write_all(dst_sock, [memoryview(chunk)])
                        left -= len(chunk)
                        self._pipe_len = left
                    self._release_pipe()
                if self._limit == 0:
                    break
                if src_wait_first:
                    if bufs and not fd_ready(self._src):
                        _give(bufs)
                    if not bufs:
                        self._wait(self._src, select.POLLIN)
                if len(bufs) < want:
                    bufs += _take(want - len(bufs))
                size = len(bufs) * BUFFER_SIZE
                if 0 <= self._limit < size:
                    size = self._limit
                views = []
                left = size
                for buf in bufs:
                    if left <= 0:
                        break
                    views.append(memoryview(buf)[: min(left, BUFFER_SIZE)])
                    left -= BUFFER_SIZE
                try:
                    n = os.readv(self._src, views)
                except BlockingIOError:
                    _give(bufs)
                    self._wait(self._src, select.POLLIN)
                    continue
                self._used = "readwrite"
                if n == 0:
                    break
                self._progress()
                if self._limit > 0:
                    self._limit -= n
                out = []
                for v in views:
                    if n <= 0:
                        break
                    out.append(v[: min(n, len(v))])
                    n -= len(v)
                got = sum(map(len, out))  # before _write_all consumes out
                if dst_wait_first:
                    self._wait(self._dst, select.POLLOUT)
                self._write_all(dst_sock, out)
                if self._splice_later and got >= _splice_min_read:
                    self._splice_later = False
                    self._method = "splice"
                if size == len(bufs) * BUFFER_SIZE and got == size:
                    want = min(want * 2, _MAX_IOV)
            return self.bytes_copied
        finally:
            _give(bufs)
            self._release_pipe()
            if dst_sock is not None:
                dst_sock.detach()
            with self._wake_lock:
                if self._wake is not None:
                    os.close(self._wake)
                    self._wake = None

    # -- the kernel paths (the same rules as _core's _choose_kernel_path) --

    def _choose_kernel_path(self, src_mode: int, dst_mode: int) -> None:
        def kind(mode: int) -> str:
            if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
                return "file"
            if stat.S_ISFIFO(mode):
                return "pipe"
            return "socket" if stat.S_ISSOCK(mode) else "char"

        sk, dk = kind(src_mode), kind(dst_mode)
        if "char" in (sk, dk):
            return
        if dk == "file" and fcntl.fcntl(self._dst, fcntl.F_GETFL) & os.O_APPEND:
            return
        if dk == "socket" and self._idle is not None and os.get_blocking(self._dst):
            # sendfile, and splice into a socket, ignore every non-blocking
            # flag: on a blocking socket they wait until the whole chunk is
            # queued, and POLLOUT first does not promise room for it.  The
            # compiled core interrupts them at the idle deadline with a timer
            # signal (see _compat.h); a Python thread cannot be, so a stalled
            # peer would hold the copy past idle_timeout for ever.  The
            # read/write loop sends with MSG_DONTWAIT and polls instead.
            return
        if sk == dk == "file":
            self._method = "copy_file_range"
        elif sk == "file" and dk == "socket":
            self._method = "sendfile"
        else:
            self._method = "splice"
            self._via_pipe = not (dk == "pipe" or (sk == "pipe" and dk != "file"))
            if sk == "socket" and _splice_min_read > 0:
                self._method = "readwrite"
                self._splice_later = True
        # Unlike the compiled core this twin cannot knock a thread out of a
        # blocking syscall, so it polls a blocking source socket first
        # always.  A sink only for idle_timeout (see _core): its POLLOUT is
        # a threshold, and waiting for it can deadlock with a reader that is
        # our own caller.  So a cancel waits for a splice or sendfile stuck
        # on a stalled blocking socket until the peer reads or goes away.
        if sk == "socket":
            self._ksrc_wait_first = os.get_blocking(self._src)
        if dk == "socket":
            self._kdst_wait_first = self._idle is not None and os.get_blocking(self._dst)

    def _src_has_bytes(self) -> bool:
        """Anything to send?  At end of file a blocking sink must not be
        polled: it may stay full until our own caller reads it."""
        try:
            if stat.S_ISREG(os.fstat(self._src).st_mode):
                return os.lseek(self._src, 0, os.SEEK_CUR) < os.fstat(self._src).st_size
            avail = fcntl.ioctl(self._src, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return True  # the copy's own syscall will report it
        return int.from_bytes(avail, sys.byteorder) > 0

    def _release_pipe(self) -> None:
        if self._pipe is not None:
            _pipe_give(self._pipe, self._pipe_len == 0)
            self._pipe = None
            self._pipe_len = 0

    def _moved(self, n: int, written: bool) -> None:
        self._kmoved = True
        self._used = self._method
        if self._limit > 0:
            self._limit -= n
        if written:
            self.bytes_copied += n
        self._progress()

    def _wait_both(self) -> None:
        p = select.poll()
        p.register(self._src, select.POLLIN)
        p.register(self._dst, select.POLLOUT)
        ready = dict(p.poll(0))
        if not ready.get(self._src):
            self._wait(self._src, select.POLLIN)
        elif not ready[self._src] & select.POLLIN:
            return  # end of file: the splice returns 0 without the sink
        elif not self._splice_retried:
            # The source may have been empty at the splice: retry once
            # before blaming the sink (whose POLLOUT is a threshold).
            self._splice_retried = True
        elif not ready.get(self._dst):
            self._wait(self._dst, select.POLLOUT)
        else:
            time.sleep(0.001)  # both "ready" yet EAGAIN: never spin

    def _gives_up(self, err: int | None) -> bool:
        refusals = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
        if self._method == "copy_file_range":
            refusals |= {errno.EXDEV, errno.EPERM, errno.EIO}
        return err in refusals

    def _kernel_copy(self) -> bool:
        """True at the end; False after a fallback (``_method`` is the next path)."""
        while True:
            self._check_cancel()
            if self._pipe is not None and self._pipe_len > 0:
                if self._kdst_wait_first:
                    self._wait(self._dst, select.POLLOUT)
                try:
                    n = os.splice(
                        self._pipe[0], self._dst, self._pipe_len, flags=os.SPLICE_F_NONBLOCK
                    )
                except BlockingIOError:
                    self._wait(self._dst, select.POLLOUT)
                    continue
                except OSError as exc:
                    if self._gives_up(exc.errno):
                        self._method = "readwrite"  # the leftovers go by write()
                        return False
                    raise
                self._pipe_len -= n
                self.bytes_copied += n
                self._progress()
                continue
            if self._limit == 0:
                return True
            chunk = KERNEL_CHUNK if self._limit < 0 else min(self._limit, KERNEL_CHUNK)
            try:
                if self._method == "copy_file_range":
                    n = os.copy_file_range(self._src, self._dst, chunk)
                elif self._method == "sendfile":
                    if self._kdst_wait_first and self._src_has_bytes():
                        self._wait(self._dst, select.POLLOUT)
                    n = os.sendfile(self._dst, self._src, None, chunk)
                else:
                    if self._ksrc_wait_first:
                        self._release_pipe()
                        self._wait(self._src, select.POLLIN)
                    if self._via_pipe:
                        if self._pipe is None:
                            try:
                                self._pipe = _pipe_take()
                            except OSError:
                                if self._kmoved:
                                    raise
                                self._method = "readwrite"
                                return False
                        chunk = min(chunk, self._pipe[2])
                        n = os.splice(self._src, self._pipe[1], chunk, flags=os.SPLICE_F_NONBLOCK)
                    else:
                        if self._kdst_wait_first and self._src_has_bytes():
                            self._wait(self._dst, select.POLLOUT)
                        n = os.splice(self._src, self._dst, chunk, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if self._method == "splice" and self._via_pipe:
                    self._release_pipe()
                    self._wait(self._src, select.POLLIN)
                elif self._method == "splice":
                    self._wait_both()
                else:
                    self._wait(self._dst, select.POLLOUT)
                continue
            except OSError as exc:
                if self._kmoved or not self._gives_up(exc.errno):
                    raise
                self._release_pipe()
                self._method = "sendfile" if self._method == "copy_file_range" else "readwrite"
                return False
            if n == 0:
                if not self._kmoved and self._method != "splice":
                    self._method = "readwrite"  # procfs, sysfs: let read() decide
                    return False
                self._used = self._method
                self._release_pipe()
                return True
            self._splice_retried = False
            if self._method == "splice" and self._via_pipe:
                self._pipe_len += n
                self._moved(n, False)
            else:
                self._moved(n, True)


def copy_fd(src_fd: int, dst_fd: int, count: int | None = None, *, zerocopy: bool = True) -> int:
    """Copy from ``src_fd`` to ``dst_fd``; see ``fastpipe.copy_fd``."""
    return CopyJob(src_fd, dst_fd, count, zerocopy=zerocopy).run()


def _shutdown_wr(fd: int) -> None:
    # proxy(): the peer sees end of file as soon as our source does.
    # shutdown() closes nothing, so the fd stays the caller's.  OSError:
    # not a socket (nothing to half-close), or ENOTCONN (the peer is gone,
    # which the other direction reports).
    with contextlib.suppress(OSError), _socket_view(fd) as view:
        view.shutdown(socket.SHUT_WR)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class WorkerHandle:
    """A new worker's state, handed from submit() to its thread once."""

    __slots__ = ("wake", "job", "idle", "exit", "taken")

    def __init__(self, job: CopyJob | None) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job = job
        self.idle = False
        self.exit = False
        # By its thread or by abandon(), whichever comes first (under the
        # pool's lock): an exception can hit Thread.start() after the
        # thread started, so both may try.
        self.taken = False


class PoolCore:
    """The twin of ``_core.PoolCore``: the same protocol, with threading locks.

    The queue holds single jobs and pairs (a proxy's two directions), in
    order.  A pair starts whole or not at all: half a proxy running under
    ``max_workers`` would forward a request whose reply has no worker.  So
    idle workers may wait while a pair at the head needs one more, and they
    do not time out or leave meanwhile.
    """

    def __init__(self, max_workers: int | None = None, idle_worker_timeout: float | None = None):
        self._max = -1 if max_workers is None else max_workers
        idle = _check_idle_timeout(idle_worker_timeout)
        self._idle_timeout = -1.0 if idle is None else idle
        self.reset_after_fork()
        self._peak = 0
        self._shutting_down = False

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._done_cond = threading.Condition(self._lock)
        self._idle: list[WorkerHandle] = []
        self._queue: deque[list[CopyJob]] = deque()
        self._queued = 0
        self._done: list[CopyJob] = []
        self._workers = 0
        self._busy = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "workers": self._workers,
                "idle": len(self._idle),
                "busy": self._busy,
                "queued": self._queued,
                "peak": self._peak,
            }

    def _note_busy(self) -> None:
        self._busy += 1
        self._peak = max(self._peak, self._busy)

    def _room(self) -> int:
        return len(self._idle) + (1 << 30 if self._max < 0 else self._max - self._workers)

    def _hand(self, job: CopyJob) -> bool | WorkerHandle:
        # To an idle worker, else to a new one; the caller checked there is room.
        self._note_busy()
        if self._idle:
            w = self._idle.pop()
            w.idle = False
            w.job = job
            w.wake.release()
            return True
        self._workers += 1
        return WorkerHandle(job)

    def _enqueue(self, jobs: list[CopyJob]) -> None:
        self._queue.append(jobs)
        self._queued += len(jobs)

    def _check_submit(self, jobs: tuple[CopyJob, ...]) -> None:
        for job in jobs:
            if job.started or job.finished:
                raise RuntimeError("a CopyJob runs only once")
        if self._shutting_down:
            raise RuntimeError("cannot start a relay after shutdown")

    def submit(self, job: CopyJob) -> bool | WorkerHandle:
        with self._lock:
            self._check_submit((job,))
            if not self._queue and self._room() >= 1:
                return self._hand(job)
            self._enqueue([job])
            return False

    def submit_pair(
        self, a: CopyJob, b: CopyJob
    ) -> tuple[bool | WorkerHandle, bool | WorkerHandle, WorkerHandle | None]:
        """Start both jobs, or queue them to start together.

        Returns what ``submit()`` returns for each, and a new idle worker
        (or None) for the caller to start: when the pair has to wait for a
        second worker, a free place in the pool is filled now, since only a
        running worker can later hand the pair out.
        """
        with self._lock:
            self._check_submit((a, b))
            if a is b:
                raise RuntimeError("a CopyJob runs only once")
            if not self._queue and self._room() >= 2:
                return self._hand(a), self._hand(b), None
            self._enqueue([a, b])
            spare = None
            if self._max >= 0 and self._workers < self._max:
                self._workers += 1
                spare = WorkerHandle(None)
                spare.idle = True
                self._idle.append(spare)
            return False, False, spare

    def _dispatch(self, spare: WorkerHandle | None) -> CopyJob | None:
        """Hand out queued entries while the head can start whole; the job
        for ``spare`` (a worker that just finished one), if any."""
        mine = None
        while self._queue:
            jobs = self._queue[0]
            if len(self._idle) + (spare is not None and mine is None) < len(jobs):
                break
            self._queue.popleft()
            self._queued -= len(jobs)
            for job in jobs:
                if spare is not None and mine is None:
                    mine = job
                else:
                    self._hand(job)
        if self._shutting_down and not self._queue:
            self._release_idle()
        return mine

    def _release_idle(self) -> None:
        leaving, self._idle = self._idle, []
        for w in leaving:
            w.idle = False
            w.exit = True
            self._workers -= 1
            w.wake.release()

    def unqueue(self, job: CopyJob) -> bool:
        with self._lock:
            for jobs in self._queue:
                if any(j is job for j in jobs):
                    break
            else:
                return False
            jobs.remove(job)
            self._queued -= 1
            if not jobs:
                self._queue.remove(jobs)
            # Half a pair left is a single job now: it may start at once.
            self._dispatch(None)
            return True

    def abandon(self, handle: WorkerHandle) -> CopyJob | None:
        """The thread for ``handle`` could not start: undo it.

        Safe on a handle whose thread did start (then it does nothing), and
        on one abandoned before.

        Returns:
            The job it was carrying, or had been handed meanwhile (a spare
            from ``submit_pair``), for the caller to fail; or None.
        """
        with self._lock:
            if handle.taken:
                return None  # its thread runs it: the caller cancels the relay
            handle.taken = True
            if not handle.exit:
                # Else shutdown's _release_idle let this spare go, and
                # counted it out, before its thread failed to start.
                self._workers -= 1
            if handle.idle:
                self._idle.remove(handle)
                handle.idle = False
            job, handle.job = handle.job, None
            if job is not None:
                self._busy -= 1
            # The completer of a pool that shuts down waits for the last
            # worker to leave; this may have been it.
            if self._workers == 0:
                self._done_cond.notify_all()
        return job

    def _park(self, w: WorkerHandle) -> bool:
        while True:
            if w.wake.acquire(timeout=self._idle_timeout):
                return w.exit
            with self._lock:
                # A pair waiting at the head counts on the idle workers.
                if w.idle and not self._queue:
                    self._idle.remove(w)
                    w.idle = False
                    self._workers -= 1
                    return True

    def worker_main(self, handle: WorkerHandle) -> None:
        with self._lock:
            if handle.taken:
                return  # abandon() got here first
            handle.taken = True
            job, handle.job = handle.job, None
        while True:
            if job is None:
                if self._park(handle):
                    return
                job, handle.job = handle.job, None
                continue
            job.run_in_worker()
            with self._lock:
                self._done.append(job)
                self._done_cond.notify_all()
                job = self._dispatch(handle)
                if job is not None:
                    continue
                self._busy -= 1
                if self._shutting_down and not self._queue:
                    self._workers -= 1
                    return
                handle.idle = True
                self._idle.append(handle)

    def _finished(self) -> bool:
        return self._shutting_down and self._workers == 0 and not self._queue

    def take_done(self) -> list[CopyJob] | None:
        with self._lock:
            while not self._done and not self._finished():
                self._done_cond.wait()
            jobs, self._done = self._done, []
        return jobs or None

    def help_done(self, job: CopyJob, timeout: float) -> list[CopyJob]:
        with self._lock:
            if not self._done and not job.finished:
                self._done_cond.wait(None if timeout < 0 else timeout)
            jobs, self._done = self._done, []
        return jobs

    def shutdown(self, cancel_queued: bool) -> list[CopyJob]:
        with self._lock:
            self._shutting_down = True
            cancelled: list[CopyJob] = []
            if cancel_queued:
                cancelled = [job for jobs in self._queue for job in jobs]
                self._queue.clear()
                self._queued = 0
            # Idle workers stay while a pair waits for one more of them.
            if not self._queue:
                self._release_idle()
            self._done_cond.notify_all()
        return cancelled
