"""proxy(): two relays that make one connection, and how they end together.

A proxy is one task holding two core ``CopyJob``s, a->b and b->a, each run by
its own pool worker.  The Python side only acts at the edges, with the GIL,
in whichever thread completes a finished job (the completer, or a thread
waiting in ``result()``):

* a direction that reaches end of file half-closes the side it wrote to:
  ``shutdown(SHUT_WR)`` on a socket, done by the worker in C the moment the
  source ends (no wait for the GIL), so the peer reads end of file but can
  still answer; a separate write-only end (a pipe's write end, given as the
  second item of a ``(reader, writer)`` pair) is closed, which is the only
  end of file a pipe has.  The other direction goes on to its own end.
* a direction that fails stops the other one with ``CopyJob.cancel()``, which
  wakes a worker blocked on an idle fd without closing anything under it.
* once both are done, the ends are closed (``close=True``): each fd once,
  even when the sides share an fd (one side's writer is the other's reader).
* no two directions read one stream, or write one: that is refused at once
  (``proxy(x, x)`` among others; ``relay(x, x)`` echoes one stream).

``idle_timeout`` means "no byte either way for that long": a download keeps
the upload direction idle for as long as it lasts, so a per-direction
timeout would kill healthy connections.  The core's clock is per job, so the
proxy's is a watchdog thread that samples both jobs' ``bytes_copied``.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import os
import socket
import stat
import threading
import time
from concurrent.futures import CancelledError
from typing import Any

from fastpipe._checks import check_idle_timeout
from fastpipe._relay import (
    Relay,
    cancel_future,
    close_ends,
    closes_in_c,
    fd_of,
    forget_closed,
    make_job,
    repoker,
    retire,
)


class _Side:
    """One side of a proxy, resolved in the caller's thread.

    ``a`` may be one object read and written both ways (a socket, a tty), or
    a ``(reader, writer)`` pair such as ``(proc.stdout, proc.stdin)``.
    """

    __slots__ = (
        "given",
        "reader",
        "writer",
        "read_fd",
        "write_fd",
        "write_is_socket",
        "read_name",
        "write_name",
    )

    def __init__(self, side: object, name: str, deferred: list[OSError]) -> None:
        self.given = side
        if isinstance(side, tuple):
            if len(side) != 2:
                raise TypeError(f"{name} must be one end or a (reader, writer) pair")
            self.reader, self.writer = side
            self.read_name, self.write_name = f"{name}[0]", f"{name}[1]"
            self.read_fd = fd_of(self.reader, self.read_name, deferred)
            self.write_fd = fd_of(self.writer, self.write_name, deferred)
        else:
            self.reader = self.writer = side
            self.read_name = self.write_name = name
            self.read_fd = self.write_fd = fd_of(side, name, deferred)
        if type(self.writer) is socket.socket:
            self.write_is_socket = True
        elif self.write_fd < 0:
            self.write_is_socket = False  # its fileno() failed: never runs
        else:
            try:
                self.write_is_socket = stat.S_ISSOCK(os.fstat(self.write_fd).st_mode)
            except OSError:
                # A bad fd: the job reports EBADF through the relay.
                self.write_is_socket = False


# Every ProxyTask's bookkeeping (pending, dropped, closed, error, timed_out)
# changes under this one lock, held for a few bytecodes and never across a
# close or a callback: a per-proxy lock would cost each idle connection as
# much again as its bookkeeping.
_books = threading.Lock()

# A proxy's four ends by position: a's reader, a's writer, b's reader, b's
# writer.  Job 0 (a -> b) reads position 0 and writes 3; job 1 (b -> a)
# reads 2 and writes 1.  Positions that name one fd (a socket read and
# written both ways) are one end: the first of them stands for it, and the
# masks below have one bit per standing position.
_SRC = (0, 2)
_DST = (3, 1)
# A proxy whose sides are one object each: a's fd at positions 0 and 1, b's
# at 2 and 3 (same), and its two ends (a bit per standing position).
_SAME_WHOLE = 0 << 0 | 0 << 2 | 2 << 4 | 2 << 6
_PAIR = 1 << 0 | 1 << 2


class ProxyTask:
    """A proxy on its way through the pool: its future, both jobs and ends.

    ``complete()`` is called once per job, possibly by two threads at once
    (the completer and a thread in ``result()``), hence the lock,
    ``_books``, one for every proxy: it guards the few fields below and is
    held for a handful of bytecodes, never across a close.  An end is
    marked closed under it before it is closed outside it, so no fd number
    is shut down or closed twice (it may belong to someone else by then);
    and a direction's half-close is done before its ``_done()``, so the
    last ``_done()``, which closes the rest and settles the future, comes
    after every close.

    An idle connection is mostly this object and its jobs, so it holds only
    slots and small ints: which positions share an fd, which ends a worker
    closes in C, which are closed, are bit masks (ints below 256, which
    Python never allocates); the fds themselves are the jobs'.
    """

    __slots__ = (
        "relay",
        "core",
        "live",
        "jobs",
        "a",
        "b",
        "close",
        "idle_timeout",
        "same",
        "in_c",
        "dst_socket",
        "pending",
        "dropped",
        "closed",
        "error",
        "cancel_requested",
        "timed_out",
        "watched",
    )

    def __init__(
        self,
        relay: Relay[tuple[int, int]],
        a: _Side,
        b: _Side,
        close: bool,
        idle_timeout: float | None,
        core: Any,
        live: set[Any],
    ) -> None:
        self.relay = relay
        self.core = core
        self.live = live  # the pool's unsettled tasks; this one leaves when settled
        self.close = close
        self.idle_timeout = idle_timeout
        # jobs[0] copies a -> b, jobs[1] b -> a.
        self.jobs = (
            make_job(a.reader, b.writer, a.read_fd, b.write_fd, None, True, None),
            make_job(b.reader, a.writer, b.read_fd, a.write_fd, None, True, None),
        )
        # The sides as the user gave them: one object, or a (reader, writer)
        # pair (theirs already: no tuple made here).
        self.a = a.given
        self.b = b.given
        # same: 2 bits per position, the first position with its fd.
        # (One object per side, the common proxy, is one constant.)
        whole = a.reader is a.writer and b.reader is b.writer
        if whole:
            self.same = _SAME_WHOLE
        else:
            fds = (a.read_fd, a.write_fd, b.read_fd, b.write_fd)
            same = 0
            for p, fd in enumerate(fds):
                same |= fds.index(fd) << (2 * p)
            self.same = same
        # Under _books: the jobs left to end, the jobs taken off the queue
        # (never run), the ends closed so far (bit per standing position).
        self.pending = 2
        self.dropped = 0
        self.closed = 0
        self.error: BaseException | None = None
        self.cancel_requested = False
        self.timed_out = False
        self.watched = False  # in the watchdog's heap (under its lock)
        # Bit i: job i writes to a socket, which its worker shuts down in C.
        self.dst_socket = b.write_is_socket | a.write_is_socket << 1
        # An end only one job uses is closed by that job's worker in C the
        # moment it ends (when it is an int or a plain socket): a pipe's
        # write end is half-closed that way without waiting for the GIL.
        # An end both jobs use is closed once both have ended: here, or in
        # C by the last one's worker (the pair, below).
        # in_c: 4 bits per job, the ends its worker closes.
        in_c = 0
        if close and whole:
            # The common socket proxy: each side one object, which both
            # directions use, so neither closes it alone.  When a worker may
            # close both fds, whichever direction ends last closes them in
            # C (bits 8-11 of in_c: the pair).
            if closes_in_c(self.a) and closes_in_c(self.b):
                self.jobs[0].close_pair_with(self.jobs[1])
                in_c = _PAIR << 8
        elif close:
            for i, job in enumerate(self.jobs):
                s, d = self._end(_SRC[i]), self._end(_DST[i])
                src = self._closes_in_c(s, i)
                dst = d != s and self._closes_in_c(d, i)
                if src or dst:
                    job.close_fds(src, dst)
                    in_c |= (src << s | dst << d) << (4 * i)
        self.in_c = in_c
        for i, job in enumerate(self.jobs):
            job.task = self
            if self.dst_socket >> i & 1:
                job.shut_wr_at_eof(True)

    # -- the ends, from the masks -----------------------------------------

    @property
    def ends(self) -> tuple[object, object, object, object]:
        """The objects (or ints) at each position."""
        a, b = self.a, self.b
        a_reader, a_writer = a if isinstance(a, tuple) else (a, a)
        b_reader, b_writer = b if isinstance(b, tuple) else (b, b)
        return a_reader, a_writer, b_reader, b_writer

    def _end(self, p: int) -> int:
        """The position that stands for position ``p``'s fd."""
        return self.same >> (2 * p) & 3

    def _users(self, e: int) -> int:
        """Bit i: job i reads or writes end ``e``."""
        return (self._end(_SRC[0]) == e or self._end(_DST[0]) == e) | (
            self._end(_SRC[1]) == e or self._end(_DST[1]) == e
        ) << 1

    def _owners(self, e: int) -> list[object]:
        """What closes end ``e``'s fd: every distinct object over it (two
        makefile() objects of one socket each hold a reference that must
        go), or, for an fd named only as an int, that int once."""
        owners: list[object] = []
        for p, obj in enumerate(self.ends):
            if self._end(p) != e:
                continue
            if isinstance(obj, int):
                if not owners:
                    owners.append(obj)
            else:
                if owners and isinstance(owners[0], int):
                    owners.clear()
                if not any(o is obj for o in owners):
                    owners.append(obj)
        return owners

    def _all_ends(self) -> list[int]:
        return [e for e in range(4) if self._end(e) == e]

    def _in_c(self, i: int) -> int:
        """The ends job ``i``'s worker closes in C (a mask)."""
        return self.in_c >> (4 * i) & 15

    def _closes_in_c(self, e: int, i: int) -> bool:
        # The users first: a socket both directions use (the common proxy)
        # is decided without listing its owners.
        if self._users(e) != 1 << i:
            return False
        owners = self._owners(e)
        return len(owners) == 1 and closes_in_c(owners[0])

    # -- the pool's protocol ----------------------------------------------

    def close_ends(self) -> BaseException | None:
        """Close every end of a proxy that never reached a worker."""
        if not self.close:
            return None
        return close_ends([obj for e in self._all_ends() for obj in self._owners(e)])

    def drop(self, job: Any) -> None:
        """``job`` was taken off the queue and will never run."""
        i = self.jobs.index(job)
        self.cancel_requested = True
        self._done(i, dropped=True)
        self._stop(1 - i)

    def complete(self, job: Any) -> None:
        """Called once per finished job, with the GIL."""
        i = self.jobs.index(job)
        try:
            job.result()
        except CancelledError:
            pass  # we asked for it: the cause is recorded already
        except BaseException as exc:  # noqa: B036 - delivered through the future
            with _books:
                if self.error is None:
                    # Only completer frames, which would hold this proxy.
                    self.error = exc.with_traceback(None)
            # An error in one direction stops both.
            self._stop(1 - i)
            del exc
        else:
            with _books:
                # The last direction too: with close=False nothing else
                # tells its peer that the proxy is done writing.
                if self.error is None and not self.cancel_requested and not self.timed_out:
                    owners = self._half_close(i)
                else:
                    owners = None
            if owners:
                error = close_ends(owners)
                if error is not None:
                    with _books:
                        if self.error is None:
                            self.error = error
                del error
        self._done(i)

    def cancel(self) -> bool:
        """Stop both directions; True if the proxy had not ended by itself.

        Jobs still queued are taken off the queue; running ones are asked to
        stop.  Returns at once: ``Relay.cancel`` waits for the completion.
        """
        self.cancel_requested = True
        stopped = [self._stop(i) for i in (0, 1)]
        return any(stopped)

    def _stop(self, i: int) -> bool:
        """Stop job ``i``: off the queue if it waits there, else ``cancel()``.

        A job cancelled while still queued would only end once a worker
        picks it up, which with ``max_workers`` may be much later.
        """
        job = self.jobs[i]
        if self.core.unqueue(job):
            self._done(i, dropped=True)
            return True
        if not job.cancel():
            return False
        # Nobody may be waiting to ask again (an error or an idle timeout
        # stopped this direction): a lost wake-up signal must not leave it
        # blocked on an idle fd for ever.
        repoker.watch((job,))
        return True

    def bytes_moved(self) -> int:
        return sum(job.bytes_copied for job in self.jobs)

    def expire(self) -> None:
        """The watchdog saw no byte either way for ``idle_timeout`` seconds."""
        with _books:
            if self.pending == 0:
                return
            self.timed_out = True
        self._stop(0)
        self._stop(1)

    # -- the end ----------------------------------------------------------

    def _half_close(self, i: int) -> list[object] | None:
        """Job ``i`` reached end of file: what to close so that its peer sees
        end of file too (marked closed here), or None.

        Called with ``_books`` held; the caller closes them after."""
        e = self._end(_DST[i])
        if self.dst_socket >> i & 1 or (self._in_c(i) | self.closed) >> e & 1:
            # The worker shut a socket down, or closed the end, in C: the
            # peer has its end of file.
            return None
        if self.close and self._users(e) == 1 << i:
            # A write-only end that nothing else uses (a pipe): closing it
            # is its end of file.  With close=False it stays open: the fd
            # is the caller's, and closing it here would turn their own
            # later close into a double close.
            self.closed |= 1 << e
            return self._owners(e)
        return None

    def _done(self, i: int, dropped: bool = False) -> None:
        rest: list[object] = []
        forget: list[object] = []
        with _books:
            self.pending -= 1
            if dropped:
                self.dropped |= 1 << i
            else:
                self.closed |= self._in_c(i)
            if self.pending:
                return
            if self.close and self.in_c >> 8 and not self.dropped:
                # Both directions ended in a worker, and the last one closed
                # both fds in C: the objects only need marking closed.
                forget = [obj for obj in (self.a, self.b) if not isinstance(obj, int)]
                self.closed = 15
            elif self.close:
                in_c = self._in_c(0) | self._in_c(1)
                for e in self._all_ends():
                    if not self.closed >> e & 1:
                        rest += self._owners(e)
                    elif in_c >> e & 1:
                        # Closed by a worker in C: only a plain socket
                        # object is left to mark closed.
                        forget += [obj for obj in self._owners(e) if not isinstance(obj, int)]
                self.closed = 15
        # Both directions have ended: this thread alone gets here, and no
        # other touches the ends now.
        for obj in forget:
            forget_closed(obj)
        error = self.error
        close_error = close_ends(rest) if rest else None
        if error is None:
            error = close_error
        relay = self.relay
        cancelled = self.cancel_requested and (
            self.dropped != 0 or any(job.cancelled for job in self.jobs)
        )
        if self.error is None and cancelled and not self.timed_out:
            cancel_future(relay)
        elif error is not None:
            relay.set_exception(error)
        elif self.timed_out:
            relay.set_exception(
                TimeoutError(
                    errno.ETIMEDOUT,
                    f"no byte moved either way for {self.idle_timeout:g} s (idle_timeout)",
                )
            )
        else:
            relay.set_result((self.jobs[0].result(), self.jobs[1].result()))
        retire(self)
        if self.watched:
            watchdog.forget(self)
        del error


# -- idle_timeout: one watchdog thread for every proxy that has one -----------


class _Watchdog:
    """Samples each watched proxy's byte count every quarter of its timeout.

    A proxy expires once a sample sees no change for ``idle_timeout``: it
    fails between ``T`` and ``1.25 T`` after its last byte.  The thread
    exits when it has nothing to watch and is started again on demand; it is
    a daemon for the same reason as the workers (it must never delay exit).

    A proxy that ends is forgotten at once, not at its next sample: with a
    long timeout and many short connections, the heap would otherwise hold
    every connection of the last ``T / 4`` seconds, ends and all.  Its entry
    stays in the heap, counted in ``_dead``, until the dead are more than
    half of it; then the heap is rebuilt without them.  So it never holds
    more than twice the live proxies' entries, at a cost per ended proxy
    that stays constant on average.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, ProxyTask, int, float]] = []
        self._dead = 0  # entries whose task was forgotten
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, task: ProxyTask) -> None:
        assert task.idle_timeout is not None
        now = time.monotonic()
        with self._cond:
            task.watched = True
            self._push(task, now, 0, now)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._main, name="fastpipe-watchdog", daemon=True
                )
                self._thread.start()
            else:
                self._cond.notify()

    def forget(self, task: ProxyTask) -> None:
        """The proxy has ended: its entry no longer counts."""
        with self._cond:
            if not task.watched:
                return  # the thread dropped it already
            task.watched = False
            self._dead += 1
            if self._dead > len(self._heap) // 2:
                self._heap = [entry for entry in self._heap if entry[2].watched]
                heapq.heapify(self._heap)
                self._dead = 0

    def _push(self, task: ProxyTask, now: float, seen: int, since: float) -> None:
        assert task.idle_timeout is not None
        step = task.idle_timeout / 4
        due = min(now + step, since + task.idle_timeout)
        heapq.heappush(self._heap, (due, next(self._ids), task, seen, since))

    def _main(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while True:
                    if not self._heap:
                        self._thread = None
                        return
                    now = time.monotonic()
                    if self._heap[0][0] <= now:
                        break
                    cond.wait(self._heap[0][0] - now)
                _, _, task, seen, since = heapq.heappop(self._heap)
                if not task.watched:
                    self._dead -= 1
                    continue
                if task.relay.done():
                    task.watched = False
                    continue
                assert task.idle_timeout is not None
                moved = task.bytes_moved()
                if moved != seen:
                    seen, since = moved, now
                if now - since < task.idle_timeout:
                    self._push(task, now, seen, since)
                    continue
                task.watched = False  # off the heap for good
            # Outside the lock: cancelling takes each job's own lock.
            task.expire()


watchdog = _Watchdog()


def build(
    relay: Relay[tuple[int, int]],
    a: object,
    b: object,
    close: bool,
    idle_timeout: float | None,
    core: Any,
    live: set[Any],
    deferred: list[OSError],
) -> ProxyTask | list[object]:
    """Check a proxy's arguments in the caller's thread; return its task.

    Returns:
        The task; or, when an end's ``fileno()`` raised an OSError (put in
        ``deferred``), the ends that ``close=`` covers, for the caller to
        fail the relay with that error.

    Raises:
        TypeError, ValueError: as ``relay()`` does, for either side or for
            ``idle_timeout``.
    """
    side_a = _Side(a, "a", deferred)
    side_b = _Side(b, "b", deferred)
    # The core's clock never sees a proxy's timeout: the watchdog's does.
    idle_timeout = check_idle_timeout(idle_timeout)
    _check_one_direction_per_stream(side_a, side_b)
    if deferred:
        return [side_a.reader, side_a.writer, side_b.reader, side_b.writer] if close else []
    return ProxyTask(relay, side_a, side_b, bool(close), idle_timeout, core, live)


# -- one stream, one direction ---------------------------------------------------


def _check_one_direction_per_stream(a: _Side, b: _Side) -> None:
    """ValueError if both directions would read one stream, or write one.

    Two workers reading one stream take turns at its bytes: each forwards
    the part it happened to read, out of order, and the first to see end of
    file half-closes a side the other is still writing.  Two writing one
    stream interleave their bytes in it.  ``proxy(x, x)`` does both; so do
    dup'd fds, an object and its own fd, and pairs that share an end.  One
    socket or tty echoed back to its peer is one direction: ``relay(x, x)``.
    """
    stats: dict[int, os.stat_result | None] = {}
    if _same_stream(a.read_fd, b.read_fd, True, stats):
        raise ValueError(
            f"{a.read_name} and {b.read_name} read the same stream: two directions would "
            "each take part of its bytes and reorder them; to echo a socket or a tty "
            "back to its peer, use relay(x, x)"
        )
    if _same_stream(a.write_fd, b.write_fd, False, stats):
        raise ValueError(
            f"{a.write_name} and {b.write_name} write to the same stream: two directions "
            "would interleave their bytes in it; to echo a socket or a tty back to its "
            "peer, use relay(x, x)"
        )


def _same_stream(
    fd1: int, fd2: int, reading: bool, stats: dict[int, os.stat_result | None]
) -> bool:
    """Whether two fds lead to one stream, for two readers or two writers.

    Not the fd numbers: dup'd fds share one open file description, and even
    two descriptions of one pipe or tty (a second open through
    ``/proc/self/fd/N``) share its bytes.  The same device and inode is the same stream, with two
    exceptions: two descriptions of one regular file each have their own
    offset, so two readers each read all of it (writers would still write
    over each other); and a pipe's two ends share an inode, but only one of
    them can be read (the other direction fails with EBADF).
    """
    if fd1 < 0 or fd2 < 0:
        return False  # a fileno() that failed: the proxy fails with it
    if fd1 == fd2:
        return True
    st1, st2 = _stat(fd1, stats), _stat(fd2, stats)
    if st1 is None or st2 is None:
        return False  # a bad fd: the proxy fails with EBADF
    if (st1.st_dev, st1.st_ino) != (st2.st_dev, st2.st_ino):
        return False
    if reading and (stat.S_ISREG(st1.st_mode) or stat.S_ISBLK(st1.st_mode)):
        return _share_offset(fd1, fd2)
    if stat.S_ISFIFO(st1.st_mode):
        wrong = os.O_WRONLY if reading else os.O_RDONLY
        try:
            modes = [fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in (fd1, fd2)]
        except OSError:
            return False  # a bad fd: the proxy fails with EBADF
        return wrong not in modes
    return True


def _stat(fd: int, stats: dict[int, os.stat_result | None]) -> os.stat_result | None:
    if fd not in stats:
        try:
            stats[fd] = os.fstat(fd)
        except OSError:
            stats[fd] = None
    return stats[fd]


def _share_offset(fd1: int, fd2: int) -> bool:
    """Whether two fds of one file share one open file description.

    Told by moving the first one's offset and looking at the second's, then
    moving it back, in the caller's thread before any worker has the fds.
    Linux's kcmp(KCMP_FILE) would say it without touching them, but needs
    a syscall number per architecture through ctypes, and container
    seccomp profiles (Docker's default) refuse it.
    """
    try:
        pos = os.lseek(fd1, 0, os.SEEK_CUR)
        if os.lseek(fd2, 0, os.SEEK_CUR) != pos:
            return False
        # Backwards where it can: a block device refuses an offset past its end.
        probe = pos - 1 if pos > 0 else 1
        os.lseek(fd1, probe, os.SEEK_SET)
        try:
            return os.lseek(fd2, 0, os.SEEK_CUR) == probe
        finally:
            os.lseek(fd1, pos, os.SEEK_SET)
    except OSError:
        return True  # cannot tell them apart: one stream, to be safe


def _after_fork_in_child() -> None:
    # The parent's watchdog thread does not exist here; its proxies do not
    # run here either.
    watchdog._reset()
    # A thread of the parent's may have held it at the fork.
    _books._at_fork_reinit()  # type: ignore[attr-defined]


os.register_at_fork(after_in_child=_after_fork_in_child)
