"""The Relay future, and turning user objects into fds and back.

Everything here runs with the GIL: argument checks in the caller's thread,
and the few Python steps a worker takes around the GIL-free copy (flushing a
buffered writer, draining a buffered reader's read-ahead, closing the ends,
completing the future).
"""

from __future__ import annotations

import _socket
import io
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import CancelledError, Future, InvalidStateError, _base
from typing import Any, Protocol, TypeVar, runtime_checkable

from fastpipe import _impl
from fastpipe._checks import check_fd


@runtime_checkable
class HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = int | HasFileno
"""An end of a relay: an int file descriptor, or an object whose ``fileno()``
returns one (a binary file, a socket, a pipe from ``subprocess``)."""

# What a Relay's result() returns: int for relay(), tuple[int, int] for proxy().
_T = TypeVar("_T")

# How often the re-poker asks a copy that has not stopped yet again.
_CANCEL_REPOKE = 0.005

# How long a main thread waiting in result() waits between signal checks.
_MAIN_THREAD_SLICE = 0.05


class Relay(Future[_T]):
    """A relay under way or finished: a ``concurrent.futures.Future``.

    ``relay()`` returns a ``Relay[int]``, whose ``result()`` is the number of
    bytes copied; ``proxy()`` returns a ``Relay[tuple[int, int]]``, whose
    ``result()`` is the ``(a_to_b, b_to_a)`` byte counts.  Either raises the
    relay's ``OSError`` or ``TimeoutError`` instead when it failed.

    Everything a ``Future`` does works: ``result(timeout)``, ``exception()``,
    ``add_done_callback(fn)``, ``concurrent.futures.wait()`` and
    ``as_completed()``.  ``await relay`` works inside asyncio without
    blocking the event loop: the result arrives through
    ``call_soon_threadsafe``, and cancelling the awaiting task (or
    ``asyncio.wait_for`` timing out) cancels the relay too.  Done-callbacks
    may run in the pool's completion thread.

    A thread that waits in ``result()`` completes finished relays itself,
    rather than waiting for the completion thread to take the GIL; in the
    main thread that wait comes back every 50 ms, so Ctrl-C still works.
    """

    # The future stays PENDING while a worker copies and moves straight to
    # FINISHED: the worker never needs the GIL to mark it RUNNING.  So
    # running() is answered from the pool's own state, and cancel() (which
    # can stop a running copy) moves it to CANCELLED itself.
    #
    # A parked relay is mostly this object, so it holds only slots: no
    # Condition, no lists.  Every Relay's state changes under one module
    # lock, _state_lock; a Condition over that lock is made only for a
    # relay that a thread waits on (result(), exception(), cancel()), and
    # the waiters and callbacks lists only once something is put in them.
    # Future's own methods and concurrent.futures.wait()/as_completed()
    # still find _condition, _waiters and _done_callbacks: properties that
    # make them on first use, under the lock.
    __slots__ = (
        "_state",
        "_result",
        "_exception",
        "_cond",
        "_waiter_list",
        "_callbacks",
        "_task",
        "_jobs",
        "_no_bytes",
    )

    _state: str
    _result: _T | None
    _exception: BaseException | None

    def __init__(self, directions: int = 1) -> None:
        # Not Future.__init__: it makes the Condition and the two lists.
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._cond: threading.Condition | None = None
        self._waiter_list: list[Any] | None = None
        self._callbacks: list[Callable[[Future[_T]], object]] | None = None
        # The task while the relay is pending (for cancel() and result()'s
        # help); its jobs for good (for the byte counts and the method).
        self._task: Any = None
        self._jobs: tuple[Any, ...] = ()
        # bytes_each_way's zeros for a relay that never got a job (shared).
        self._no_bytes = _ZEROS.get(directions) or (0,) * directions

    # -- what Future's code and concurrent.futures.wait() reach for --------

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _state_lock:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition(_state_lock)
        return cond

    @_condition.setter
    def _condition(self, value: threading.Condition) -> None:
        self._cond = value

    @property
    def _waiters(self) -> list[Any]:
        waiters = self._waiter_list
        if waiters is None:
            with _state_lock:
                waiters = self._waiter_list
                if waiters is None:
                    waiters = self._waiter_list = []
        return waiters

    @_waiters.setter
    def _waiters(self, value: list[Any]) -> None:
        self._waiter_list = value

    @property
    def _done_callbacks(self) -> list[Callable[[Future[_T]], object]]:
        callbacks = self._callbacks
        if callbacks is None:
            with _state_lock:
                callbacks = self._callbacks
                if callbacks is None:
                    callbacks = self._callbacks = []
        return callbacks

    def _attach(self, task: Any) -> None:
        self._jobs = task.jobs
        self._task = task

    @property
    def bytes_copied(self) -> int:
        """Bytes written so far, both directions summed for a proxy.

        Live: readable from any thread while the relay runs, and exact once
        it is done.
        """
        return sum(job.bytes_copied for job in self._jobs)

    @property
    def bytes_each_way(self) -> tuple[int, ...]:
        """Bytes written so far per direction: ``(a_to_b, b_to_a)`` for a proxy.

        ``(n,)`` for a relay.  Unlike ``result()`` it is there however the
        relay ended (failed, timed out, cancelled), which is what a log line
        about a proxied connection needs; exact once the relay is done.
        """
        jobs = self._jobs
        if not jobs:
            return self._no_bytes
        return tuple(job.bytes_copied for job in jobs)

    @property
    def method(self) -> str | None:
        """The copy path in use, or None until a path has taken bytes from
        the source.

        One of ``"copy_file_range"``, ``"sendfile"``, ``"splice"`` or
        ``"readwrite"``; for a proxy, the path of its ``a`` to ``b``
        direction.  A path is named only once it moves bytes (or reads the
        end of file): one that the fd pair refuses is never reported.
        """
        jobs = self._jobs
        if not jobs:
            return None
        method = jobs[0].method
        return None if method is None else str(method)

    def done(self) -> bool:
        # One read of one slot: atomic under the GIL, no lock needed.
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def result(self, timeout: float | None = None) -> _T:
        """Wait for the relay to end and return its result.

        Args:
            timeout: the most seconds to wait; None waits for as long as
                the relay runs.

        Returns:
            The number of bytes copied for a relay; the ``(a_to_b,
            b_to_a)`` byte counts for a proxy.

        Raises:
            OSError: the copy failed, with the errno of the failing
                syscall and its subclass (``BrokenPipeError``,
                ``ConnectionResetError``, ...).
            TimeoutError: the relay failed because no byte moved for
                ``idle_timeout`` seconds (``errno`` is ETIMEDOUT); or
                ``timeout`` passed first (``errno`` is None, and the relay
                goes on).
            concurrent.futures.CancelledError: the relay was cancelled.
        """
        try:
            if self._state not in _DONE:
                self._wait(self._help(timeout), _DONE)
            state = self._state
            if state == _FINISHED:
                if self._exception is not None:
                    raise self._exception
                return self._result  # type: ignore[return-value]
            if state in _CANCELLED:
                raise CancelledError()
            raise TimeoutError()
        finally:
            # As Future.result(): the error raised holds this frame in its
            # traceback, which must not hold the future that holds the error.
            del self

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state not in _DONE:
            self._wait(self._help(timeout), _DONE)
        state = self._state
        if state == _FINISHED:
            return self._exception
        if state in _CANCELLED:
            raise CancelledError()
        raise TimeoutError()

    def _wait(self, timeout: float | None, states: frozenset[str]) -> None:
        """Block until the state is one of ``states``, or ``timeout`` passes.

        The Condition is made here, the first time a thread waits.  No
        wake-up is lost: the state is looked at with the lock held, and a
        settling thread changes it and looks for the Condition under that
        same lock, so either this thread sees the new state or the settler
        sees the Condition and notifies it.
        """
        cond = self._condition
        with cond:
            cond.wait_for(lambda: self._state in states, timeout)

    def _help(self, timeout: float | None) -> float | None:
        """Before blocking on the future, finish pool jobs in this thread.

        The waiting thread completes the relays that end meanwhile (its own
        and any other), instead of waiting for the completer thread to take
        the GIL and hand the result back.  Returns the timeout left.
        """
        task = self._task
        if task is None or self.done():
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        main = threading.current_thread() is threading.main_thread()
        while not self.done():
            pending = [job for job in task.jobs if not job.finished]
            if not pending:
                # Finished: in the done list, or taken by another thread that
                # is completing it now.  What is still in the list is taken
                # here: an event loop that completes its own relays
                # (WorkerPool._ready_fd) may be this very thread.
                complete_all(task.core.help_done(task.jobs[0], 0.0))
                break
            left = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if main and not 0 <= left < _MAIN_THREAD_SLICE:
                # Slices, so that Ctrl-C and other signal handlers run.
                left = _MAIN_THREAD_SLICE
            complete_all(task.core.help_done(pending[0], left))
            if deadline is not None and time.monotonic() >= deadline:
                break
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def set_result(self, result: _T) -> None:
        """``Future.set_result``: the completer calls it for every relay,
        with the GIL held, so it does only what is needed when no thread
        waits and no callback is registered.

        Same order as Future's: the state changes and waiters of ``wait()``
        and threads in ``result()`` are woken under the lock, then the
        callbacks run outside it.
        """
        with _state_lock:
            if self._state in _SETTLED:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = _FINISHED
            waiters = self._waiter_list
            if waiters:
                for waiter in waiters:
                    waiter.add_result(self)
            if self._cond is not None:
                self._cond.notify_all()
        if self._callbacks:
            self._invoke_callbacks()

    def set_exception(self, exception: BaseException | None) -> None:
        """``Future.set_exception``, in the order ``set_result`` keeps."""
        with _state_lock:
            if self._state in _SETTLED:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._exception = exception
            self._state = _FINISHED
            waiters = self._waiter_list
            if waiters:
                for waiter in waiters:
                    waiter.add_exception(self)
            if self._cond is not None:
                self._cond.notify_all()
        if self._callbacks:
            self._invoke_callbacks()

    def add_done_callback(self, fn: Callable[[Future[_T]], object]) -> None:
        with _state_lock:
            if self._state not in _DONE:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            _base.LOGGER.exception("exception calling callback for %r", self)

    def _invoke_callbacks(self) -> None:
        # After the state is final: nothing appends to the list any more.
        for callback in self._callbacks or ():
            try:
                callback(self)
            except Exception:
                _base.LOGGER.exception("exception calling callback for %r", self)

    def _cancel_pending(self) -> bool:
        """Move a PENDING relay to cancelled, as its waiters expect it.

        What ``Future.cancel()`` and then ``set_running_or_notify_cancel()``
        do, in their order: CANCELLED (``done()``, and threads in
        ``result()`` woken), the callbacks, then CANCELLED_AND_NOTIFIED,
        which ``concurrent.futures.wait()`` and ``as_completed()`` count as
        done (an executor's worker does that step when it picks the item
        up; no Python worker picks a relay up, so it is done here).  So a
        ``cancel()`` that waits for the latter finds the callbacks run.
        False if the relay had ended otherwise; True if it is cancelled.
        """
        with _state_lock:
            state = self._state
            if state != _PENDING:
                return state in _CANCELLED
            self._state = _base.CANCELLED
            if self._cond is not None:
                self._cond.notify_all()
        if self._callbacks:
            self._invoke_callbacks()
        self.set_running_or_notify_cancel()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        with _state_lock:
            state = self._state
            if state == _base.CANCELLED:
                self._state = _base.CANCELLED_AND_NOTIFIED
                waiters = self._waiter_list
                if waiters:
                    for waiter in waiters:
                        waiter.add_cancelled(self)
                if self._cond is not None:
                    self._cond.notify_all()
                return False
            if state == _PENDING:
                self._state = _base.RUNNING
                return True
        _base.LOGGER.critical("Future %s in unexpected state: %s", id(self), state)
        raise RuntimeError("Future in unexpected state")

    def running(self) -> bool:
        """True once a worker has started the copy, until it ends.

        A relay still waiting in the queue for a worker is not running.
        """
        return any(job.started for job in self._jobs) and not self.done()

    def cancel(self) -> bool:
        """Cancel the relay, whether it is still queued or already copying.

        A running copy is stopped within milliseconds, even when it is
        blocked on an idle fd or a stalled sink: the compiled core knocks
        its worker out of the syscall with a signal, the pure-Python twin
        polls an eventfd beside the data fds; nothing is ever closed under
        a blocked thread.  ``cancel()`` returns once the copy has stopped:
        ``bytes_copied`` is then exact, the ends are closed as ``close``
        said, done-callbacks have run and ``result()`` raises
        ``concurrent.futures.CancelledError``.  Called from a done-callback
        (a completion thread), it does not wait: the relay is cancelled
        just after.

        Returns:
            True if the relay is (or is about to be) cancelled; False if it
            had already ended by itself, successfully or not.
        """
        if self.done():
            return self.cancelled()
        task = self._task
        if task is None:
            return cancel_future(self)
        if not task.cancel():
            return False  # it ended by itself; its completion is on the way
        # The core's wake-up signal can land just before its worker enters
        # a syscall: the re-poker asks again until the copy has ended.
        repoker.watch(task.jobs)
        if getattr(_completing, "active", False):
            # This thread may hold the very job in its batch: waiting for
            # it here would wait for ourselves.
            return True
        self._help(None)
        # Until CANCELLED_AND_NOTIFIED or FINISHED, as wait() would: the
        # done-callbacks have run by then.
        self._wait(None, _NOTIFIED)
        return self.cancelled()

    def __repr__(self) -> str:
        # Future's, without its lock (and so without making a Condition).
        state = self._state
        head = f"<{type(self).__name__} at {id(self):#x} state={_DESCRIPTION[state]}"
        if state == _FINISHED:
            if self._exception is not None:
                return f"{head} raised {type(self._exception).__name__}>"
            return f"{head} returned {type(self._result).__name__}>"
        return head + ">"

    def __await__(self) -> Generator[Any, None, _T]:
        """``await relay`` inside asyncio: the result, without blocking the loop."""
        # wrap_future() completes an asyncio future from the completer thread
        # with call_soon_threadsafe, so the event loop never blocks on us.
        import asyncio

        return asyncio.wrap_future(self).__await__()


# Every Relay's state, waiters and callbacks change under this lock; the
# Condition of a relay that a thread waits on is made over it.  Reentrant:
# concurrent.futures.wait() acquires each of its futures' _condition in
# turn, which for relays is this one lock again and again.
_state_lock = threading.RLock()

_PENDING = _base.PENDING
_FINISHED = _base.FINISHED
_CANCELLED = frozenset((_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED))
_DONE = frozenset((_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED, _base.FINISHED))
# Settled: set_result()/set_exception() raise InvalidStateError.
_SETTLED = _DONE
# What wait() and as_completed() count as done.
_NOTIFIED = frozenset((_base.CANCELLED_AND_NOTIFIED, _base.FINISHED))
_DESCRIPTION = _base._STATE_TO_DESCRIPTION_MAP
# Shared zeros for Relay.bytes_each_way: no tuple made per relay.
_ZEROS = {1: (0,), 2: (0, 0)}


class _Repoker:
    """Asks stopping jobs to stop again every few milliseconds until they have.

    ``CopyJob.cancel()`` knocks a worker out of a blocking syscall with a
    signal, which can land just before the worker enters the syscall and is
    then lost (OpenJDK re-signals a thread blocked in I/O the same way).
    Every stop comes here: ``Relay.cancel()``, a proxy stopping its other
    direction after an error or an idle timeout, and a cancel() from a
    done-callback, which nobody waits for.  One daemon thread, started on
    demand, exits once every job it watches has ended.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[Any] = []
        self._thread: threading.Thread | None = None

    def watch(self, jobs: tuple[Any, ...] | list[Any]) -> None:
        """Ask these jobs again until they have ended.

        Only a started job can sleep through its signal; one that has not
        started sees the cancel flag first thing, and one taken off the
        queue never starts (nor ends: it must not be watched for ever).
        """
        with self._lock:
            self._jobs.extend(job for job in jobs if job.started and not job.finished)
            if self._thread is None and self._jobs:
                thread = threading.Thread(target=self._main, name="fastpipe-repoke", daemon=True)
                try:
                    thread.start()
                except RuntimeError:
                    # No thread to spare: the one cancel() already sent
                    # still stops the job unless it raced the syscall.
                    self._jobs.clear()
                    return
                self._thread = thread

    def _main(self) -> None:
        while True:
            time.sleep(_CANCEL_REPOKE)
            with self._lock:
                self._jobs = [job for job in self._jobs if not job.finished]
                if not self._jobs:
                    self._thread = None
                    return
                jobs = list(self._jobs)
            for job in jobs:
                job.cancel()


repoker = _Repoker()


def _after_fork_in_child() -> None:
    # The parent's re-poker thread does not exist here, nor do its jobs' workers.
    repoker._reset()
    # Another thread may have held the relays' lock at the fork: it would
    # never be released here.  The same lock object is reset, not replaced,
    # because the Conditions made before the fork hold it.
    _state_lock._at_fork_reinit()  # type: ignore[attr-defined]


os.register_at_fork(after_in_child=_after_fork_in_child)


def cancel_future(relay: Relay[Any]) -> bool:
    """Move a PENDING relay to cancelled, as its waiters expect it: see
    ``Relay._cancel_pending``."""
    return relay._cancel_pending()


# Marks a thread that completes relays (the completer, or a thread helping in
# result()): done-callbacks run there, and a cancel() from one must not wait.
_completing = threading.local()


def mark_completer_thread() -> None:
    _completing.active = True


def complete_all(jobs: list[Any]) -> None:
    """Complete finished pool jobs: in the completer, or a thread in result()."""
    if not jobs:
        return
    if getattr(_completing, "active", False):
        _complete_each(jobs)
        return
    _completing.active = True
    try:
        _complete_each(jobs)
    finally:
        _completing.active = False


def _complete_each(jobs: list[Any]) -> None:
    for job in jobs:
        task = job.task
        # job -> task -> jobs -> job is a cycle; the job is done with it.
        job.task = None
        try:
            task.complete(job)
        except BaseException as exc:  # noqa: B036 - a relay must never hang
            # Only a bug gets here (closing and completing do not raise on
            # their own): fail the relay rather than lose the thread that
            # completes every other relay.
            relay = task.relay
            if not relay.done():
                relay.set_exception(exc)
            retire(task)


def retire(task: Any) -> None:
    """The task's future is settled: unlink the task from it and from the
    pool's live set (each task calls this where it settles its future).

    relay -> task -> relay and job -> task -> job are reference cycles: left
    in place, each relay's future, task, job and ends (about 19 objects)
    waited for the cyclic garbage collector, whose passes cost the small
    relays a quarter of their time.  A finished relay keeps its jobs only.
    """
    task.relay._task = None
    task.live.discard(task)
    for job in task.jobs:
        # The prologue's closure holds the ends' objects (and their buffers):
        # a finished relay, which keeps its jobs, must not keep those too.
        job.prologue = None


def fd_of(obj: object, name: str, deferred: list[OSError] | None = None) -> int:
    """Return the fd behind obj, raising TypeError/ValueError at once.

    An OSError from ``obj.fileno()`` (``SpooledTemporaryFile`` rolling over
    to a full disk, say) is an OS error like any other: with ``deferred``
    it is appended there and -1 returned, for the caller to fail the relay's
    future with it once every other argument has been checked.
    """
    if type(obj) is socket.socket:  # the common case, checked first
        fd = obj.fileno()
        if fd < 0:
            raise ValueError(f"{name} is a closed socket")
        return fd
    if isinstance(obj, bool):
        raise TypeError(f"{name} must be an int fd or an object with fileno(), not bool")
    if isinstance(obj, int):
        return check_fd(obj, name)
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
    except OSError as exc:
        if deferred is None:
            raise
        deferred.append(exc)
        return -1
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{name}.fileno() returned {type(fd).__name__}, not int")
    if fd < 0:
        # A closed socket reports -1.
        raise ValueError(f"{name} is closed (fileno() returned {fd})")
    # Checked here, not only by the core: proxy() calls os.fstat() on the
    # fd before any core sees it, which raised OverflowError.
    return check_fd(fd, name)


def _take_readahead(obj: Any, src_fd: int, limit: int | None) -> bytes:
    """Take the bytes a buffered reader (make_job chose it) holds past its fd.

    Exactly the bytes the object holds, and no more: the rest of the source
    is the core's to copy, by its kernel path where the fd pair has one.

    * Over a regular file or block device the object knows its position
      (``tell()``) and the fd knows its own: the difference is what it has
      read ahead.  That many bytes come out of its buffer with ``read1()``,
      which never reads the fd while it holds as many as asked for.  An
      object that holds nothing is not asked at all.  A ``BufferedRandom``
      is flushed first, which writes its pending bytes and moves the fd back
      to the object's position (it drops its read-ahead), so it holds
      nothing left to take.
    * Over a pipe, socket or tty the object cannot say how much it holds
      without reading: ``peek()`` returns its whole buffer, and reads the fd
      (once, at most the object's own buffer size, into its own buffer) only
      when that is empty.  That read may only take what is already there:
      it is made only when poll says the fd is ready, or with O_NONBLOCK set
      for the duration of that one call (and restored).  ``read1()`` then
      takes the peeked bytes out of the buffer, up to ``count``, so that
      anything left stays the object's.  A socket with a timeout polls
      before it reads, whatever its fd's flag: its timeout is 0 for that
      call instead.
    """
    if limit == 0:
        return b""
    held = _seekable_readahead(obj, src_fd)
    if held is not None:
        if held <= 0:
            return b""
        return bytes(obj.read1(held if limit is None else min(held, limit)))
    sock = _timed_socket(obj)
    if sock is not None:
        timeout = sock.gettimeout()
        # Its fd is O_NONBLOCK already (any socket with a timeout has it):
        # neither call changes the fd's flags.
        sock.settimeout(0.0)
        try:
            return _take_held(obj, limit)
        finally:
            sock.settimeout(timeout)
    if _impl.fd_ready(src_fd):
        return _take_held(obj, limit)
    was_blocking = os.get_blocking(src_fd)
    if was_blocking:
        os.set_blocking(src_fd, False)
    try:
        return _take_held(obj, limit)
    except BlockingIOError:
        return b""
    finally:
        if was_blocking:
            os.set_blocking(src_fd, True)


def _seekable_readahead(obj: Any, src_fd: int) -> int | None:
    """How many bytes a buffered reader over a file holds past its fd's
    offset; None where the object and the fd cannot tell (not a file, or a
    reader whose ``tell()`` may count something else, as a decompressor's
    does)."""
    if not isinstance(obj, (io.BufferedReader, io.BufferedRandom)):
        return None
    try:
        mode = os.fstat(src_fd).st_mode
    except OSError:
        return None  # the copy's first syscall reports it
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        return None
    try:
        if isinstance(obj, io.BufferedRandom):
            obj.flush()
        return os.lseek(src_fd, 0, os.SEEK_CUR) - int(obj.tell())
    except (OSError, ValueError):
        return None


def _timed_socket(obj: Any) -> socket.socket | None:
    """The socket under a ``makefile()`` reader, if it has a timeout."""
    raw = getattr(obj, "raw", None)
    if not isinstance(raw, socket.SocketIO):
        return None
    # SocketIO's reference to its socket is the only way to it.
    sock = getattr(raw, "_sock", None)
    if isinstance(sock, socket.socket) and sock.gettimeout():
        return sock
    return None


def _take_held(obj: Any, limit: int | None) -> bytes:
    """What a buffered reader over a pipe, socket or tty holds, up to limit."""
    peek = getattr(obj, "peek", None)
    if callable(peek):
        n = len(peek())
        if limit is not None:
            n = min(n, limit)
        return bytes(obj.read1(n) or b"") if n else b""
    # A BufferedIOBase without peek(): one read1() of a default buffer's
    # size at most, which a well-behaved one serves from its buffer alone
    # when it holds anything.
    n = io.DEFAULT_BUFFER_SIZE if limit is None else min(limit, io.DEFAULT_BUFFER_SIZE)
    return bytes(obj.read1(n) or b"")


def make_job(
    src: object,
    dst: object,
    src_fd: int,
    dst_fd: int,
    count: int | None,
    zerocopy: bool,
    idle_timeout: float | None,
) -> Any:
    """Build the core's CopyJob for one direction of a relay.

    A worker only takes the GIL before copying when an end is a buffered
    Python object: a writer to flush, or a reader whose read-ahead must go
    first.  Plain fds, sockets and raw files copy without it.
    """
    # CopyJob checks count and idle_timeout: TypeError/ValueError right here.
    job = _impl.CopyJob(src_fd, dst_fd, count, zerocopy=zerocopy, idle_timeout=idle_timeout)
    # Plain sockets and ints buffer nothing: skip the (slow) ABC checks.
    flush = drain = None
    if type(dst) is not socket.socket and isinstance(dst, io.BufferedIOBase):
        flush = dst
    if (
        type(src) is not socket.socket
        and isinstance(src, io.BufferedIOBase)
        and hasattr(src, "read1")
    ):
        drain = src
    if flush is not None or drain is not None:

        def prologue(job: Any) -> None:
            if flush is not None and not flush.closed:
                flush.flush()
            if drain is not None:
                prefix = _take_readahead(drain, src_fd, job.remaining)
                if prefix:
                    job.prepend(prefix)

        job.prologue = prologue
    return job


def closes_in_c(end: object) -> bool:
    """Whether a worker may close this end's fd itself, without the GIL.

    Ints, and plain sockets with no makefile() file open: for those,
    ``close()`` does nothing but close the fd, so the completer only has to
    ``detach()`` the object afterwards (which leaves it exactly as closed).
    Files and anything else are closed through their own ``close()``.
    """
    if type(end) is socket.socket:
        return getattr(end, "_io_refs", 1) == 0
    return isinstance(end, int)


_detach_fd = _socket.socket.detach


def forget_closed(end: object) -> None:
    """Mark a plain socket closed whose fd a worker has already closed in C.

    What ``socket.socket.detach()`` does, without its Python frame and
    ``super()`` call: the completer does this twice per relay, with the GIL.
    ``closes_in_c`` lets only a plain ``socket.socket`` get here.
    """
    _detach_fd(end)  # type: ignore[arg-type]
    end._closed = True  # type: ignore[attr-defined]


def close_ends(objs: Iterable[object]) -> BaseException | None:
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


def coerce(src: object, dst: object, deferred: list[OSError]) -> tuple[int, int]:
    """Check a relay's ends in the caller's thread; return their fds (-1
    for an end whose ``fileno()`` raised an OSError, put in ``deferred``)."""
    return fd_of(src, "src", deferred), fd_of(dst, "dst", deferred)


def fail_relay(relay: Relay[_T], error: OSError, ends: list[object]) -> Relay[_T]:
    """Fail ``relay``, which never started because an end's ``fileno()``
    failed: ``ends`` (those ``close=True`` covers) are closed, and the future
    holds the error, as for any OS error.  Returns ``relay``."""
    close_ends(ends)
    relay.set_exception(error)
    return relay
