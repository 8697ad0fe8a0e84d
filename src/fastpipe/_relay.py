"""The Relay future, and turning user objects into fds and back.

Everything here runs with the GIL: argument checks in the caller's thread,
and the few Python steps a worker takes around the GIL-free copy (flushing a
buffered writer, draining a buffered reader's read-ahead, closing the ends,
completing the future).
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

from fastpipe import _impl


@runtime_checkable
class HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = int | HasFileno

# How much read-ahead a buffered reader can hold is its buffer size; asking
# for more than any sane buffer gets all of it in one read1().
_READAHEAD_MAX = 1 << 24


class Relay(Future[Any]):
    """A running or finished relay: a ``concurrent.futures.Future``.

    ``result()`` is the number of bytes copied (for ``proxy`` a tuple per
    direction), or raises the relay's ``OSError``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._jobs: tuple[Any, ...] = ()

    @property
    def bytes_copied(self) -> int:
        """Bytes written so far; readable while the relay runs."""
        return sum(job.bytes_copied for job in self._jobs)

    @property
    def method(self) -> str | None:
        """The copy path in use, or None before the copy has started."""
        for job in self._jobs:
            if job.started:
                return str(job.method)
        return None

    def __await__(self) -> Generator[Any, None, Any]:
        # wrap_future() completes an asyncio future from the worker thread
        # with call_soon_threadsafe, so the event loop never blocks on us.
        return asyncio.wrap_future(self).__await__()


def _fd_of(obj: object, name: str) -> int:
    """Return the fd behind obj, raising TypeError/ValueError at once."""
    if isinstance(obj, bool):
        raise TypeError(f"{name} must be an int fd or an object with fileno(), not bool")
    if isinstance(obj, int):
        if obj < 0:
            raise ValueError(f"{name} must be a non-negative file descriptor, got {obj}")
        return obj
    if isinstance(obj, io.TextIOBase):
        raise TypeError(f"{name} is a text-mode file; open it in binary mode ('rb'/'wb')")
    fileno = getattr(obj, "fileno", None)
    if not callable(fileno):
        raise TypeError(
            f"{name} must be an int fd or an object with fileno(), not {type(obj).__name__}"
        )
    try:
        fd = fileno()
    except io.UnsupportedOperation as exc:
        # io.BytesIO and friends have fileno() but no fd behind it.
        raise TypeError(f"{name} ({type(obj).__name__}) has no file descriptor: {exc}") from None
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{name}.fileno() returned {type(fd).__name__}, not int")
    if fd < 0:
        # A closed socket reports -1.
        raise ValueError(f"{name} is closed (fileno() returned {fd})")
    return fd


def _check_count(count: object) -> None:
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int or None, not {type(count).__name__}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")


def _drain_readahead(obj: object, src_fd: int, limit: int | None) -> bytes:
    """Take the bytes a buffered reader has already read past its fd.

    Nothing here may block: read1() returns buffered bytes without touching
    the fd, and when the buffer is empty it does one raw read, which we only
    allow when poll says the fd is ready, or with O_NONBLOCK set for the
    duration of that one call (and restored).
    """
    if not isinstance(obj, io.BufferedIOBase) or not hasattr(obj, "read1"):
        return b""
    if limit == 0:
        return b""
    want = _READAHEAD_MAX if limit is None else min(limit, _READAHEAD_MAX)
    if _impl.fd_ready(src_fd):
        return bytes(obj.read1(want))
    was_blocking = os.get_blocking(src_fd)
    if was_blocking:
        os.set_blocking(src_fd, False)
    try:
        data = obj.read1(want)
    except BlockingIOError:
        data = b""
    finally:
        if was_blocking:
            os.set_blocking(src_fd, True)
    return bytes(data or b"")


class RelayJob:
    """One direction of a relay: the user's objects plus the core's CopyJob."""

    __slots__ = ("src", "dst", "src_fd", "dst_fd", "core", "started")

    def __init__(
        self,
        src: object,
        dst: object,
        src_fd: int,
        dst_fd: int,
        count: int | None,
        zerocopy: bool,
        idle_timeout: float | None = None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        # CopyJob checks count and idle_timeout, raising TypeError/ValueError
        # in the caller's thread.
        self.core = _impl.CopyJob(
            src_fd, dst_fd, count, zerocopy=zerocopy, idle_timeout=idle_timeout
        )
        self.started = False

    @property
    def bytes_copied(self) -> int:
        return int(self.core.bytes_copied)

    @property
    def method(self) -> str:
        return str(self.core.method)

    def run(self) -> int:
        """Copy, in a worker thread.  Raises OSError."""
        dst = self.dst
        if isinstance(dst, io.BufferedIOBase) and not dst.closed:
            # Bytes the caller wrote through the object go before ours.
            dst.flush()
        prefix = _drain_readahead(self.src, self.src_fd, self.core.remaining)
        if prefix:
            self.core.prepend(prefix)
        self.started = True
        return int(self.core.run())


def close_ends(objs: list[object]) -> BaseException | None:
    """Close each distinct end once; return the first error, if any."""
    error: BaseException | None = None
    seen: set[int] = set()
    for obj in objs:
        key = obj if isinstance(obj, int) else id(obj)
        if key in seen:
            continue
        seen.add(key)
        try:
            if isinstance(obj, int):
                os.close(obj)
            else:
                close: Callable[[], object] = obj.close  # type: ignore[attr-defined]
                close()
        except BaseException as exc:  # noqa: B036 - reported through the future
            if error is None:
                error = exc
    return error


def coerce(src: object, dst: object, count: object) -> tuple[int, int]:
    """Check a relay's arguments in the caller's thread."""
    src_fd = _fd_of(src, "src")
    dst_fd = _fd_of(dst, "dst")
    _check_count(count)
    return src_fd, dst_fd
