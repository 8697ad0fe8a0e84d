"""fastpipe: move bytes between file descriptors without holding the GIL.

Low level, the compiled core::

    copy_fd(src_fd, dst_fd, count=None, *, zerocopy=True) -> int
    buffer_stats() -> dict; trim_buffers() -> int; BUFFER_SIZE
    pipe_stats() -> dict; trim_pipes() -> int   (splice's intermediate pipes)

High level, a pool of persistent worker threads::

    relay(src, dst, *, close=True, count=None, zerocopy=True, idle_timeout=None) -> Relay[int]
    proxy(a, b, *, close=True, idle_timeout=None) -> Relay[tuple[int, int]]
    default_pool() -> WorkerPool

The version is written here once; pyproject.toml reads it from ``__version__``.
"""

from __future__ import annotations

from fastpipe._impl import (
    BUFFER_SIZE,
    IMPLEMENTATION,
    buffer_stats,
    copy_fd,
    pipe_stats,
    trim_buffers,
    trim_pipes,
)
from fastpipe._pool import WorkerPool, default_pool
from fastpipe._relay import FdLike, Relay

__version__ = "0.1.0"

__all__ = [
    "BUFFER_SIZE",
    "IMPLEMENTATION",
    "FdLike",
    "Relay",
    "WorkerPool",
    "buffer_stats",
    "copy_fd",
    "default_pool",
    "pipe_stats",
    "proxy",
    "relay",
    "trim_buffers",
    "trim_pipes",
]


def relay(
    src: FdLike,
    dst: FdLike,
    *,
    close: bool = True,
    count: int | None = None,
    zerocopy: bool = True,
    idle_timeout: float | None = None,
) -> Relay[int]:
    return default_pool().relay(
        src, dst, close=close, count=count, zerocopy=zerocopy, idle_timeout=idle_timeout
    )


def proxy(
    a: FdLike | tuple[FdLike, FdLike],
    b: FdLike | tuple[FdLike, FdLike],
    *,
    close: bool = True,
    idle_timeout: float | None = None,
) -> Relay[tuple[int, int]]:
    return default_pool().proxy(a, b, close=close, idle_timeout=idle_timeout)


# One text for each: help(fastpipe.relay) is the full reference, the same as
# help(WorkerPool.relay), and the docs site is generated from it.
relay.__doc__ = WorkerPool.relay.__doc__
proxy.__doc__ = WorkerPool.proxy.__doc__
