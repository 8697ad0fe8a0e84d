"""WorkerPool: persistent worker threads, each parked until handed a relay.

The shape is CPython's ``concurrent/futures/thread.py`` with one change that
matters here: there is no shared work queue.  Each worker parks on its own
lock, and ``relay()`` hands a job straight to an idle worker (the most
recently parked one, whose stack is still warm) or starts a new worker when
none is idle.  So the pool grows to the peak number of simultaneous relays
and keeps them, as in the Go design this follows, unless ``max_workers`` or
``idle_worker_timeout`` says otherwise.

Workers are daemon threads.  A worker spends its life blocked in ``poll`` or
a copy syscall with the GIL released, on fds the application owns; joining
them at interpreter exit would hang on any relay whose peer is idle, which is
the normal state of a proxy.  The OS reclaims their fds and buffers at exit.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import deque
from typing import Any

from fastpipe._relay import FdLike, Relay, RelayJob, close_ends, coerce

_worker_ids = itertools.count(1)


class _Task:
    """A relay on its way through the pool: the future, its jobs, its ends."""

    __slots__ = ("relay", "jobs", "close")

    def __init__(self, relay: Relay, jobs: tuple[RelayJob, ...], close: bool) -> None:
        self.relay = relay
        self.jobs = jobs
        self.close = close

    def ends(self) -> list[object]:
        return [end for job in self.jobs for end in (job.src, job.dst)]

    def cancelled_before_start(self) -> None:
        if self.close:
            close_ends(self.ends())

    def run(self) -> None:
        relay = self.relay
        if not relay.set_running_or_notify_cancel():
            self.cancelled_before_start()
            return
        result: Any = None
        error: BaseException | None = None
        try:
            result = self.jobs[0].run()
        except BaseException as exc:  # noqa: B036 - delivered through the future
            error = exc
        if self.close:
            # Close before completing, so that whoever waits on the result
            # finds the ends already closed.
            close_error = close_ends(self.ends())
            if error is None:
                error = close_error
        if error is not None:
            relay.set_exception(error)
            # Break the cycle exception -> traceback -> this frame -> error.
            del error
        else:
            relay.set_result(result)


class _Worker:
    __slots__ = ("wake", "task", "thread", "retired")

    def __init__(self) -> None:
        # Held while parked: the hand-off releases it.  A Lock may be released
        # by a thread other than the one that acquired it.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.task: _Task | None = None
        self.thread: threading.Thread | None = None
        self.retired = False  # set under the pool's lock: exit, do not park


def _worker_main(
    pool_ref: weakref.ReferenceType[WorkerPool], worker: _Worker, idle_timeout: float
) -> None:
    # Only a weak reference to the pool, as in thread.py: a pool nobody
    # holds can be collected, and its idle workers exit on their sentinel.
    while True:
        if not worker.wake.acquire(timeout=idle_timeout):
            pool = pool_ref()
            if pool is None or pool._retire(worker):
                return
            del pool
            continue  # a task was handed over as we timed out
        task = worker.task
        worker.task = None
        if task is None:
            return  # the shutdown sentinel
        while task is not None:
            task.run()
            del task
            pool = pool_ref()
            if pool is None:
                return
            task = pool._next_task(worker)
            del pool
        if worker.retired:
            return


class WorkerPool:
    """A pool of persistent worker threads that run relays.

    Args:
        max_workers: the most workers at once; further relays wait in order.
            None (the default) grows the pool to the peak number of
            simultaneous relays and keeps it there.
        idle_worker_timeout: seconds a worker may sit idle before it exits;
            None keeps idle workers for the life of the pool.

    Raises:
        TypeError, ValueError: for a bad ``max_workers`` or
            ``idle_worker_timeout``.
    """

    def __init__(
        self, max_workers: int | None = None, idle_worker_timeout: float | None = None
    ) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError("max_workers must be an int or None")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if idle_worker_timeout is not None:
            if isinstance(idle_worker_timeout, bool) or not isinstance(
                idle_worker_timeout, (int, float)
            ):
                raise TypeError("idle_worker_timeout must be a number or None")
            if not idle_worker_timeout > 0:
                raise ValueError("idle_worker_timeout must be greater than 0")
        self._max_workers = max_workers
        self._idle_timeout = -1.0 if idle_worker_timeout is None else float(idle_worker_timeout)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._queue: deque[_Task] = deque()
        self._busy = 0
        self._peak = 0
        self._shutdown = False
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
    ) -> Relay:
        """Copy from ``src`` to ``dst`` in a worker; return its ``Relay``.

        Args:
            src: an int fd, or an object with ``fileno()`` (a binary file, a
                socket, a pipe from subprocess), to read until end of file.
            dst: the same kinds of object, to write to.
            close: close both ends when the relay ends, however it ends:
                objects through their ``close()``, ints with ``os.close``.
            count: copy at most this many bytes; None copies to end of file.
            zerocopy: allow kernel copy paths; False forces read/write.
            idle_timeout: fail with ``TimeoutError`` once this many seconds
                pass without a byte moving; None waits for ever.

        Returns:
            A ``Relay`` future whose result is the number of bytes copied.

        Raises:
            TypeError: an end is neither an int nor has ``fileno()``, is a
                text-mode file, or ``count`` or ``idle_timeout`` is not a
                number.
            ValueError: a negative fd, count or idle_timeout, or a closed
                object.
            RuntimeError: the pool has been shut down.
        """
        src_fd, dst_fd = coerce(src, dst, count)
        relay = Relay()
        job = RelayJob(src, dst, src_fd, dst_fd, count, bool(zerocopy), idle_timeout)
        relay._jobs = (job,)
        self._submit(_Task(relay, (job,), bool(close)))
        return relay

    def stats(self) -> dict[str, int]:
        """Return ``workers``, ``idle``, ``busy``, ``queued`` and ``peak``.

        ``peak`` is the most relays that ran at once in this pool.
        """
        with self._lock:
            return {
                "workers": len(self._workers),
                "idle": len(self._idle),
                "busy": self._busy,
                "queued": len(self._queue),
                "peak": self._peak,
            }

    def shutdown(self, wait: bool = True, *, cancel_relays: bool = False) -> None:
        """Stop accepting relays and let the workers exit.

        Idempotent.  Relays already queued still run unless ``cancel_relays``
        is true, in which case they are cancelled (and their ends closed as
        ``close=`` said).

        Args:
            wait: block until every worker thread has exited, which means
                until every running relay has finished.
            cancel_relays: cancel relays that have not started yet.
        """
        with self._lock:
            self._shutdown = True
            cancelled: list[_Task] = []
            if cancel_relays:
                cancelled = list(self._queue)
                self._queue.clear()
            idle = self._idle
            self._idle = []
            for worker in idle:
                self._workers.discard(worker)
            threads = [w.thread for w in self._workers if w.thread is not None]
            threads += [w.thread for w in idle if w.thread is not None]
        for task in cancelled:
            if task.relay.cancel():
                task.cancelled_before_start()
        for worker in idle:
            worker.task = None
            worker.wake.release()  # the None task is the exit sentinel
        if wait:
            me = threading.current_thread()
            for thread in threads:
                if thread is not me:
                    thread.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    # -- hand-off and completion -----------------------------------------

    def _submit(self, task: _Task) -> None:
        start: _Worker | None = None
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot start a relay after shutdown")
            if self._idle:
                worker: _Worker | None = self._idle.pop()
            elif self._max_workers is None or len(self._workers) < self._max_workers:
                worker = start = _Worker()
                self._workers.add(worker)
            else:
                worker = None
                self._queue.append(task)
            if worker is not None:
                self._busy += 1
                if self._busy > self._peak:
                    self._peak = self._busy
        if worker is None:
            return
        worker.task = task
        if start is not None:
            thread = threading.Thread(
                target=_worker_main,
                args=(weakref.ref(self), start, self._idle_timeout),
                name=f"fastpipe-worker-{next(_worker_ids)}",
                daemon=True,
            )
            start.thread = thread
            thread.start()
        worker.wake.release()

    def _next_task(self, worker: _Worker) -> _Task | None:
        """Called by a worker after a task: its next task, or None to park."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            self._busy -= 1
            if self._shutdown:
                self._workers.discard(worker)
                worker.retired = True
                return None
            self._idle.append(worker)
            return None

    def _retire(self, worker: _Worker) -> bool:
        """An idle worker timed out: leave the pool unless just handed work."""
        with self._lock:
            try:
                self._idle.remove(worker)
            except ValueError:
                return False
            self._workers.discard(worker)
            return True

    def _reset_after_fork(self) -> None:
        # The child has none of the parent's threads: start empty.  Relays
        # that were running in the parent go on there, not here.
        self._lock = threading.Lock()
        self._idle = []
        self._workers = set()
        self._queue.clear()
        self._busy = 0


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_default_pool: WorkerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> WorkerPool:
    """The process-wide pool used by ``fastpipe.relay``; created on first use."""
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
