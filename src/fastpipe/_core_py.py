"""The pure-Python twin of ``_core``: same names, same behaviour, slower.

It is used where the extension cannot be built or when
FASTPIPE_NO_EXTENSIONS=1.  Each syscall here releases the GIL on its own, but
the loop between them needs it, so it does not keep full speed while other
threads run Python; that is the reason the compiled core exists.  EINTR is
handled by the ``os`` functions themselves (PEP 475).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import threading
import time

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
    global _lock, _in_use, _peak
    _lock = threading.Lock()
    _in_use = 0
    _peak = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_fd(fd: object, name: str) -> int:
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{name} must be an int file descriptor, not {type(fd).__name__}")
    if fd < 0:
        raise ValueError(f"{name} must be a non-negative file descriptor, got {fd}")
    if fd > 0x7FFFFFFF:
        raise ValueError(f"{name} is out of range: {fd}")
    return fd


def _check_count(count: object) -> int:
    if count is None:
        return -1
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int or None, not {type(count).__name__}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    if count > 0x7FFFFFFFFFFFFFFF:
        raise ValueError(f"count is out of range: {count}")
    return count


def _check_idle_timeout(seconds: object) -> float | None:
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"idle_timeout must be a number or None, not {type(seconds).__name__}")
    if not seconds > 0:
        raise ValueError(f"idle_timeout must be greater than 0, got {seconds}")
    return float(seconds)


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
        self.bytes_copied = 0

    @property
    def method(self) -> str:
        return "readwrite"

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
        while True:
            timeout = None
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        errno.ETIMEDOUT, f"no byte moved for {self._idle:g} s (idle_timeout)"
                    )
                timeout = left * 1000.0 + 1
            ready = p.poll(timeout)
            for _, revents in ready:
                if revents & select.POLLNVAL:
                    raise OSError(errno.EBADF, os.strerror(errno.EBADF))
                return

    def wait_readable(self) -> None:
        self._start_clock()
        self._wait(self._src, select.POLLIN)

    def _write_all(self, dst_sock: socket.socket | None, views: list[memoryview]) -> None:
        while views:
            try:
                if dst_sock is not None:
                    n = dst_sock.sendmsg(views, [], socket.MSG_NOSIGNAL)
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
        if self._started:
            raise RuntimeError("a CopyJob runs only once")
        self._started = True
        src_mode = os.fstat(self._src).st_mode
        dst_mode = os.fstat(self._dst).st_mode
        src_pollable = not (stat.S_ISREG(src_mode) or stat.S_ISBLK(src_mode))
        dst_pollable = not (stat.S_ISREG(dst_mode) or stat.S_ISBLK(dst_mode))
        src_wait_first = src_pollable and os.get_blocking(self._src)
        dst_wait_first = (
            dst_pollable and os.get_blocking(self._dst) and self._idle is not None
        )
        dst_sock = None
        if stat.S_ISSOCK(dst_mode):
            # A detached view of the caller's socket, to send with
            # MSG_NOSIGNAL; it is detached again, never closed.
            dst_sock = socket.socket(fileno=self._dst)
        self._start_clock()
        want = _MAX_IOV if not src_pollable else _START_IOV
        bufs: list[bytearray] = []
        try:
            if self._prefix:
                if dst_wait_first:
                    self._wait(self._dst, select.POLLOUT)
                self._write_all(dst_sock, [memoryview(self._prefix)])
                self._prefix = b""
            while self._limit != 0:
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
                if dst_wait_first:
                    self._wait(self._dst, select.POLLOUT)
                self._write_all(dst_sock, out)
                if size == len(bufs) * BUFFER_SIZE and sum(map(len, out)) == size:
                    want = min(want * 2, _MAX_IOV)
            return self.bytes_copied
        finally:
            _give(bufs)
            if dst_sock is not None:
                dst_sock.detach()


def copy_fd(
    src_fd: int, dst_fd: int, count: int | None = None, *, zerocopy: bool = True
) -> int:
    """Copy from ``src_fd`` to ``dst_fd``; see ``fastpipe.copy_fd``."""
    return CopyJob(src_fd, dst_fd, count, zerocopy=zerocopy).run()
