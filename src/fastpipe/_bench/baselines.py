"""The standard library's ways of copying that fastpipe is measured against,
and the busy loop of a main thread that spins during a copy."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import threading
from concurrent.futures import Future
from typing import Any

from fastpipe._bench.common import BenchError, End, MiB
from fastpipe._bench.methods import READWRITE_LOOP, SPLICE_LOOP


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
