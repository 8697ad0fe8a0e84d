"""WorkerPool: persistent worker threads that run relays; waiting ones park.

The policy lives here; the mechanism is the core's ``PoolCore``.  Each worker
is a daemon ``threading.Thread`` whose whole body is ``PoolCore.worker_main``,
all without the GIL.  A relay that must wait (nothing to read, or its sink
full) is *parked* in the pool's epoll set and holds no thread, no buffer and
no pipe; when its fd is ready a worker resumes it.  So the threads are the
relays that *run* at once: ``relay()`` hands a job to an idle worker, or
starts a new worker when none is idle, and the pool grows to the peak number
of running relays and keeps it, as in the Go design this follows, unless
``max_workers`` or ``idle_worker_timeout`` says otherwise.

Completion is batched: one completer thread per pool takes every job that
finished meanwhile in one GIL acquisition, closes object ends through their
``close()``, and sets the futures.  Workers close int fds themselves, in C.
The completer also starts the threads the core asks for when relays that
became ready find every worker busy with a long copy.

Workers and the completer are daemon threads.  A worker may be blocked in a
copy syscall on fds the application owns (a slow disk, a blocking device);
joining it at interpreter exit could hang.  The OS reclaims their fds and
buffers at exit.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
import weakref
from concurrent.futures import CancelledError
from typing import Any

from fastpipe import _impl, _proxy, _relay
from fastpipe._relay import (
    FdLike,
    Relay,
    cancel_future,
    close_ends,
    closes_in_c,
    coerce,
    complete_all,
    fail_relay,
    forget_closed,
    make_job,
    mark_completer_thread,
    repoker,
    retire,
)

_thread_ids = itertools.count(1)


# _Task.in_c by (src, dst): whether the worker closes each end in C.
_IN_C = (((False, False), (False, True)), ((True, False), (True, True)))


class _Task:
    """A relay on its way through the pool: its future, job and ends."""

    __slots__ = ("relay", "jobs", "ends", "in_c", "close", "core", "live")

    def __init__(
        self,
        relay: Relay[int],
        jobs: tuple[Any, ...],
        ends: tuple[object, object],
        close: bool,
        core: Any,
        live: set[Any],
    ) -> None:
        self.relay = relay
        self.live = live  # the pool's unsettled tasks; this one leaves when settled
        self.jobs = jobs
        self.ends = ends  # what the user passed: ints and objects
        self.close = close
        # Which ends the worker closes in C (decided once, before it runs):
        # one of four shared tuples, none made per relay.
        self.in_c = _IN_C[closes_in_c(ends[0])][closes_in_c(ends[1])] if close else ()
        self.core = core

    def cancel(self) -> bool:
        """Stop the relay: off the queue, or its running copy asked to stop.

        Returns at once; False if the copy had already ended by itself.
        """
        (job,) = self.jobs
        if self.core.unqueue(job):
            self.drop(job)
            return True
        return bool(job.cancel())

    def drop(self, job: Any) -> None:
        """The job was taken off the queue and will never run."""
        job.task = None
        # Its ends close before the future completes, as a finished relay's
        # do: a done-callback or a waiter finds them closed.  Never having
        # reached a worker, they are ours to close.
        self.close_ends()
        cancel_future(self.relay)
        retire(self)

    def close_ends(self) -> BaseException | None:
        """Close every end of a relay that never reached a worker."""
        return close_ends(self.ends) if self.close else None

    def complete(self, job: Any) -> None:
        """Called by the completer, with the GIL, once the job has finished."""
        error: BaseException | None = None
        result: Any = None
        try:
            result = job.result()
        except BaseException as exc:  # noqa: B036 - delivered through the future
            # Its traceback is this completer's frames (and their callers'),
            # nothing the user can use; kept, they would hold this relay.
            error = exc.with_traceback(None)
        if self.close:
            # The worker closed what it could in C; the rest closes here,
            # before completing, so whoever waits on the result finds every
            # end closed.
            rest = []
            for end, closed in zip(self.ends, self.in_c, strict=True):
                if not closed:
                    rest.append(end)
                elif not isinstance(end, int):
                    forget_closed(end)
            close_error = close_ends(rest) if rest else None
            if error is None:
                error = close_error
        relay = self.relay
        if isinstance(error, CancelledError):
            # Relay.cancel() stopped it: a cancelled future, not a failed one.
            cancel_future(relay)
        elif error is not None:
            relay.set_exception(error)
        else:
            relay.set_result(result)
        retire(self)
        # A close error's traceback holds this frame, which holds the error.
        del error


def _completer_main(core: Any, pool_ref: weakref.ref[WorkerPool]) -> None:
    if hasattr(core, "name_this_thread"):
        core.name_this_thread(b"fastpipe-done")
    mark_completer_thread()
    # One GIL acquisition per batch of finished jobs, however many.
    while (batch := core.take_done()) is not None:
        jobs, handles = batch
        if handles:
            _start_workers(core, pool_ref(), handles)
        complete_all(jobs)


def _start_workers(core: Any, pool: WorkerPool | None, handles: list[Any]) -> None:
    """Start the threads the core asked for; a handle whose thread cannot
    start (no thread to spare, or the pool is gone) is given back."""
    for handle in handles:
        try:
            if pool is None:
                raise RuntimeError("the pool is gone")
            pool._start_thread(core.worker_main, (handle,), "worker")
        except Exception:  # noqa: BLE001 - the workers there are go on
            core.abandon(handle)


class WorkerPool:
    """A pool of persistent worker threads that run relays.

    Each worker is a daemon thread named ``fastpipe-worker-N`` (with the
    compiled core it also shows as ``fastpipe-worker`` in ``top -H``,
    ``perf`` and ``gdb``).  A relay runs in a worker while bytes move; one
    that waits (nothing to read, or its sink full) is *parked* in the pool's
    poller and holds no thread, no buffer and no pipe until its fd is ready,
    then resumes in a worker.  Regular files never wait.  A relay goes to an
    idle worker; a new worker is started only when none is idle.  So with
    ``max_workers=None`` the pool grows to the peak number of relays
    *running* at once, however many are parked, and keeps that many workers.

    The pool is a context manager: ``with WorkerPool() as pool:`` calls
    ``shutdown()`` on exit.  It keeps working in a child after
    ``os.fork()``, which starts with no workers.  Workers are daemon
    threads: at interpreter exit they are not joined (a worker may be
    blocked in a copy on a slow device), and the OS reclaims them.

    Args:
        max_workers: the most worker threads at once.  Relays that are ready
            to run past it wait in a queue, in order; parked relays do not
            count.  None (the default) means no limit; a value above
            ``2**31 - 1`` is the same.
        idle_worker_timeout: seconds a worker may sit idle before it exits;
            None (the default) keeps idle workers for the life of the pool.
            The worker that polls for parked relays stays while any are
            parked.

    Raises:
        TypeError: ``max_workers`` is not an int (a ``bool`` is not), or
            ``idle_worker_timeout`` is not a number.
        ValueError: ``max_workers`` is below 1, or ``idle_worker_timeout``
            is not above 0.
    """

    def __init__(
        self, max_workers: int | None = None, idle_worker_timeout: float | None = None
    ) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError("max_workers must be an int or None")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            # The core counts workers in a C int: a bigger limit (10**12
            # meaning "no limit") raised OverflowError.  No machine runs
            # 2**31 threads, so the clamped limit is never reached either.
            max_workers = min(max_workers, 0x7FFFFFFF)
        self._core = _impl.PoolCore(max_workers, idle_worker_timeout)
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        # Its own lock: the completer is started with _lock held.
        self._threads_lock = threading.Lock()
        # Every relay handed out and not yet settled (its task), for
        # shutdown(cancel_relays=True).  A plain set: a task leaves it when
        # its future is settled (retire()), which costs less
        # than a WeakSet's weakref and callback on every relay.
        self._live: set[_Task | _proxy.ProxyTask] = set()
        self._completer: threading.Thread | None = None
        self._shutdown = False
        # A pool dropped without shutdown() still lets its threads go.  Not at
        # interpreter exit, though: the OS reclaims parked threads, and waking
        # them then only has them end while the process exits, racing with
        # whatever else runs at exit (LeakSanitizer's check crashed on it).
        weakref.finalize(self, self._core.shutdown, False).atexit = False
        _live_pools.add(self)

    # -- public API -------------------------------------------------------

    def relay(
        self,
        src: FdLike,
        dst: FdLike,
        *,
        close: bool = True,
        count: int | None = None,
        zerocopy: bool = True,
        idle_timeout: float | None = None,
    ) -> Relay[int]:
        """Copy from ``src`` to ``dst`` in a pool worker; return at once.

        The copy runs until end of file, or until ``count`` bytes, with the
        GIL released; the returned ``Relay`` completes when it ends.
        ``fastpipe.relay()`` runs it in the default pool
        (``default_pool()``), ``WorkerPool.relay()`` in that pool.

        Nothing is lost at the boundary between a Python object and its
        fd: bytes that a buffered reader (``open(path, "rb")``,
        ``sock.makefile("rb")``, ``Popen.stdout``) has already read ahead
        are delivered first, and a buffered writer is flushed before the
        first byte goes to its fd.

        With ``zerocopy=True`` the kernel moves the bytes where the fd pair
        allows: ``copy_file_range`` or ``sendfile`` from a file, ``splice``
        from or into a pipe or a socket (``Relay.method`` says which).  A
        path the kernel refuses hands over to the read/write loop without
        losing or repeating a byte.  Blocking and non-blocking fds both
        work, and their flags are left as they were.

        Args:
            src: what to read until end of file: an int fd, or an object
                with ``fileno()`` in binary mode (a file, a socket, a pipe
                from ``subprocess``).
            dst: where to write: the same kinds of end.
            close: close both ends when the relay ends, whether it
                succeeded, failed or was cancelled, before the future
                completes: objects through their own ``close()``, ints with
                ``os.close``.  False leaves both open.
            count: copy at most this many bytes; None copies to end of
                file.  The rest stays in the source: file offsets advance
                exactly as ``read`` and ``write`` would advance them.
            zerocopy: allow the kernel paths; False forces the read/write
                loop with pooled buffers.
            idle_timeout: fail with ``TimeoutError`` once this many seconds
                pass without a byte moving; None (the default) waits for
                ever, and so does a value above ``10**9``.

        Returns:
            A ``Relay`` whose ``result()`` is the number of bytes copied.
            Every OS error of the copy arrives through it, never from this
            call: ``BrokenPipeError`` (EPIPE, never a SIGPIPE),
            ``ConnectionResetError``, ``OSError`` with ENOSPC from a full
            device, EBADF for a closed fd or one opened the wrong way,
            ``IsADirectoryError`` for a directory source, EINVAL when both
            ends are the same file and the copy would read what it wrote,
            and ``TimeoutError`` for ``idle_timeout``.

        Raises:
            TypeError: an end is neither an int nor an object with
                ``fileno()`` (a text-mode file, ``io.BytesIO``, a ``str``,
                ``None``, a ``bool``), or ``count`` or ``idle_timeout`` is
                not a number.
            ValueError: a negative fd or ``count``, an fd above
                ``2**31 - 1``, a ``count`` above ``2**63 - 1``, an
                ``idle_timeout`` that is not above 0, or a closed file or
                socket.
            RuntimeError: the pool has been shut down: the relay is
                refused before its ends are taken, and they stay open
                whatever ``close`` says.  Or no thread could be started for
                a new worker: nothing has started, and the ends are closed
                as ``close`` says.
        """
        deferred: list[OSError] = []
        src_fd, dst_fd = coerce(src, dst, deferred)
        # The job checks count and idle_timeout, at once, even for a relay
        # that will not run (a stand-in fd then: it is never used).
        job = make_job(
            src, dst, max(src_fd, 0), max(dst_fd, 0), count, bool(zerocopy), idle_timeout
        )
        close = bool(close)
        if deferred:
            self._check_open()
            failed: Relay[int] = Relay()
            return fail_relay(failed, deferred[0], [src, dst] if close else [])
        relay: Relay[int] = Relay()
        task = _Task(relay, (job,), (src, dst), close, self._core, self._live)
        if close:
            job.close_fds(*task.in_c)
        job.task = task
        self._submit(task)
        return relay

    def proxy(
        self,
        a: FdLike | tuple[FdLike, FdLike],
        b: FdLike | tuple[FdLike, FdLike],
        *,
        close: bool = True,
        idle_timeout: float | None = None,
    ) -> Relay[tuple[int, int]]:
        """Copy ``a`` to ``b`` and ``b`` to ``a`` at once.

        ``fastpipe.proxy()`` runs it in the default pool
        (``default_pool()``), ``WorkerPool.proxy()`` in that pool.  Each
        direction runs in a worker while bytes move and parks while it
        waits, so a proxy holds no thread while its connection is idle, and
        even ``max_workers=1`` serves both directions (taking turns).

        When one direction reaches end of file, the side it was writing to
        is half-closed so that its peer sees end of file too, and the other
        direction goes on to its own end of file: a socket gets
        ``shutdown(SHUT_WR)`` (with either ``close``), and a separate write
        end (the writer of a ``(reader, writer)`` pair, such as a pipe) is
        closed when ``close=True``.  An end read and written both ways that
        is not a socket (a tty) cannot be half-closed.  An error in either
        direction stops the other one at once.

        No two directions may read the same stream, or write the same one:
        two workers would each forward part of it, out of order, or
        interleave their writes.  So ``proxy(x, x)``, dup'd fds, an object
        and its own fd, and pairs that share a reader or a writer (such as
        ``proxy((r, w), (r2, w))``) raise ``ValueError`` at once; to echo a
        socket or a tty back to its peer, use ``relay(x, x)``.  Streams are
        compared, not fd numbers: two opens of one pipe or tty are one
        stream, two opens of one regular file are not (each has its own
        offset), when both are read.

        Args:
            a: one side: an end read and written both ways (a socket, an
                int fd, a tty), or a ``(reader, writer)`` pair such as
                ``(proc.stdout, proc.stdin)`` or two pipe fds.
            b: the other side, the same kinds.
            close: close every end once both directions have ended, however
                they ended; an fd shared by both sides is closed once.
                False leaves them open (a pipe's write end too: close it
                yourself when its reader needs an end of file).
            idle_timeout: fail with ``TimeoutError`` once this many seconds
                pass with no byte moving either way; it fires between 1 and
                1.25 times the timeout after the last byte.  A download
                keeps the upload direction idle for as long as it lasts,
                so the clock is shared.  None (the default) waits for ever.

        Returns:
            A ``Relay`` whose ``result()`` is the ``(a_to_b, b_to_a)`` byte
            counts and whose ``bytes_copied`` is their sum.  An OS error in
            either direction (a reset peer, EPIPE, ...) arrives through it,
            the first one if both fail.

        Raises:
            TypeError: an end is neither an int nor an object with
                ``fileno()``, is a text-mode file, or ``idle_timeout`` is
                not a number.
            ValueError: a negative fd, an ``idle_timeout`` that is not
                above 0, a closed file or socket, or two directions on one
                stream (see above).
            RuntimeError: the pool has been shut down: the proxy is
                refused before its ends are taken, and they stay open
                whatever ``close`` says.  Or no thread could be started for
                a new worker: nothing has started, and the ends are closed
                as ``close`` says.
        """
        relay: Relay[tuple[int, int]] = Relay(directions=2)
        deferred: list[OSError] = []
        task = _proxy.build(relay, a, b, close, idle_timeout, self._core, self._live, deferred)
        if not isinstance(task, _proxy.ProxyTask):
            self._check_open()
            # An end's fileno() failed: an OS error, delivered as any other.
            return fail_relay(relay, deferred[0], task)
        self._submit(task)
        if task.idle_timeout is not None:
            _proxy.watchdog.watch(task)
        return relay

    def stats(self) -> dict[str, int]:
        """Return the pool's counts, a snapshot.

        Returns:
            A dict with ``workers`` (worker threads that exist now), ``idle``
            (workers waiting for work; one of them polls for parked relays),
            ``busy`` (workers running a copy), ``queued`` (copies ready to
            run that wait for a worker: under ``max_workers``, or for a
            moment while one is woken or started), ``parked`` (copies
            waiting for their fds, holding no thread) and ``peak`` (the
            most copies that ran at once in this pool).  A proxy counts as
            two copies, one per direction.
        """
        return dict(self._core.stats())

    def shutdown(self, wait: bool = True, *, cancel_relays: bool = False) -> None:
        """Stop accepting relays and let the workers exit.

        Idempotent; ``relay()`` and ``proxy()`` raise ``RuntimeError`` after
        it.  Without ``cancel_relays``, relays already queued or running go
        on to their end.  With it, every one of them is cancelled
        (``Relay.cancel()``): queued ones never start, running ones stop
        within milliseconds, and their ends are closed as ``close`` said.

        Args:
            wait: block until every worker thread has exited, which means
                until every running relay has finished (or stopped, with
                ``cancel_relays``).
            cancel_relays: cancel the relays that are queued or running.
        """
        with self._lock:
            self._shutdown = True
        for job in self._core.shutdown(bool(cancel_relays)):
            # Already off the queue: the task cancels its future (a proxy
            # also stops its other direction) and closes what it owned.
            task = job.task
            assert isinstance(task, (_Task, _proxy.ProxyTask))
            task.drop(job)
        if cancel_relays:
            # Every relay is asked to stop first, then all are waited for at
            # once: a parked one stops in this thread at the ask, and one
            # wait for thousands costs a fraction of a cancel() each.
            stopping: list[Relay[Any]] = []
            for task in list(self._live):
                if not task.relay.done() and task.cancel():
                    repoker.watch(task.jobs)
                    stopping.append(task.relay)
            # In a done-callback (a completion thread) nothing waits: this
            # thread may hold some of these very jobs in its batch.
            if not getattr(_relay._completing, "active", False):
                for relay in stopping:
                    relay._help(None)
                concurrent.futures.wait(stopping)
        if wait:
            # Until a look finds no thread not yet joined: the completer may
            # start a worker up to its own end, and joining the completer
            # means the workers it started are in the set.
            me = threading.current_thread()
            joined: set[threading.Thread] = {me}
            while True:
                with self._threads_lock:
                    threads = [t for t in self._threads if t not in joined]
                if not threads:
                    break
                for thread in threads:
                    thread.join()
                    joined.add(thread)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    # -- a caller's event loop completes the relays -------------------------

    def _ready_fd(self) -> int:
        """Have the calling thread's event loop complete this pool's relays.

        Returns an fd that turns readable when relays have ended; the loop
        then calls ``_complete_ready()``, which settles their futures and
        runs their done-callbacks in its own thread.  A loop that starts
        relays and handles their ends in one thread (``fastpipe forward``)
        so spares each relay a hand-over of the GIL to the completer thread
        and back, which under a stream of short connections costs more than
        the completion itself.  The completer thread still starts the
        worker threads, and takes whatever it finds when it wakes.
        """
        return int(self._core.ready_fd())

    def _complete_ready(self) -> None:
        """Settle every relay that has ended (see ``_ready_fd()``)."""
        complete_all(self._core.take_ready())

    # -- hand-off ---------------------------------------------------------

    def _start_thread(self, target: Any, args: tuple[Any, ...], kind: str) -> threading.Thread:
        thread = threading.Thread(
            target=target, args=args, name=f"fastpipe-{kind}-{next(_thread_ids)}", daemon=True
        )
        thread.start()
        # Only once started: shutdown(wait=True) joins what it finds here.
        with self._threads_lock:
            self._threads.add(thread)
        return thread

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot start a relay after shutdown")

    def _submit(self, task: _Task | _proxy.ProxyTask) -> None:
        task.relay._attach(task)
        self._live.add(task)
        try:
            self._hand_out(task)
        except BaseException:
            self._live.discard(task)
            raise

    def _hand_out(self, task: _Task | _proxy.ProxyTask) -> None:
        if self._completer is None:
            with self._lock:
                self._check_open()
                if self._completer is None:
                    self._completer = self._start_thread(
                        _completer_main, (self._core, weakref.ref(self)), "completer"
                    )
        # Raises RuntimeError after shutdown, before anything is handed out.
        handed: tuple[Any, ...]
        if isinstance(task, _proxy.ProxyTask):
            # Both directions or neither: no memory for one must not leave
            # the other running alone.
            handed = self._core.submit_pair(*task.jobs)
        else:
            one = self._core.submit(task.jobs[0])
            if one is True or one is False:
                return  # the common case: an idle worker took it, or queued
            handed = (one,)
        # True: an idle worker took it; False: queued.  The rest are new
        # workers (their C half) whose threads start here.
        try:
            for handle in handed:
                if handle is not True and handle is not False and handle is not None:
                    self._start_thread(self._core.worker_main, (handle,), "worker")
        except BaseException:
            # No thread to spare (RuntimeError), or Ctrl-C in Thread.start()'s
            # wait, which may come after the thread started.  relay() raising
            # means no relay: undo it all, whichever threads got going.
            self._abandon(task, handed)
            raise

    def _abandon(self, task: _Task | _proxy.ProxyTask, handed: tuple[Any, ...]) -> None:
        """A hand-out failed part-way: fail or stop everything it started.

        A worker whose thread never ran is undone (``abandon`` tells), and
        the job it carried dropped: ``drop`` cancels its future and closes
        its ends as ``close=`` says; for a proxy it also stops the other
        direction.  What did reach a running thread, or waits on the queue
        (a proxy's pair behind a spare that never started), is cancelled
        like ``Relay.cancel()`` does, without waiting.
        """
        for handle in handed:
            if handle is True or handle is False or handle is None:
                continue
            job = self._core.abandon(handle)
            if job is not None:
                owner = job.task
                assert isinstance(owner, (_Task, _proxy.ProxyTask))
                owner.drop(job)
        if not task.relay.done() and task.cancel():
            repoker.watch(task.jobs)

    def _reset_after_fork(self) -> None:
        # The child has none of the parent's threads: start empty.  Relays
        # that were running in the parent go on there, not here: their jobs
        # are orphaned, so that a cancel() here touches none of the parent's
        # pool state (its poller slots, its worker threads).
        for task in self._live:
            for job in task.jobs:
                job.orphan()
        self._core.reset_after_fork()
        self._lock = threading.Lock()
        self._threads = weakref.WeakSet()
        self._threads_lock = threading.Lock()
        self._live = set()
        self._completer = None


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_default_pool: WorkerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> WorkerPool:
    """Return the process-wide pool that ``fastpipe.relay()`` and ``proxy()`` use.

    It is a ``WorkerPool()`` with no limits, created on first use and never
    shut down.

    Returns:
        The default pool.
    """
    global _default_pool
    pool = _default_pool
    if pool is None:
        with _default_lock:
            pool = _default_pool
            if pool is None:
                pool = _default_pool = WorkerPool()
    return pool


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for pool in list(_live_pools):
        pool._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
