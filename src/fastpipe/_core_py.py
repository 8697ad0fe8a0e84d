"""The pure-Python twin of the compiled core (``_core.pyx`` and ``core/*.pxi``).

It is used where the extension cannot be built, or when the environment has
``FASTPIPE_NO_EXTENSIONS=1``.  It has the core's public names and behaviour,
and its private names, sections and policy too, so that the two read side by
side: each section below is the ``.pxi`` file it names, in the include order
of ``_core.pyx``.

* constants (``consts.pxi``);
* buffers (``buffers.pxi``): the free-list, ``buffer_stats``, ``trim_buffers``;
* pipes (``pipes.pxi``): the pool of intermediate pipes for splice;
* copy state and waits (``state.pxi``): ``CopyState``, ``_wait``,
  ``_wait_step``, ``_wait_ready``, ``_park_step``;
* the poller (``poller.pxi``): the epoll set where parked copies wait, its fd
  table, the deadline heap and the sweep;
* the kernel step (``kernel.pxi``): copy_file_range, sendfile, splice;
* the read/write step (``readwrite.pxi``): ``_copy_step`` and
  ``_write_pending``;
* path choice (``prepare.pxi``): ``_prepare``, ``_choose_kernel_path``,
  ``_discard``, ``_close_ends``;
* checks (``checks.pxi``; the checks themselves are ``fastpipe._checks``);
* ``CopyJob``, ``copy_fd``, ``fd_ready`` (``copyjob.pxi``);
* the pool core (``poolcore.pxi``): ``WorkerHandle``, ``PoolCore``.

A copy is the same state machine: all its state is in its ``CopyState``, each
step returns a ``STEP_*`` code, and a pool copy that must wait returns
``STEP_PARK``, is parked in its pool's ``select.epoll`` set holding no thread,
buffer or pipe, and is re-entered at the top of ``_copy_step`` when its fd is
ready.  The pool is the same leader/followers design with the same counts.

How it differs, each said again where it happens:

* It needs the GIL between syscalls.  Each ``os`` call releases it, but the
  loop around them is Python: a twin copy does not keep full speed while
  other threads run Python.  That is why the compiled core exists.
* EINTR is retried by the ``os`` functions themselves (PEP 475), and signal
  handlers run in the main thread between bytecodes; a handler that raises
  stops ``copy_fd`` at once, between any two steps.
* No signal can knock a Python thread out of a syscall.  So a copy that
  waits in its thread (``copy_fd``, or a pool copy on an fd that epoll
  refuses) polls an eventfd beside its fd, which ``cancel()`` writes; a
  sendfile or splice into a blocking socket runs under the socket's own send
  timeout (``_arm_stall``) instead of the core's stall alarm; and a blocking
  socket sink under ``idle_timeout`` takes the read/write path instead of
  the core's idle alarm.
* The core's intrusive lists (``link``, the idle workers' ``prev``/``next``)
  are Python lists and deques, its semaphores locks, and its condition
  variables are notified with the lock held, as ``threading.Condition``
  requires.
* Buffers are ``bytearray`` objects, read into and written from through
  memoryviews.  Sockets are read and written through socket objects over the
  caller's fd (``_SocketView``), which never close it and never change its
  flags.
* Threads are named for Python only: the standard library cannot name a
  thread at the OS level, so ``PoolCore`` has no ``name_this_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError as _CancelledError
from errno import (
    EAGAIN,
    EBADF,
    EBUSY,
    ECANCELED,
    EINTR,
    EINVAL,
    EIO,
    ENOMEM,
    ENOSYS,
    EOPNOTSUPP,
    EPERM,
    EPIPE,
    ETIMEDOUT,
    EXDEV,
)

from fastpipe._checks import check_count as _check_count
from fastpipe._checks import check_fd as _check_fd
from fastpipe._checks import check_idle_timeout as _check_idle_seconds

POLLIN = select.POLLIN
POLLOUT = select.POLLOUT
POLLNVAL = select.POLLNVAL
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLONESHOT = select.EPOLLONESHOT
MSG_DONTWAIT = socket.MSG_DONTWAIT
MSG_NOSIGNAL = socket.MSG_NOSIGNAL
RWF_NOWAIT = os.RWF_NOWAIT
SPLICE_F_NONBLOCK = os.SPLICE_F_NONBLOCK


# ---------------------------------------------------------------- constants
# Buffer, pipe and chunk sizes, and the codes that name a copy's path
# (Method), an fd's kind (FdKind) and what a copy step returns (Step).

BUF_SIZE = 32768
# Buffers per readv: up to 512 KiB per syscall.
MAX_IOV = 16
# Where a source of unknown size starts; it doubles while reads fill it.
START_IOV = 2
# How often a copy blocked in the main thread comes back for signals.
MAIN_THREAD_TICK_MS = 50
# The intermediate pipe, and how many idle ones are kept.
PIPE_SIZE = 1 << 20
PIPE_POOL_MAX = 16
# Most bytes per copy_file_range/sendfile/direct splice call.
KERNEL_CHUNK = 8 << 20
# A socket source starts on read/write and moves to splice once one read
# returns this much.
SPLICE_MIN_READ = 64 * 1024
# st.err for a copy of a file onto itself that would read back its own
# writes: EINVAL, with a message that says why (not an errno).
ERR_SAME_FILE = -1
# A pool copy that keeps moving bytes looks at its pool once per this many
# bytes (see _look_at_pool).
SLICE_BYTES = 1 << 20
# A sendfile or splice into a blocking socket whose peer stalls comes back
# after this long without room in the socket; the copy then parks until it
# is writable (the core's stall alarm; here, the socket's send timeout).
STALL_MS = 20
# Events taken per epoll_wait.
POLL_EVENTS = 64
# The sweep looks at this many of its fds per look, one look every SWEEP_MS.
SWEEP_SLOTS = 4096
SWEEP_MS = 1000

# Method
M_READWRITE = 0
M_COPY_FILE_RANGE = 1
M_SENDFILE = 2
M_SPLICE = 3

# FdKind
KIND_FILE = 0
KIND_PIPE = 1
KIND_SOCKET = 2
KIND_CHAR = 3

# Step
STEP_DONE = 0
STEP_ERROR = 1
# The core goes back to GIL-held code to run signal handlers, then resumes;
# here it is a main-thread tick, or a wait ended by cancel()'s eventfd.
STEP_SIGNALS = 2
STEP_AGAIN = 3
# CopyJob.cancel() was called: stop, keeping bytes_copied exact.
STEP_CANCELLED = 4
# A kernel path cannot serve this fd pair and has moved nothing: go on with
# st.method, which the step has set to the next path.
STEP_FALLBACK = 5
# Pool copies only.  STEP_PARK: nothing to do until st.park_fd is ready for
# st.park_events; the worker parks the copy in the poller and moves on.
# STEP_YIELD: SLICE_BYTES moved since the copy last looked at its pool, and
# nothing is pending.
STEP_PARK = 6
STEP_YIELD = 7

# CopyState.kdst_stall: whether a socket sink blocks (and so needs the stall
# timeout, see _arm_stall), asked the first time a kernel path writes to it.
STALL_NO = 0
STALL_YES = 1
STALL_ASK = 2

# JobState: where a pool copy is; changed only under the pool's lock.
J_NEW = 0  # not handed to the pool yet
J_QUEUED = 1  # ready, waiting in the queue for a worker
J_RUNNING = 2  # a worker runs it
J_PARKED = 3  # waiting in the poller, held by no thread
J_DONE = 4
J_HANDED = 5  # given to a new worker whose thread has not taken it

BUFFER_SIZE = BUF_SIZE


# ------------------------------------------------------------------ buffers
# The buffer free-list: BUF_SIZE bytearrays taken and given back, and
# buffer_stats() and trim_buffers().  It owns every buffer no copy holds;
# a buffer is never handed to code outside this module.

_buf_lock = threading.Lock()
_free_head: list[bytearray] = []  # the free-list, taken from the end
_n_in_use = 0
_n_peak = 0


def _note_in_use(delta: int) -> None:
    # Called with _buf_lock held.
    global _n_in_use, _n_peak
    _n_in_use += delta
    if _n_in_use > _n_peak:
        _n_peak = _n_in_use


def _buffers_take(out: list[bytearray], n: int) -> int:
    """Append n buffers to out, from the free-list, then new; returns how
    many it got (fewer only without memory)."""
    with _buf_lock:
        got = min(n, len(_free_head))
        if got:
            out += _free_head[-got:]
            del _free_head[-got:]
        _note_in_use(got)
    # New ones outside the lock, as the core mallocs outside it.
    fresh = 0
    try:
        while got + fresh < n:
            out.append(bytearray(BUF_SIZE))
            fresh += 1
    except MemoryError:
        pass
    if fresh:
        with _buf_lock:
            _note_in_use(fresh)
    return got + fresh


def _buffers_give(bufs: list[bytearray]) -> None:
    """Give every buffer in bufs back; bufs is left empty."""
    global _n_in_use
    if not bufs:
        return
    with _buf_lock:
        _free_head.extend(bufs)
        _n_in_use -= len(bufs)
    bufs.clear()


def buffer_stats() -> dict[str, int]:
    """Return the state of the buffer free-list.

    Returns:
        A dict with ``buffer_size``, ``allocated`` (buffers that exist now,
        ``free + in_use``), ``free``, ``in_use`` and ``peak`` (the most ever
        in use at once).
    """
    with _buf_lock:
        nfree = len(_free_head)
        nuse = _n_in_use
        npeak = _n_peak
    return {
        "buffer_size": BUF_SIZE,
        "allocated": nfree + nuse,
        "free": nfree,
        "in_use": nuse,
        "peak": npeak,
    }


def trim_buffers() -> int:
    """Free every idle pooled buffer.

    Buffers in use by running copies are not touched; they return to the
    free-list when their copy no longer needs them.

    Returns:
        The number of buffers freed.
    """
    with _buf_lock:
        n = len(_free_head)
        _free_head.clear()
    return n


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at fork time; the child has only
    # the forking thread, so a fresh lock is correct.  Buffers held by the
    # parent's copies are no longer counted as in use: their owners do not
    # exist here.
    global _buf_lock, _n_in_use, _n_peak
    _buf_lock = threading.Lock()
    _n_in_use = 0
    _n_peak = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


# -------------------------------------------------------------------- pipes
# The pipe pool: intermediate pipes for splice, pipe_stats() and
# trim_pipes().  It owns every pipe no copy holds.
#
# splice needs a pipe on one side, so socket->socket (and pipe/socket->file)
# goes src -> pooled pipe -> dst.  A pipe is O_NONBLOCK (the pipe side of a
# splice never blocks, so EAGAIN is always about the other fd) and enlarged
# to 1 MiB where the per-user quota allows.  Like a buffer, a pipe belongs to
# the pool or to exactly one copy; a copy holds one only while bytes are
# inside it or a splice is about to put them there.  A pipe that comes back
# with bytes inside (the copy failed or was cancelled half-way) is closed,
# never pooled: the next relay must not receive a stranger's bytes.


class FpPipe:
    """One intermediate pipe: its two fds, its capacity, its generation."""

    __slots__ = ("rfd", "wfd", "size", "gen")

    def __init__(self, rfd: int, wfd: int, size: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.size = size  # capacity after F_SETPIPE_SZ: what one splice can fill
        self.gen = 0  # _pipe_gen when created; stale after a fork


_pipe_lock = threading.Lock()
_pipe_free: list[FpPipe] = []
_pipe_all: set[FpPipe] = set()  # every live pipe, for the fork reset
_pipes_in_use = 0
_pipes_peak = 0
_pipes_created = 0
_pipes_small = 0  # created below the size asked for (quota)
_pipe_gen = 0
_pipe_want = PIPE_SIZE  # what F_SETPIPE_SZ asks for; tests lower it
_splice_min_read = SPLICE_MIN_READ


def _pipe_take() -> FpPipe:
    """A pooled pipe, or a new one.

    Raises:
        OSError: no pipe could be made (EMFILE, ENFILE...).
    """
    global _pipes_in_use, _pipes_peak, _pipes_created, _pipes_small
    with _pipe_lock:
        if _pipe_free:
            p = _pipe_free.pop()
            _pipes_in_use += 1
            _pipes_peak = max(_pipes_peak, _pipes_in_use)
            return p
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Past pipe-user-pages-soft an unprivileged F_SETPIPE_SZ fails (EPERM)
    # and new pipes may be as small as one page; the loop works with any
    # size, it just makes more calls.
    with contextlib.suppress(OSError):
        fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, _pipe_want)
    try:
        size = fcntl.fcntl(wfd, fcntl.F_GETPIPE_SZ)
    except OSError:
        size = 4096
    p = FpPipe(rfd, wfd, size if size > 0 else 4096)
    with _pipe_lock:
        p.gen = _pipe_gen
        _pipe_all.add(p)
        _pipes_created += 1
        if p.size < _pipe_want:
            _pipes_small += 1
        _pipes_in_use += 1
        _pipes_peak = max(_pipes_peak, _pipes_in_use)
    return p


def _pipe_give(p: FpPipe, empty: bool) -> None:
    global _pipes_in_use
    with _pipe_lock:
        if p.gen != _pipe_gen:
            # Taken before a fork, given back in the child: its fds were
            # closed by the fork reset and the numbers may be someone else's.
            return
        _pipes_in_use -= 1
        keep = empty and len(_pipe_free) < PIPE_POOL_MAX
        if keep:
            _pipe_free.append(p)
        else:
            _pipe_all.discard(p)
    if not keep:
        _close_quietly(p.rfd)
        _close_quietly(p.wfd)


def pipe_stats() -> dict[str, int]:
    """Return the state of the pool of intermediate pipes used by splice.

    Returns:
        A dict with ``pipe_size`` (the size asked for with F_SETPIPE_SZ),
        ``allocated`` (pipes that exist now, ``free + in_use``), ``free``,
        ``in_use``, ``peak``, ``max_free`` (how many idle pipes are kept),
        ``created`` (pipes ever made) and ``small`` (pipes the kernel would
        not enlarge, because of the per-user pipe quota).
    """
    with _pipe_lock:
        nfree = len(_pipe_free)
        nuse = _pipes_in_use
        npeak = _pipes_peak
        ncreated = _pipes_created
        nsmall = _pipes_small
    return {
        "pipe_size": _pipe_want,
        "allocated": nfree + nuse,
        "free": nfree,
        "in_use": nuse,
        "peak": npeak,
        "max_free": PIPE_POOL_MAX,
        "created": ncreated,
        "small": nsmall,
    }


def _set_pipe_size(size: int) -> None:
    """For tests: ask for ``size``-byte pipes from now on (the kernel rounds
    it up to a power of two pages, and never goes below one page), as the
    per-user pipe quota would.  Idle pipes of the old size are closed."""
    global _pipe_want
    _pipe_want = size
    trim_pipes()


def _set_splice_min_read(nbytes: int) -> int:
    """For tests and measurements: the read size at which a socket source
    moves to splice (0: splice from the first byte).  Returns the old one."""
    global _splice_min_read
    old = _splice_min_read
    _splice_min_read = nbytes
    return old


def trim_pipes() -> int:
    """Close every idle pooled pipe.

    Pipes in use by running copies are not touched; they return to the pool
    when their copy no longer needs them.

    Returns:
        The number of pipes closed.
    """
    with _pipe_lock:
        idle = list(_pipe_free)
        _pipe_free.clear()
        _pipe_all.difference_update(idle)
    for p in idle:
        _close_quietly(p.rfd)
        _close_quietly(p.wfd)
    return len(idle)


def _pipes_after_fork_in_child() -> None:
    # The child shares every pooled pipe with the parent: using one would mix
    # the two processes' bytes.  Close the child's copies of all of them
    # (free or held by copies whose threads did not survive the fork) and
    # start a new generation, so that a stale pipe given back is dropped.
    global _pipe_lock, _pipes_in_use, _pipes_peak, _pipe_gen
    _pipe_lock = threading.Lock()
    for p in _pipe_all:
        _close_quietly(p.rfd)
        _close_quietly(p.wfd)
    _pipe_all.clear()
    _pipe_free.clear()
    _pipes_in_use = 0
    _pipes_peak = 0
    _pipe_gen += 1


os.register_at_fork(after_in_child=_pipes_after_fork_in_child)


# -------------------------------------------------------- copy state, waits
# The copy state and the waits: CopyState (all a copy needs to resume where
# it stopped), giving its buffers and pipe back, the clock, and the poll that
# ends on readiness, a main-thread tick, idle_timeout or a cancel.


class CopyState:
    """All of one copy's state: the core's ``CopyState`` struct, field for
    field, less what a Python thread cannot use (its alarms and the
    kdst_wait_first that goes with them, the thread to signal, the queue
    link) and plus what only the twin needs (marked *twin*)."""

    __slots__ = (
        "src",
        "dst",
        "src_kind",
        "dst_kind",
        "src_wait_first",
        "dst_wait_first",
        "dst_is_socket",
        "dst_send_flags",
        "dst_nowait",
        "src_is_socket",
        "src_nowait",
        "poll_next",
        "src_pipe_size",
        "wait_ms",
        "idle_ms",
        "deadline_ms",
        "idle_expired",
        "owner",
        "needs_prologue",
        "pooled",
        "jstate",
        "park_fd",
        "park_events",
        "pass_fd",
        "pass_events",
        "src_unpollable",
        "dst_unpollable",
        "reg_src",
        "reg_dst",
        "heap_idx",
        "slice_end",
        "queued_ms",
        "kdst_stall",
        "stall_armed",
        "stall_saved",
        "src_dev",
        "src_ino",
        "dst_dev",
        "dst_ino",
        "lost_fd",
        "in_worker",
        "prepared",
        "close_src",
        "close_dst",
        "shut_wr_at_eof",
        "status",
        "cancel_req",
        "cancelled",
        "wake_lock",
        "wake_fd",
        "limit",
        "copied",
        "want",
        "want_max",
        "bufs",
        "pend_off",
        "pend_len",
        "pre_ptr",
        "pre_len",
        "err",
        "method",
        "used",
        "kmoved",
        "via_pipe",
        "splice_retried",
        "splice_later",
        "ksrc_wait_first",
        "zerocopy",
        "pipe",
        "pipe_len",
        "fill_pipe",
        "draining",
        "src_eof",
        "orphan",
        "src_known",
        "partner",
        "pair_ended",
        "src_sock",
        "dst_sock",
    )

    def __init__(self, src: int, dst: int) -> None:
        self.src = src
        self.dst = dst
        self.src_kind = KIND_FILE
        self.dst_kind = KIND_FILE
        self.src_wait_first = False  # a blocking, pollable source: poll before read
        self.dst_wait_first = False  # a blocking device sink: poll before write
        self.dst_is_socket = False  # send with MSG_NOSIGNAL: EPIPE, never SIGPIPE
        self.dst_send_flags = 0  # MSG_DONTWAIT where a blocked send must not stall
        self.dst_nowait = False  # a blocking pipe sink written with RWF_NOWAIT
        # A socket source is read with MSG_DONTWAIT, and a blocking pipe with
        # RWF_NOWAIT (Linux 5.x+; else poll first): neither blocks, whatever
        # the fd's own flag, so there is no poll before each read.
        self.src_is_socket = False
        self.src_nowait = False
        self.poll_next = False  # the last non-blocking read was short
        self.src_pipe_size = 0  # a pipe source's capacity once asked (-1: unknown)
        self.wait_ms = -1  # poll timeout: -1, or a tick in the main thread
        self.idle_ms = -1  # idle_timeout in ms, or -1
        self.deadline_ms = 0  # monotonic ms by which a byte must move
        self.idle_expired = False  # the ETIMEDOUT is ours, not the socket's
        # Worker-pool fields.  owner is the CopyJob; the pool holds it from
        # submit() until the completer takes the job back.
        self.owner: CopyJob | None = None
        self.needs_prologue = False  # run CopyJob.prologue first
        # A pool copy (pooled) never blocks in a wait: _wait_step hands back
        # STEP_PARK with the fd and events to wait for, and the worker parks
        # the copy in the poller and runs another.  The rest is the poller's
        # and the pool's, changed under the pool's lock.
        self.pooled = False
        self.jstate = J_NEW
        self.park_fd = -1
        self.park_events = 0
        # Woken by the poller: the first wait for this fd and these events
        # is skipped (the poller saw them), unless a byte has moved since.
        self.pass_fd = -1
        self.pass_events = 0
        self.src_unpollable = False  # epoll refused this end (EPERM): wait for
        self.dst_unpollable = False  # it in the worker's thread, as copy_fd does
        self.reg_src = False  # the copy counts among its fd's users in the
        self.reg_dst = False  # poller's table (see _poller_release)
        self.heap_idx = -1  # in the poller's deadline heap, or -1
        self.slice_end = 0  # copied at which the worker looks at its pool
        self.queued_ms = 0  # when it entered the pool's queue
        self.kdst_stall = STALL_NO  # STALL_*: is dst a blocking socket
        # Twin: the stall timeout is set on dst (see _arm_stall), and the
        # caller's own SO_SNDTIMEO, to put back.
        self.stall_armed = False
        self.stall_saved = b""
        # Identity of each end, to tell a parked copy whose fd was closed
        # and reused under it (the poller's sweep).
        self.src_dev = 0
        self.src_ino = 0
        self.dst_dev = 0
        self.dst_ino = 0
        self.lost_fd = -1  # that fd, if it happened (else -1): EBADF
        # The pool holds the job beyond its queue: a worker has taken it, or
        # it parked before it first ran.  It is running, and only a cancel
        # stops it (it is no longer simply taken off the queue).
        self.in_worker = False
        self.prepared = False  # _prepare has looked at its ends
        self.close_src = False  # close these int fds when the copy ends
        self.close_dst = False
        self.shut_wr_at_eof = False  # shutdown(dst, SHUT_WR) when the source ends
        self.status = STEP_AGAIN  # STEP_DONE or STEP_ERROR once finished
        # Cancellation: cancel_req is set by CopyJob.cancel() from any thread
        # and read by the copy between syscalls.  Twin: where the core
        # signals the thread a copy runs in, cancel() writes wake_fd, an
        # eventfd that every wait in a thread polls beside its fd (made by
        # the first such wait, closed by _discard, both under wake_lock).
        self.cancel_req = False
        self.cancelled = False  # the copy ended because of cancel_req
        self.wake_lock = threading.Lock()
        self.wake_fd = -1
        self.limit = -1  # bytes left to read, or -1 for "to end of file"
        self.copied = 0  # bytes written to dst; read live by other threads
        self.want = START_IOV  # buffers per read
        self.want_max = 0  # at most this many (0: not sized for the sink yet)
        # The buffers held (the core's bufs[] and nbufs).
        self.bufs: list[bytearray] = []
        # Bytes read but not yet written: pend_len bytes in bufs from
        # pend_off, or, for a prefix handed in by Python, pre_len bytes at
        # pre_ptr (twin: a memoryview of the prefix's unwritten part).
        self.pend_off = 0
        self.pend_len = 0
        self.pre_ptr: memoryview | None = None
        self.pre_len = 0
        self.err = 0
        # The kernel paths.  method is the path to take next (a Method); it
        # only ever moves towards M_READWRITE, and only while kmoved is
        # false, so a fallback can neither lose nor repeat a byte.
        self.method = M_READWRITE
        # The path that last took bytes (or the end of file) from src, for
        # CopyJob.method; -1 until one has.
        self.used = -1
        self.kmoved = False  # the kernel path has taken bytes from src
        self.via_pipe = False  # splice src -> pipe -> dst (neither end a pipe)
        self.splice_later = False  # read/write first; splice once reads are large
        self.ksrc_wait_first = False  # a blocking socket source: poll before splice
        self.zerocopy = True  # kernel paths allowed
        self.pipe: FpPipe | None = None  # the intermediate pipe, while held
        self.pipe_len = 0  # bytes inside it
        # A pipe source fills the intermediate pipe before it is written out;
        # a socket source never does (see the core's state.pxi).
        self.fill_pipe = False
        self.splice_retried = False  # a direct splice's EAGAIN was retried once
        self.draining = False  # write the pipe out completely before reading
        self.src_eof = False
        # The copy was this process's parent's (inherited across fork()): it
        # never runs here, and cancel() leaves it alone.
        self.orphan = False
        # src_kind, src_dev and src_ino are known already (a copy parked
        # before it first ran looked at its source then).
        self.src_known = False
        # A proxy's other direction, when the two share both fds and the
        # one that ends last closes them (CopyJob.close_pair_with); read
        # under the pool's lock.
        self.partner: CopyState | None = None
        self.pair_ended = False
        # Twin: socket objects over a socket end (see _SocketView), made by
        # _prepare and detached by _discard.
        self.src_sock: socket.socket | None = None
        self.dst_sock: socket.socket | None = None


def _release(st: CopyState) -> None:
    _buffers_give(st.bufs)


def _release_pipe(st: CopyState) -> None:
    if st.pipe is not None:
        _pipe_give(st.pipe, st.pipe_len == 0)
        st.pipe = None
        st.pipe_len = 0


def _wake_fd(st: CopyState) -> int:
    """Twin: the eventfd a wait in a thread polls for cancel(); -1 with st.err."""
    with st.wake_lock:
        if st.wake_fd < 0:
            try:
                st.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            except OSError as exc:
                st.err = exc.errno or EIO
                return -1
        return st.wake_fd


def _wait(st: CopyState, fd: int, events: int, timeout: int) -> int:
    """poll one fd; 1 ready, 0 timed out, -1 error in st.err (EINTR too).

    Twin: a wait that can block (timeout not 0) also polls the copy's wake
    eventfd.  cancel() writes it, which ends the wait as the core's wake
    signal does: -1 with EINTR.  The flag is looked at once the eventfd is
    known to exist, so a cancel() that came before it did is not missed.
    """
    p = select.poll()
    p.register(fd, events)
    if timeout != 0:
        wake = _wake_fd(st)
        if wake < 0:
            return -1
        p.register(wake, POLLIN)
        if st.cancel_req:
            st.err = EINTR
            return -1
    try:
        ready = p.poll(timeout)
    except OSError as exc:
        st.err = exc.errno or EIO
        return -1
    if not ready:
        return 0
    for rfd, revents in ready:
        if rfd == fd:
            if revents & POLLNVAL:
                st.err = EBADF
                return -1
            # POLLHUP/POLLERR count as ready: the next read or write reports
            # EOF or the real errno, which is better than guessing it here.
            return 1
    st.err = EINTR  # the wake eventfd: a cancel
    return -1


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _idle_deadline(st: CopyState) -> int:
    # _now_ms() truncates to the millisecond, up to 1 ms behind the clock:
    # one more keeps idle_timeout from ever firing before its time.
    return _now_ms() + st.idle_ms + 1


def _progress(st: CopyState) -> None:
    # Bytes moved: what the poller saw is stale now.
    st.pass_fd = -1
    if st.idle_ms >= 0:
        st.deadline_ms = _idle_deadline(st)


def _park_step(st: CopyState, fd: int, events: int) -> int:
    """A pool copy's wait: STEP_PARK, unless it need not or must not wait.

    STEP_AGAIN if the poller has just said that fd is ready for events; the
    checks _wait_step makes first (idle deadline, cancel) otherwise.
    """
    if st.pass_fd == fd and st.pass_events & events:
        st.pass_fd = -1
        return STEP_AGAIN
    if st.lost_fd >= 0:
        st.err = EBADF
        return STEP_ERROR
    if st.idle_ms >= 0 and st.deadline_ms - _now_ms() <= 0:
        st.err = ETIMEDOUT
        st.idle_expired = True
        return STEP_ERROR
    if st.cancel_req:
        return STEP_CANCELLED
    st.park_fd = fd
    st.park_events = events
    return STEP_PARK


def _unpollable(st: CopyState, fd: int) -> bool:
    return (fd == st.src and st.src_unpollable) or (fd == st.dst and st.dst_unpollable)


def _wait_step(st: CopyState, fd: int, events: int) -> int:
    """Block until fd is ready: STEP_AGAIN, or a step to hand back.

    It hands back STEP_SIGNALS for EINTR (here: a cancel's eventfd) and for
    each main-thread tick, and STEP_ERROR with ETIMEDOUT (TimeoutError) once
    idle_timeout has passed without a byte moving.
    """
    if st.pooled and not _unpollable(st, fd):
        return _park_step(st, fd, events)
    while True:
        timeout = st.wait_ms
        if st.idle_ms >= 0:
            left = st.deadline_ms - _now_ms()
            if left <= 0:
                st.err = ETIMEDOUT
                st.idle_expired = True
                return STEP_ERROR
            if timeout < 0 or left < timeout:
                timeout = left
        if st.cancel_req:
            return STEP_CANCELLED
        r = _wait(st, fd, events, timeout)
        if r > 0:
            return STEP_AGAIN
        if r < 0:
            return STEP_SIGNALS if st.err == EINTR else STEP_ERROR
        if st.wait_ms >= 0:
            return STEP_SIGNALS


def _wait_ready(st: CopyState, fd: int, events: int) -> int:
    """Like _wait_step, where the fd is likely ready already: a pool copy
    looks without waiting first, and parks only if it is not."""
    if st.pooled and not _unpollable(st, fd):
        if st.pass_fd == fd and st.pass_events & events:
            st.pass_fd = -1
            return STEP_AGAIN
        r = _wait(st, fd, events, 0)
        if r > 0:
            return STEP_AGAIN
        if r < 0:
            return STEP_SIGNALS if st.err == EINTR else STEP_ERROR
    return _wait_step(st, fd, events)


# ------------------------------------------------------------------- poller
# The poller: where a pool's parked copies wait, holding no thread.  One
# epoll set per pool, a table of the fds it watches, and a heap of the parked
# copies' idle deadlines.  Every function here runs under the pool's lock.
#
# Registrations are one-shot (EPOLLONESHOT): an fd is armed when a copy parks
# on it and disarmed by the event that wakes it, so a copy that is moving
# bytes costs the poller nothing.  Re-arming is one epoll_ctl per park.
#
# The table is indexed by fd because two copies may park on one fd at once:
# a proxy's a->b direction waiting to read a socket while b->a waits to write
# it.  epoll keeps one registration per fd, so its events go to the slot,
# which wakes the copy parked for reading, the one parked for writing, or
# both.  A slot stays registered while any copy that parked on the fd has not
# ended; the last one to end removes it (_poller_release), before the fd is
# closed.
#
# An fd is the caller's until its relay ends.  If the caller closes it under
# a parked copy anyway, epoll drops the registration without a word and the
# copy would wait for ever; so the sweep looks at each watched fd every few
# seconds, and a copy whose fd is closed, or now names another file, ends
# with EBADF and leaves that fd number alone.
#
# Twin: select.epoll reports each event with its fd, so the eventfd that
# wakes the leader is told apart by its number (the core tags it POKE_TAG).


class FdSlot:
    """The poller's entry for one fd."""

    __slots__ = ("rd", "wr", "users", "registered")

    def __init__(self) -> None:
        self.rd: CopyState | None = None  # the copy parked until the fd is readable
        self.wr: CopyState | None = None  # the copy parked until it is writable
        self.users = 0  # copies that parked on the fd and have not ended
        self.registered = False  # in the epoll set (armed or not)


class Poller:
    """One pool's epoll set, its fd table and its deadline heap."""

    __slots__ = ("epfd", "evfd", "poked", "slots", "heap", "n_parked", "sweep_at", "sweep_ms")

    def __init__(self) -> None:
        _poller_init(self)

    # Typed here; set by _poller_init.
    epfd: select.epoll | None  # the epoll set (None until the first copy parks)
    evfd: int  # an eventfd in the set: wakes the leader
    poked: bool  # written and not yet read
    slots: list[FdSlot | None]  # indexed by fd
    heap: list[CopyState]  # parked copies with an idle_timeout, by deadline
    n_parked: int
    sweep_at: int  # the next slot the sweep looks at
    sweep_ms: int  # when it looks next


# How often the sweep looks; tests lengthen it to see a parked pool at rest.
_sweep_ms = SWEEP_MS


def _set_sweep_interval(seconds: float) -> None:
    """Set how often a poller looks for fds closed under parked copies."""
    global _sweep_ms
    _sweep_ms = int(seconds * 1000)


def _poller_init(p: Poller) -> None:
    p.epfd = None
    p.evfd = -1
    p.poked = False
    p.slots = []
    p.heap = []
    p.n_parked = 0
    p.sweep_at = 0
    p.sweep_ms = 0


def _poller_open(p: Poller) -> int:
    """Make the epoll set and the eventfd on first use: 0, or an errno."""
    if p.epfd is not None:
        return 0
    try:
        p.epfd = select.epoll()  # close-on-exec, as EPOLL_CLOEXEC
    except OSError as exc:
        p.epfd = None
        return exc.errno or EIO
    try:
        p.evfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        p.epfd.register(p.evfd, EPOLLIN)
    except OSError as exc:
        if p.evfd >= 0:
            _close_quietly(p.evfd)
        p.epfd.close()
        p.epfd = None
        p.evfd = -1
        return exc.errno or EIO
    return 0


def _poller_close(p: Poller) -> None:
    """Close the set and forget every slot: nothing is parked, or (in a child
    after fork) what was parked belongs to the parent.  Closing this process's
    fds leaves a parent's set as it was."""
    if p.epfd is not None:
        p.epfd.close()
    if p.evfd >= 0:
        _close_quietly(p.evfd)
    _poller_init(p)


def _poller_poke(p: Poller) -> None:
    # The leader wakes from epoll_wait and looks at the pool again.
    if p.evfd >= 0 and not p.poked:
        p.poked = True
        with contextlib.suppress(OSError):  # at the counter's limit: still readable
            os.eventfd_write(p.evfd, 1)


def _poller_slot(p: Poller, fd: int) -> FdSlot:
    """fd's slot, growing the table to hold it."""
    n = len(p.slots)
    if fd >= n:
        n = n * 2 if n else 256
        while n <= fd:
            n *= 2
        p.slots.extend([None] * (n - len(p.slots)))
    slot = p.slots[fd]
    if slot is None:
        slot = p.slots[fd] = FdSlot()
    return slot


def _poller_apply(p: Poller, slot: FdSlot, fd: int) -> int:
    """Arm fd for what its parked copies wait for: 0, or an errno."""
    assert p.epfd is not None
    events = EPOLLONESHOT
    if slot.rd is not None:
        events |= EPOLLIN
    if slot.wr is not None:
        events |= EPOLLOUT
    try:
        if slot.registered:
            try:
                p.epfd.modify(fd, events)
            except FileNotFoundError:
                # The fd was closed and opened anew since (its registration
                # went with the old file): a new registration.
                p.epfd.register(fd, events)
        else:
            try:
                p.epfd.register(fd, events)
            except FileExistsError:
                p.epfd.modify(fd, events)
    except OSError as exc:
        return exc.errno or EIO
    slot.registered = True
    return 0


def _poller_arm(p: Poller, st: CopyState) -> int:
    """Park st on st.park_fd for st.park_events: 0, or an errno.

    EPERM: epoll takes no such fd (a regular file, some devices).  EBUSY:
    another copy is parked on the fd for the same events (two relays reading
    one socket); this one must wait some other way.
    """
    fd = st.park_fd
    reading = (st.park_events & POLLIN) != 0
    slot = _poller_slot(p, fd)
    if (slot.rd if reading else slot.wr) is not None:
        return EBUSY
    if reading:
        slot.rd = st
    else:
        slot.wr = st
    err = _poller_apply(p, slot, fd)
    if err:
        if reading:
            slot.rd = None
        else:
            slot.wr = None
        return err
    # The copy now counts among the fd's users, until it ends.
    if fd == st.src:
        if not st.reg_src:
            st.reg_src = True
            slot.users += 1
    elif not st.reg_dst:
        st.reg_dst = True
        slot.users += 1
    st.jstate = J_PARKED
    p.n_parked += 1
    if st.idle_ms >= 0:
        _heap_push(p, st)
    return 0


def _poller_unpark(p: Poller, st: CopyState, events: int) -> None:
    """st leaves the poller, ready to run; it skips its next wait for events
    on its fd (the poller saw them), unless events is 0."""
    slot = p.slots[st.park_fd]
    assert slot is not None
    if slot.rd is st:
        slot.rd = None
    if slot.wr is st:
        slot.wr = None
    if st.heap_idx >= 0:
        _heap_remove(p, st)
    p.n_parked -= 1
    st.jstate = J_QUEUED
    st.pass_fd = st.park_fd if events else -1
    st.pass_events = events


def _poller_release(p: Poller, st: CopyState) -> None:
    """st has ended: it no longer uses its fds.  The last user of an fd
    takes it out of the set, before the fd is closed."""
    for i in range(2):
        if i == 0:
            if not st.reg_src:
                continue
            st.reg_src = False
            fd = st.src
        else:
            if not st.reg_dst:
                continue
            st.reg_dst = False
            fd = st.dst
        slot = p.slots[fd] if fd < len(p.slots) else None
        if slot is None:
            # The table was reset: the last worker closed the set while this
            # copy, unparked by a cancel, was on its way to its end.
            continue
        slot.users -= 1
        if slot.users == 0:
            if slot.registered and p.epfd is not None:
                with contextlib.suppress(OSError):
                    p.epfd.unregister(fd)
            slot.registered = False


def _poller_events(p: Poller, evs: list[tuple[int, int]]) -> list[CopyState]:
    """Wake the copies these events are for; return them, in order."""
    woken: list[CopyState] = []
    for fd, revents in evs:
        if fd == p.evfd:
            with contextlib.suppress(OSError):
                os.eventfd_read(p.evfd)
            p.poked = False
            continue
        slot = p.slots[fd] if fd < len(p.slots) else None
        if slot is None:
            continue
        # An error or hang-up wakes both: each finds out with its own call.
        st = slot.rd
        if st is not None and revents & (EPOLLIN | EPOLLERR | EPOLLHUP):
            _poller_unpark(p, st, POLLIN)
            woken.append(st)
        st = slot.wr
        if st is not None and revents & (EPOLLOUT | EPOLLERR | EPOLLHUP):
            _poller_unpark(p, st, POLLOUT)
            woken.append(st)
        if (slot.rd is not None or slot.wr is not None) and _poller_apply(p, slot, fd):
            # One-shot: the event disarmed the fd for the copy still parked,
            # and re-arming it failed: that copy runs, to find out why.
            st = slot.rd
            if st is not None:
                _poller_unpark(p, st, POLLIN)
                woken.append(st)
            st = slot.wr
            if st is not None:
                _poller_unpark(p, st, POLLOUT)
                woken.append(st)
    return woken


def _poller_expired(p: Poller, now: int) -> list[CopyState]:
    """Wake the copies whose idle deadline has passed: each then fails with
    TimeoutError at its next wait."""
    woken = []
    while p.heap and p.heap[0].deadline_ms <= now:
        st = p.heap[0]
        _poller_unpark(p, st, 0)
        woken.append(st)
    return woken


def _poller_sweep(p: Poller, now: int) -> list[CopyState]:
    """Look at the next SWEEP_SLOTS fds for one closed under a parked copy."""
    woken: list[CopyState] = []
    p.sweep_ms = now + _sweep_ms
    end = min(p.sweep_at + SWEEP_SLOTS, len(p.slots))
    for fd in range(p.sweep_at, end):
        slot = p.slots[fd]
        if slot is None:
            continue
        st = slot.rd if slot.rd is not None else slot.wr
        if st is None:
            continue
        try:
            sb = os.fstat(fd)
        except OSError:
            lost = True
        else:
            if fd == st.src:
                lost = sb.st_dev != st.src_dev or sb.st_ino != st.src_ino
            else:
                lost = sb.st_dev != st.dst_dev or sb.st_ino != st.dst_ino
        if not lost:
            continue
        # Its registration went with the file; the number is not ours now.
        slot.registered = False
        for parked in (slot.rd, slot.wr):
            if parked is not None:
                parked.lost_fd = fd
                _poller_unpark(p, parked, 0)
                woken.append(parked)
    p.sweep_at = 0 if end >= len(p.slots) else end
    return woken


def _poller_timeout(p: Poller, now: int) -> int:
    """How long the leader may wait in epoll_wait: ms, or -1 for ever."""
    t = -1
    if p.heap:
        t = p.heap[0].deadline_ms - now
    if p.n_parked and (t < 0 or p.sweep_ms - now < t):
        t = p.sweep_ms - now
    if t < 0 and (p.heap or p.n_parked):
        t = 0
    return t


# -- the deadline heap: a binary min-heap on deadline_ms, each copy knowing
#    its index (heap_idx) so that a copy woken early leaves in O(log n).
#    (The core reserves room before a copy parks; a list grows by itself.)


def _heap_set(p: Poller, i: int, st: CopyState) -> None:
    p.heap[i] = st
    st.heap_idx = i


def _heap_up(p: Poller, i: int) -> None:
    st = p.heap[i]
    while i > 0:
        parent = (i - 1) // 2
        if p.heap[parent].deadline_ms <= st.deadline_ms:
            break
        _heap_set(p, i, p.heap[parent])
        i = parent
    _heap_set(p, i, st)


def _heap_down(p: Poller, i: int) -> None:
    st = p.heap[i]
    n = len(p.heap)
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and p.heap[child + 1].deadline_ms < p.heap[child].deadline_ms:
            child += 1
        if st.deadline_ms <= p.heap[child].deadline_ms:
            break
        _heap_set(p, i, p.heap[child])
        i = child
    _heap_set(p, i, st)


def _heap_push(p: Poller, st: CopyState) -> None:
    p.heap.append(st)
    _heap_set(p, len(p.heap) - 1, st)
    _heap_up(p, len(p.heap) - 1)


def _heap_remove(p: Poller, st: CopyState) -> None:
    i = st.heap_idx
    st.heap_idx = -1
    last = p.heap.pop()
    if i == len(p.heap):
        return
    _heap_set(p, i, last)
    _heap_up(p, i)
    _heap_down(p, last.heap_idx)


# -------------------------------------------------------------- kernel step
# The kernel step: copy_file_range, sendfile or splice until the end, with
# its helpers (the direct splice's EAGAIN, when a path gives up, and how much
# a blocking socket sink takes without blocking).


def _wait_both(st: CopyState) -> int:
    """After EAGAIN from a direct splice: wait for whichever end is not ready.

    The pipe side of the splice is non-blocking and the other end may be
    too, so EAGAIN can mean an empty source or a full sink; poll tells which.
    """
    p = select.poll()
    p.register(st.src, POLLIN)
    p.register(st.dst, POLLOUT)
    try:
        ready = dict(p.poll(0))
    except OSError as exc:
        st.err = exc.errno or EIO
        return STEP_ERROR
    src_revents = ready.get(st.src, 0)
    dst_revents = ready.get(st.dst, 0)
    if (src_revents | dst_revents) & POLLNVAL:
        st.err = EBADF
        return STEP_ERROR
    if src_revents == 0:
        return _wait_step(st, st.src, POLLIN)
    if not src_revents & POLLIN:
        # End of file (POLLHUP alone): the next splice returns 0 without
        # touching the sink, which may stay full until our caller reads it.
        return STEP_AGAIN
    if not st.splice_retried:
        # The source has bytes now, but may have had none at the splice:
        # try once more before blaming the sink, whose POLLOUT can stay off
        # while it still has room (a unix socket's is a threshold).
        st.splice_retried = True
        return STEP_AGAIN
    if dst_revents == 0:
        return _wait_step(st, st.dst, POLLOUT)
    # Both ends claim to be ready, yet the splice found no room or no data.
    # Never spin on it: back off for a millisecond.
    time.sleep(0.001)
    return STEP_AGAIN


def _kernel_gives_up(method: int, err: int) -> bool:
    """True if this errno means "this path cannot serve these fds"."""
    if method == M_COPY_FILE_RANGE:
        return err in (EINVAL, ENOSYS, EXDEV, EOPNOTSUPP, EPERM, EIO)
    return err in (EINVAL, ENOSYS, EOPNOTSUPP)


def _moved(st: CopyState, n: int, written: bool) -> None:
    st.kmoved = True
    st.used = st.method
    if st.limit > 0:
        st.limit -= n
    if written:
        st.copied += n
    _progress(st)


# The core's _src_has_bytes asks, before it polls a blocking socket sink
# under idle_timeout, whether there is anything to send; the twin never polls
# a sink first on a kernel path (it takes read/write there: see
# _choose_kernel_path), so it has no use for it.


# struct timeval, as SO_SNDTIMEO takes and gives it.
_TIMEVAL = struct.Struct("@ll")


def _arm_stall(st: CopyState) -> None:
    """Before a sendfile or splice into a socket.

    Neither call honours a per-call non-blocking flag on a blocking socket,
    and the caller's fd is not ours to switch to O_NONBLOCK: a stalled peer
    would hold the thread for as long as it stalls.  The core interrupts
    such a call every STALL_MS with its worker's stall alarm, a timer signal
    that no Python thread can take.  Twin: the socket's send timeout
    (SO_SNDTIMEO) is STALL_MS instead, from here until the copy leaves this
    thread (_disarm_stall puts the caller's back: a parked relay leaves the
    socket as it found it).  A call whose peer stalls then comes back within
    STALL_MS with the bytes that did move, or EAGAIN, and the copy waits for
    POLLOUT: it parks, in a pool, and in copy_fd it polls beside the eventfd
    a cancel writes (unlike the core's alarm, this serves copy_fd too, so a
    cancel stops it at once).  A caller's own shorter timeout is kept.
    Where the option cannot be read or set, the call blocks as it does in a
    caller's thread, as the core's does where its alarm cannot be made.
    """
    if st.kdst_stall == STALL_ASK:
        st.kdst_stall = STALL_NO
        with contextlib.suppress(OSError):
            if not _is_nonblocking(st.dst):
                st.kdst_stall = STALL_YES
    sock = st.dst_sock
    if st.kdst_stall != STALL_YES or st.stall_armed or sock is None:
        return
    try:
        saved = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.size)
        sec, usec = _TIMEVAL.unpack(saved)
        if (sec or usec) and sec * 1000 + usec // 1000 <= STALL_MS:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, STALL_MS * 1000))
    except OSError:
        return
    st.stall_saved = saved
    st.stall_armed = True


def _disarm_stall(st: CopyState) -> None:
    # Twin: the caller's send timeout back, when the copy leaves the thread.
    if st.stall_armed:
        st.stall_armed = False
        if st.dst_sock is not None:
            with contextlib.suppress(OSError):
                st.dst_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, st.stall_saved)


def _kernel_step(st: CopyState) -> int:
    """Copy with copy_file_range, sendfile or splice until the end.

    Returns STEP_FALLBACK, with st.method set to the next path, when the
    kernel refuses the fd pair before any byte has moved.
    """
    while True:
        if st.cancel_req:
            return STEP_CANCELLED
        if st.pooled and st.pipe_len == 0 and st.copied >= st.slice_end:
            return STEP_YIELD
        pipe = st.pipe
        if (
            pipe is not None
            and st.pipe_len > 0
            and (st.draining or not st.fill_pipe or st.pipe_len >= pipe.size or st.limit == 0)
        ):
            # The second leg: intermediate pipe -> dst.  (The core polls a
            # blocking socket sink first here under idle_timeout, and bounds
            # the call with its idle alarm; the twin sends to such a sink by
            # read/write instead: see _choose_kernel_path.)
            _arm_stall(st)
            try:
                n = os.splice(pipe.rfd, st.dst, st.pipe_len, flags=SPLICE_F_NONBLOCK)
            except OSError as exc:
                err = exc.errno or EIO
                if err == EAGAIN:
                    r = _wait_step(st, st.dst, POLLOUT)
                    if r != STEP_AGAIN:
                        return r
                    continue
                if _kernel_gives_up(M_SPLICE, err):
                    # The sink takes no splice: the read/write loop empties
                    # the pipe into it first, then reads src itself.  No
                    # byte is lost or repeated, whenever this happens.
                    st.method = M_READWRITE
                    return STEP_FALLBACK
                st.err = err
                return STEP_ERROR
            st.pipe_len -= n
            if st.pipe_len == 0:
                st.draining = False
            st.copied += n
            _progress(st)
            continue
        if st.limit == 0 or st.src_eof:
            _release_pipe(st)
            return STEP_DONE
        chunk = KERNEL_CHUNK
        if 0 <= st.limit < chunk:
            chunk = st.limit
        try:
            if st.method == M_COPY_FILE_RANGE:
                n = os.copy_file_range(st.src, st.dst, chunk)
            elif st.method == M_SENDFILE:
                _arm_stall(st)
                n = os.sendfile(st.dst, st.src, None, chunk)
            else:
                if st.ksrc_wait_first:
                    # A blocking TCP socket ignores SPLICE_F_NONBLOCK: only
                    # splice once it has bytes, and a pool copy parks instead
                    # of blocking its worker (a parked copy gives an empty
                    # pipe back; see _park).
                    if st.pooled:
                        r = _wait_ready(st, st.src, POLLIN)
                    else:
                        _release_pipe(st)
                        r = _wait_step(st, st.src, POLLIN)
                    if r != STEP_AGAIN:
                        return r
                if st.via_pipe:
                    if st.pipe is None:
                        try:
                            st.pipe = _pipe_take()
                        except OSError as exc:
                            if not st.kmoved:
                                st.method = M_READWRITE  # EMFILE and co: no pipe
                                return STEP_FALLBACK
                            st.err = exc.errno or EIO
                            return STEP_ERROR
                    chunk = min(chunk, st.pipe.size - st.pipe_len)
                    n = os.splice(st.src, st.pipe.wfd, chunk, flags=SPLICE_F_NONBLOCK)
                else:
                    _arm_stall(st)
                    n = os.splice(st.src, st.dst, chunk, flags=SPLICE_F_NONBLOCK)
        except OSError as exc:
            # EINTR never comes here: the os functions retry it (PEP 475).
            # The stall timeout's EAGAIN does, and waits as any other.
            err = exc.errno or EIO
            if err == EAGAIN:
                if st.method == M_SPLICE and st.via_pipe and st.pipe_len > 0:
                    # A pipe source is empty, or our pipe is full: either
                    # way, what we hold goes out first.
                    st.draining = True
                    continue
                if st.method == M_SPLICE and st.via_pipe:
                    # Our pipe is empty, so the source has nothing: park
                    # without holding the pipe.
                    _release_pipe(st)
                    r = _wait_step(st, st.src, POLLIN)
                elif st.method == M_SPLICE:
                    r = _wait_both(st)
                else:
                    r = _wait_step(st, st.dst, POLLOUT)
                if r != STEP_AGAIN:
                    return r
                continue
            if not st.kmoved and _kernel_gives_up(st.method, err):
                if st.method == M_COPY_FILE_RANGE:
                    st.method = M_SENDFILE
                else:
                    st.method = M_READWRITE
                _release_pipe(st)
                return STEP_FALLBACK
            st.err = err
            return STEP_ERROR
        if n == 0:
            if st.pipe_len > 0:
                st.src_eof = True
                st.draining = True
                continue
            if not st.kmoved and st.method != M_SPLICE:
                # procfs and sysfs files report size 0 and copy_file_range
                # (or sendfile) moves nothing; read() decides whether this
                # really is the end.
                st.method = M_READWRITE
                return STEP_FALLBACK
            st.used = st.method
            _release_pipe(st)
            return STEP_DONE
        st.splice_retried = False
        if st.method == M_SPLICE and st.via_pipe:
            st.pipe_len += n
            _moved(st, n, False)
        else:
            _moved(st, n, True)


# ---------------------------------------------------------- read/write step
# The copy loop and its read/write step: _copy_step drives a copy, handing
# over to the kernel step while a kernel path is in use, else reading into
# pooled buffers and writing them out (_write_pending).


def _pending_views(st: CopyState) -> list[memoryview]:
    """The iovec of what is pending: the prefix, or the bytes in bufs."""
    if st.pre_len > 0:
        assert st.pre_ptr is not None
        return [st.pre_ptr]
    iov = []
    off = st.pend_off
    i = off // BUF_SIZE
    first = off - i * BUF_SIZE
    left = st.pend_len - off
    while left > 0:
        n = min(BUF_SIZE - first, left)
        iov.append(memoryview(st.bufs[i])[first : first + n])
        left -= n
        first = 0
        i += 1
    return iov


def _write_pending(st: CopyState) -> int:
    """Write what is pending; STEP_AGAIN once it is all out."""
    while st.pre_len > 0 or st.pend_len > 0:
        if st.cancel_req:
            return STEP_CANCELLED
        if st.dst_wait_first:
            r = _wait_ready(st, st.dst, POLLOUT)
            if r != STEP_AGAIN:
                return r
        iov = _pending_views(st)
        try:
            if st.dst_sock is not None:
                n = st.dst_sock.sendmsg(iov, (), MSG_NOSIGNAL | st.dst_send_flags)
            elif st.dst_nowait:
                try:
                    n = os.pwritev(st.dst, iov, -1, RWF_NOWAIT)
                except OSError as exc:
                    if exc.errno not in (EOPNOTSUPP, EINVAL):
                        raise
                    # An older kernel: no per-call non-blocking pipe write.
                    st.dst_nowait = False
                    st.dst_wait_first = True
                    continue
            else:
                n = os.writev(st.dst, iov)
        except OSError as exc:
            err = exc.errno or EIO
            if err == EAGAIN:  # == EWOULDBLOCK on Linux
                r = _wait_step(st, st.dst, POLLOUT)
                if r != STEP_AGAIN:
                    return r
                continue
            st.err = err
            return STEP_ERROR
        st.copied += n
        _progress(st)
        if st.pre_len > 0:
            st.pre_len -= n
            st.pre_ptr = st.pre_ptr[n:] if st.pre_len and st.pre_ptr is not None else None
        else:
            st.pend_off += n
            if st.pend_off == st.pend_len:
                st.pend_off = 0
                st.pend_len = 0
    return STEP_AGAIN


def _copy_step(st: CopyState) -> int:
    """Run the copy until it ends, fails, must wait (a pool copy parks) or
    must let signal handlers run; re-entered from the top to resume."""
    st.err = 0
    while True:
        if st.cancel_req:
            return STEP_CANCELLED
        r = _write_pending(st)
        if r != STEP_AGAIN:
            return r
        if st.method != M_READWRITE:
            _release(st)
            r = _kernel_step(st)
            if r != STEP_FALLBACK:
                return r
            continue
        if st.pipe_len > 0:
            r = _pipe_leftovers(st)
            if r != STEP_AGAIN:
                return r
            continue
        if st.pooled and st.copied >= st.slice_end:
            return STEP_YIELD
        if st.limit == 0:
            _release(st)
            return STEP_DONE
        if st.src_wait_first:
            # Holding buffers means bytes flowed a moment ago: look without
            # blocking first, and park only after giving the buffers back.
            if st.bufs:
                r = _wait(st, st.src, POLLIN, 0)
                if r < 0:
                    return STEP_SIGNALS if st.err == EINTR else STEP_ERROR
                if r == 0:
                    _release(st)
            if not st.bufs:
                r = _wait_step(st, st.src, POLLIN)
                if r != STEP_AGAIN:
                    return r
        elif st.poll_next:
            # The last read was short: the source is drained, and reading
            # again now would almost always be EAGAIN and then a poll.
            st.poll_next = False
            _release(st)
            r = _wait_step(st, st.src, POLLIN)
            if r != STEP_AGAIN:
                return r
        if st.want_max == 0:
            _size_reads_for_sink(st)
        if len(st.bufs) < st.want:
            _buffers_take(st.bufs, st.want - len(st.bufs))
            if not st.bufs:
                st.err = ENOMEM
                return STEP_ERROR
        want_bytes = min(len(st.bufs), st.want_max) * BUF_SIZE
        if 0 <= st.limit < want_bytes:
            want_bytes = st.limit
        iov = []
        left = want_bytes
        for buf in st.bufs:
            if left <= 0:
                break
            iov.append(memoryview(buf)[: min(left, BUF_SIZE)])
            left -= BUF_SIZE
        try:
            if st.src_sock is not None:
                n = st.src_sock.recvmsg_into(iov, 0, MSG_DONTWAIT)[0]
            elif st.src_nowait:
                try:
                    n = os.preadv(st.src, iov, -1, RWF_NOWAIT)
                except OSError as exc:
                    if exc.errno not in (EOPNOTSUPP, EINVAL):
                        raise
                    # An older kernel: no per-call non-blocking read on pipes.
                    st.src_nowait = False
                    st.src_wait_first = True
                    continue
            else:
                n = os.readv(st.src, iov)
        except OSError as exc:
            err = exc.errno or EIO
            if err == EAGAIN:  # == EWOULDBLOCK on Linux
                _release(st)
                r = _wait_step(st, st.src, POLLIN)
                if r != STEP_AGAIN:
                    return r
                continue
            st.err = err
            return STEP_ERROR
        del iov
        st.used = M_READWRITE
        if n == 0:
            _release(st)
            return STEP_DONE
        _progress(st)
        if st.limit > 0:
            st.limit -= n
        st.pend_off = 0
        st.pend_len = n
        # Not after the first read, though: a one-shot source (a reply, a
        # file's worth of bytes and EOF) has its end of file there already,
        # and one more read finds it without a poll.
        st.poll_next = (
            n < want_bytes
            and (st.src_is_socket or st.src_nowait)
            and st.copied > 0
            and not _emptied_full_pipe(st, n)
        )
        if st.splice_later and n >= _splice_min_read:
            # Bulk data: splice from here on (after these bytes are out).
            st.splice_later = False
            st.method = M_SPLICE
            continue
        # A full read means the source had more: read more per syscall next
        # time.  A short one means we are ahead of it: stay where we are.
        if n == want_bytes and st.want < st.want_max and want_bytes == len(st.bufs) * BUF_SIZE:
            st.want = min(st.want * 2, st.want_max)


def _size_reads_for_sink(st: CopyState) -> None:
    """Read no more per syscall than a pipe sink holds (see the core): a
    write larger than the pipe sleeps in the kernel each time it fills.
    Asked once, on the first read."""
    st.want_max = MAX_IOV
    if st.dst_kind == KIND_PIPE:
        try:
            size = fcntl.fcntl(st.dst, fcntl.F_GETPIPE_SZ)
        except OSError:
            size = 0
        if size > 0:
            st.want_max = min(max(size // BUF_SIZE, 1), MAX_IOV)
    if st.want > st.want_max:
        st.want = st.want_max


def _emptied_full_pipe(st: CopyState, n: int) -> bool:
    """Whether a short read took a whole pipe's worth: the producer is ahead,
    blocked on the full pipe, and is refilling it now, so the next read is
    made at once rather than after a poll.  The capacity is asked once, and
    only when a read was a multiple of the page size, as a full pipe's is."""
    if st.src_kind != KIND_PIPE or n & 4095 or st.src_pipe_size < 0:
        return False
    if st.src_pipe_size == 0:
        try:
            st.src_pipe_size = fcntl.fcntl(st.src, fcntl.F_GETPIPE_SZ)
        except OSError:
            st.src_pipe_size = -1
        if st.src_pipe_size <= 0:
            st.src_pipe_size = -1
            return False
    return n >= st.src_pipe_size


def _pipe_leftovers(st: CopyState) -> int:
    """Read what a refused splice left in the intermediate pipe into buffers.

    The bytes were already counted against the limit when they entered the
    pipe; the read/write loop writes them out like any other read.
    """
    assert st.pipe is not None
    if len(st.bufs) < MAX_IOV:
        _buffers_take(st.bufs, MAX_IOV - len(st.bufs))
        if not st.bufs:
            st.err = ENOMEM
            return STEP_ERROR
    left = min(st.pipe_len, len(st.bufs) * BUF_SIZE)
    iov = []
    for buf in st.bufs:
        if left <= 0:
            break
        iov.append(memoryview(buf)[: min(left, BUF_SIZE)])
        left -= BUF_SIZE
    try:
        n = os.readv(st.pipe.rfd, iov)
    except OSError as exc:
        n = -1
        st.err = exc.errno or EIO
    del iov
    if n <= 0:
        # Our own non-blocking pipe holding pipe_len bytes cannot fail to
        # give them; if it does, say so rather than drop them silently.
        if n == 0:
            st.err = EIO
        return STEP_ERROR
    st.pipe_len -= n
    st.pend_off = 0
    st.pend_len = n
    if st.pipe_len == 0:
        _release_pipe(st)
    return STEP_AGAIN


# -------------------------------------------------------------- path choice
# Path choice and the ends of a copy: the fds' kinds, the kernel path for the
# pair, the same-file check, _prepare before the loop, and _discard and
# _close_ends after it.


def _src_idle(st: CopyState) -> bool:
    """Whether a new copy whose source poll() found not readable would only
    wait: a pipe's read end with nothing in it, or a socket whose read would
    say EAGAIN.  A pipe's write end, a listening socket or one not connected,
    which poll() finds not readable either, fail at their first read
    instead, so they must run.

    Its source's kind and identity are kept, as _prepare would find them,
    and the poller's sweep compares the fd with.  False, and the copy runs
    as usual, for any other fd, or when a syscall fails (the copy's own
    first call reports it).
    """
    try:
        st.src_kind, st.src_dev, st.src_ino = _fd_kind(st.src)
    except OSError:
        return False
    st.src_known = True
    if st.src_kind == KIND_PIPE:
        # A read of nothing: b"" from a read end, EBADF from a write end.
        try:
            return os.read(st.src, 0) == b""
        except OSError:
            return False
    if st.src_kind != KIND_SOCKET:
        return False
    try:
        with _socket_view(st.src) as view:
            view.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _fd_kind(fd: int) -> tuple[int, int, int]:
    """(kind, st_dev, st_ino) of fd.

    Raises:
        OSError: fstat failed (EBADF...).
    """
    sb = os.fstat(fd)
    mode = sb.st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        kind = KIND_FILE
    elif stat.S_ISFIFO(mode):
        kind = KIND_PIPE
    elif stat.S_ISSOCK(mode):
        kind = KIND_SOCKET
    else:
        kind = KIND_CHAR
    return kind, sb.st_dev, sb.st_ino


def _is_nonblocking(fd: int) -> bool:
    """Whether fd is O_NONBLOCK.

    Raises:
        OSError: F_GETFL failed.
    """
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK != 0


def _choose_kernel_path(st: CopyState, in_main_thread: bool) -> int:
    """Pick the kernel path for this fd pair (st.method); -1 with st.err."""
    sk = st.src_kind
    dk = st.dst_kind
    try:
        if sk == KIND_CHAR or dk == KIND_CHAR:
            return 0  # ttys, /dev/zero, /dev/full: read/write
        if dk == KIND_FILE and fcntl.fcntl(st.dst, fcntl.F_GETFL) & os.O_APPEND:
            # An O_APPEND sink: copy_file_range refuses it (EBADF, which also
            # means a bad fd), splice and sendfile too; write() appends.
            return 0
        if dk == KIND_SOCKET and st.idle_ms >= 0 and not _is_nonblocking(st.dst):
            # Twin: where the core keeps its kernel path into a blocking
            # socket under idle_timeout, and interrupts a sendfile or splice
            # at the deadline with its idle alarm (a per-thread timer
            # signal), the twin sends by read/write, with MSG_DONTWAIT.  The
            # stall timeout (_arm_stall) does not serve here: Python retries
            # a call that a signal interrupts (PEP 475), and each retry
            # starts the timeout again, so under a storm of signals a
            # stalled call would never come back to see its deadline.
            return 0
        if sk == KIND_FILE and dk == KIND_FILE:
            st.method = M_COPY_FILE_RANGE
        elif sk == KIND_FILE and dk == KIND_SOCKET:
            st.method = M_SENDFILE
        else:
            st.method = M_SPLICE
            # Neither end a pipe: go through one of ours.  A pipe->file copy
            # goes through one too: splicing straight into the page cache
            # holds the producer's pipe locked and stalls it.
            st.via_pipe = not (dk == KIND_PIPE or (sk == KIND_PIPE and dk != KIND_FILE))
            st.fill_pipe = st.via_pipe and sk == KIND_PIPE
            if sk == KIND_SOCKET and _splice_min_read > 0:
                st.method = M_READWRITE
                st.splice_later = True
        # SPLICE_F_NONBLOCK covers only the pipe side, so a blocking socket
        # source can hold a splice as long as its peer is idle: it is polled
        # first where a tick or idle_timeout must interrupt that wait, where
        # the splice goes through a pooled pipe (an idle connection must
        # hold none), and in a pool copy, which parks instead of blocking.
        if in_main_thread or st.idle_ms >= 0 or st.via_pipe or st.pooled:
            if sk == KIND_SOCKET:
                st.ksrc_wait_first = not _is_nonblocking(st.src)
        # The core runs a pool copy's writes into a blocking socket under
        # its stall alarm; the twin runs every copy's under the stall
        # timeout (see _arm_stall).
        if dk == KIND_SOCKET:
            st.kdst_stall = STALL_ASK
    except OSError as exc:
        st.err = exc.errno or EIO
        return -1
    return 0


def _check_same_file(st: CopyState) -> int:
    """-1 with st.err = ERR_SAME_FILE if the copy would read what it wrote.

    ``cat f >> f``: with the same regular file at both ends (one fd, two
    dup'd fds, or two opens), reading to end of file chases the writes for
    ever (O_APPEND: the file grows until the disk is full), and overlapping
    ranges read back bytes already overwritten.  A counted copy between
    ranges that do not overlap is a legitimate move and goes ahead.
    """
    try:
        a = os.fstat(st.src)
        b = os.fstat(st.dst)
    except OSError:
        return 0  # the copy's own first syscall reports it
    if not (stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode)):
        return 0
    if a.st_dev != b.st_dev or a.st_ino != b.st_ino or st.limit == 0:
        return 0
    if st.limit > 0:
        try:
            so = os.lseek(st.src, 0, os.SEEK_CUR)
            if fcntl.fcntl(st.dst, fcntl.F_GETFL) & os.O_APPEND:
                do = b.st_size  # every write lands at the end
            else:
                do = os.lseek(st.dst, 0, os.SEEK_CUR)
        except OSError:
            so = do = -1
        # A shared offset (same fd, dup'd fds) gives so == do: overlapping.
        if so >= 0 and do >= 0:
            if (so <= do and do - so >= st.limit) or (do < so and so - do >= st.limit):
                return 0
    st.err = ERR_SAME_FILE
    return -1


def _prepare(st: CopyState, in_main_thread: bool, zerocopy: bool) -> int:
    """Look at both ends, choose the path and how to wait; -1 with st.err."""
    try:
        if not st.src_known:
            st.src_kind, st.src_dev, st.src_ino = _fd_kind(st.src)
        st.dst_kind, st.dst_dev, st.dst_ino = _fd_kind(st.dst)
        if st.src_kind == KIND_FILE and st.dst_kind == KIND_FILE and _check_same_file(st) < 0:
            return -1
        # Whether the source blocks only matters for pipes and devices
        # (sockets are read with MSG_DONTWAIT, regular files never block);
        # the sink's only when something must interrupt a blocked write.
        src_nb = dst_nb = False
        if st.src_kind in (KIND_PIPE, KIND_CHAR):
            src_nb = _is_nonblocking(st.src)
        if st.dst_kind != KIND_FILE and not st.pooled and (in_main_thread or st.idle_ms >= 0):
            dst_nb = _is_nonblocking(st.dst)
        st.src_is_socket = st.src_kind == KIND_SOCKET
        st.dst_is_socket = st.dst_kind == KIND_SOCKET
        st.src_nowait = not src_nb and st.src_kind == KIND_PIPE
        st.src_wait_first = not src_nb and st.src_kind == KIND_CHAR
        if st.src_kind == KIND_FILE:
            st.want = MAX_IOV
        if zerocopy and _choose_kernel_path(st, in_main_thread) < 0:
            return -1
        # In the main thread, poll with a tick, so that a signal landing just
        # before a blocking call still gets its handler run within the tick.
        st.wait_ms = MAIN_THREAD_TICK_MS if in_main_thread else -1
        # A blocking write can sit in the kernel for as long as the reader
        # stalls.  Where a tick, idle_timeout or a park must be able to
        # interrupt it, write without blocking (MSG_DONTWAIT for a socket,
        # RWF_NOWAIT for a pipe) and poll on EAGAIN; only devices, which
        # have neither flag, are polled first.
        if not dst_nb and (st.wait_ms >= 0 or st.idle_ms >= 0 or st.pooled):
            if st.dst_kind == KIND_SOCKET:
                st.dst_send_flags = MSG_DONTWAIT
            elif st.dst_kind == KIND_PIPE:
                st.dst_nowait = True
            elif st.dst_kind == KIND_CHAR:
                st.dst_wait_first = True
        if st.idle_ms >= 0:
            st.deadline_ms = _idle_deadline(st)
        # Twin: the socket objects that read and write a socket end.
        if st.src_is_socket:
            st.src_sock = _socket_over(st.src)
        if st.dst_is_socket:
            st.dst_sock = _socket_over(st.dst)
    except OSError as exc:
        st.err = exc.errno or EIO
        return -1
    return 0


def _discard(st: CopyState) -> None:
    # The copy is over: give the buffers and the pipe back.  Bytes still
    # pending are lost only when it ended in an error; a pipe still holding
    # some is closed, not pooled.  Twin: the socket objects let go of their
    # fds, and the wake eventfd is closed.
    _release(st)
    _release_pipe(st)
    _disarm_stall(st)
    for sock in (st.src_sock, st.dst_sock):
        if sock is not None:
            sock.detach()
    st.src_sock = st.dst_sock = None
    with st.wake_lock:
        if st.wake_fd >= 0:
            _close_quietly(st.wake_fd)
            st.wake_fd = -1
    st.pend_len = 0
    st.pre_len = 0
    st.pre_ptr = None


def _close_ends(st: CopyState) -> None:
    """The copy is over and its buffers are back: half-close, close."""
    if st.shut_wr_at_eof and st.status == STEP_DONE:
        # proxy(): the peer sees end of file the moment our source does.
        # shutdown() closes nothing, so the fd stays ours; ENOTSOCK (not a
        # socket) and ENOTCONN (peer gone) are nothing to report here.
        with contextlib.suppress(OSError), _socket_view(st.dst) as view:
            view.shutdown(socket.SHUT_WR)
    # An fd closed and reused under a parked copy (lost_fd) is someone
    # else's now.
    if st.close_src and st.src != st.lost_fd:
        _close_quietly(st.src)
    if st.close_dst and not (st.close_src and st.dst == st.src) and st.dst != st.lost_fd:
        _close_quietly(st.dst)


class _SocketView(socket.socket):
    """Twin: a socket object over the caller's fd, for recvmsg and sendmsg
    with per-call flags.  It never closes the fd: detached when dropped (a
    plain socket object closes its fd when collected, which after a fork or
    a lost reference would close a number the copy does not own)."""

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


_view_lock = threading.Lock()


def _socket_over(fd: int) -> socket.socket:
    """A socket object over the caller's fd, which leaves its flags as they were.

    Under ``socket.setdefaulttimeout()`` a new socket object sets O_NONBLOCK
    on its fd, even an existing one.  So the object gets timeout 0 (calls
    that would block raise BlockingIOError, which every caller here handles,
    and no flag changes), and a blocking fd gets its mode back.  Under one
    lock: two copies of a proxy make objects over the same fds, and one must
    not read the flag while the other has it changed.

    Raises:
        OSError: ENOTSOCK, and what making the object met.
    """
    if socket.getdefaulttimeout() is None:
        return _SocketView(fileno=fd)
    with _view_lock:
        blocking = os.get_blocking(fd)
        view = _SocketView(fileno=fd)
        view.settimeout(0.0)
        if blocking:
            os.set_blocking(fd, True)
    return view


@contextlib.contextmanager
def _socket_view(fd: int) -> Iterator[socket.socket]:
    """_socket_over(fd), detached again on the way out."""
    view = _socket_over(fd)
    try:
        yield view
    finally:
        view.detach()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _discard_sigpipe() -> None:
    # A SIGPIPE left pending in this thread by an EPIPE (it is blocked here):
    # consumed, so that the error reaches Python as BrokenPipeError and
    # nothing else happens (see the core's _compat.h).
    while signal.sigtimedwait({signal.SIGPIPE}, 0) is not None:
        pass


def _after_fork_in_child_views() -> None:
    global _view_lock
    _view_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child_views)


# ------------------------------------------------------------------- checks
# Errors and argument checks: _raise_errno, the one errno -> OSError, and the
# checks of an fd, a count and an idle_timeout (written once, in _checks).


def _raise_errno(err: int) -> None:
    if err == ERR_SAME_FILE:
        raise OSError(EINVAL, "src and dst are the same file: the copy would read what it wrote")
    # OSError(errno, msg) picks the subclass (BrokenPipeError, ...) itself.
    raise OSError(err, os.strerror(err))


def _check_idle_timeout(seconds: object) -> int:
    """idle_timeout in ms, or -1 for none (None, or above ``_checks.NEVER``)."""
    value = _check_idle_seconds(seconds)
    if value is None:
        return -1
    # Round up: a timeout must never fire early.
    return int(value * 1000.0 + 0.999)


# ------------------------------------------------------------------ CopyJob
# CopyJob, one copy runnable once, in the caller's thread or a pool worker;
# copy_fd() and fd_ready(), and the module-level names they use.


class CopyJob:
    """One copy from ``src_fd`` to ``dst_fd``, runnable once.

    ``copy_fd`` is ``CopyJob(...).run()`` in the caller's thread.  A
    ``PoolCore`` runs it in a worker instead; then ``bytes_copied`` can be
    read live from any thread, and ``task`` is what the completer reports to.

    Attributes:
        task: any object; the pool's completer calls ``task.complete(job)``.
        prologue: None, or a callable ``prologue(job)`` that a worker runs
            with the GIL before the copy (flushing a buffered writer, taking
            a reader's read-ahead).
    """

    __slots__ = ("st", "_started", "_prefix", "task", "_prologue", "_error", "_pool")

    def __init__(
        self,
        src_fd: int,
        dst_fd: int,
        count: int | None = None,
        *,
        zerocopy: bool = True,
        idle_timeout: float | None = None,
    ) -> None:
        st = self.st = CopyState(_check_fd(src_fd, "src_fd"), _check_fd(dst_fd, "dst_fd"))
        st.limit = _check_count(count)
        st.idle_ms = _check_idle_timeout(idle_timeout)
        st.zerocopy = bool(zerocopy)
        self._started = False
        self._prefix: bytes | None = None  # keeps the bytes at st.pre_ptr
        self.task: object = None
        self._prologue: Callable[[CopyJob], object] | None = None
        self._error: BaseException | None = None  # from the prologue (or the twin)
        self._pool: PoolCore | None = None  # the PoolCore that owns it, while it does

    @property
    def bytes_copied(self) -> int:
        """Bytes written to ``dst_fd`` so far; safe to read while running."""
        return self.st.copied

    @property
    def method(self) -> str | None:
        """The path in use: ``"copy_file_range"``, ``"sendfile"``, ``"splice"``
        or ``"readwrite"``; None until one has taken bytes from the source.

        Only a path that has moved bytes (or read the end of file) is named:
        a kernel path that the fd pair refuses falls back before it moves a
        byte, and is never reported.  A prefix (a buffered reader's
        read-ahead) is written first and is no path.  A socket source starts
        on ``"readwrite"`` and moves to ``"splice"`` once the data comes in
        bulk.
        """
        used = self.st.used
        return None if used < 0 else _METHOD_NAMES[used]

    @property
    def src_fd(self) -> int:
        return self.st.src

    @property
    def dst_fd(self) -> int:
        return self.st.dst

    @property
    def remaining(self) -> int | None:
        """Bytes still allowed by ``count``, or None without a count."""
        return None if self.st.limit < 0 else self.st.limit

    @property
    def finished(self) -> bool:
        """True once the copy has ended, successfully or not."""
        return self.st.status != STEP_AGAIN

    @property
    def started(self) -> bool:
        """True once the copy has begun, in this thread or a worker."""
        return self._started or self.st.in_worker or self.st.status != STEP_AGAIN

    @property
    def cancelled(self) -> bool:
        """True once the copy has ended because of ``cancel()``."""
        return self.st.cancelled

    def cancel(self) -> bool:
        """Ask the copy to stop, from any thread; True if it had not ended.

        A queued job stops before it copies a byte; a parked one (a pool
        copy waiting in the poller, or woken and queued to resume) ends at
        once, in the calling thread; a running one stops at its next step,
        and one waiting in its thread (``copy_fd`` on an idle fd, or a pool
        copy on an fd that epoll refuses) is woken at once through the
        eventfd it polls beside its fd (the compiled core sends its thread a
        signal instead).  Afterwards
        ``bytes_copied`` is exact (bytes read but not yet written are
        dropped) and ``result()`` raises ``CancelledError``.  ``run()`` in
        the caller's thread is stopped the same way.
        """
        st = self.st
        if st.status != STEP_AGAIN or st.orphan:
            return False
        st.cancel_req = True
        pool = self._pool
        if pool is not None:
            _pool_kick(pool, st)
        with st.wake_lock:
            if st.wake_fd >= 0:
                os.eventfd_write(st.wake_fd, 1)
        return True

    def orphan(self) -> None:
        """In a child after ``fork()``: the copy was submitted by the parent
        and goes on there.  Here no thread runs it, it never finishes, and
        ``cancel()`` does nothing (False): its pool state, its worker's
        thread and its poller slot are the parent's."""
        self.st.orphan = True
        self._pool = None

    def close_fds(self, src: bool, dst: bool) -> None:
        """Have the worker close these int fds when the copy ends."""
        self.st.close_src = bool(src)
        self.st.close_dst = bool(dst)

    def close_pair_with(self, other: CopyJob) -> None:
        """Have whichever of this job and ``other`` ends last close both fds:
        a proxy's two directions over the same two ends.

        Only a job that ends in a worker counts: if either never runs
        (taken off the queue), neither closes, and the caller closes both.

        Raises:
            ValueError: ``other`` is not the other direction over two
                different fds.
        """
        a, b = self.st, other.st
        if other is self or a.src != b.dst or a.dst != b.src:
            raise ValueError("close_pair_with() wants the other direction over the same fds")
        if a.src == a.dst:
            raise ValueError("close_pair_with() wants two different fds")
        a.partner = b
        b.partner = a

    def shut_wr_at_eof(self, on: bool) -> None:
        """Have the worker ``shutdown(dst, SHUT_WR)`` when the copy ends by
        reaching end of file (not on an error or a cancel)."""
        self.st.shut_wr_at_eof = bool(on)

    def prepend(self, data: bytes) -> None:
        """Queue ``data`` to be written before anything read from the source.

        The bytes count towards ``count`` and ``bytes_copied``.
        """
        st = self.st
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if self._started or st.status != STEP_AGAIN:
            raise RuntimeError("the copy has already started")
        n = len(data)
        if st.limit >= 0:
            if n > st.limit:
                raise ValueError("the prefix is longer than the remaining count")
            st.limit -= n
        self._prefix = data
        st.pre_ptr = memoryview(data) if n else None
        st.pre_len = n

    @property
    def prologue(self) -> Callable[[CopyJob], object] | None:
        return self._prologue

    @prologue.setter
    def prologue(self, value: Callable[[CopyJob], object] | None) -> None:
        self._prologue = value
        self.st.needs_prologue = value is not None

    def _run_prologue(self) -> int:
        # Called by a worker; 0, or -1 with the error kept.
        assert self._prologue is not None
        try:
            self._prologue(self)
        except BaseException as exc:  # noqa: B036 - delivered through the relay
            self._error = exc
            return -1
        return 0

    def result(self) -> int:
        """After a pool ran the job: the byte count, or raise its error.

        The completer asks this first of every finished job, so the prefix,
        written or dropped with the error by now, is let go here: a finished
        relay keeps its job, and the job none of the bytes.
        """
        st = self.st
        if st.status == STEP_AGAIN:
            raise RuntimeError("the job has not finished")
        self._prefix = None
        if st.status == STEP_DONE:
            return st.copied
        if self._error is not None:
            raise self._error
        self._raise_error()
        raise AssertionError("unreachable")  # _raise_error always raises

    def _raise_error(self) -> None:
        st = self.st
        if st.cancelled:
            raise _CancelledError()
        if st.idle_expired:
            raise TimeoutError(
                ETIMEDOUT, f"no byte moved for {st.idle_ms / 1000:g} s (idle_timeout)"
            )
        _raise_errno(st.err)

    def run(self) -> int:
        """Copy in this thread until end of file or ``count`` bytes.

        Returns:
            The number of bytes copied.

        Raises:
            OSError: with the errno of the failing syscall: EBADF for a bad
                or closed fd, EPIPE (BrokenPipeError) or ECONNRESET
                (ConnectionResetError) from a closed peer, ENOSPC from a full
                device, EISDIR for a directory, ...
            TimeoutError: no byte moved for ``idle_timeout`` seconds.
            RuntimeError: the job has already run.
            Exception: whatever a signal handler raises, such as
                KeyboardInterrupt, when run in the main thread.
        """
        st = self.st
        if self._started or st.status != STEP_AGAIN:
            raise RuntimeError("a CopyJob runs only once")
        self._started = True
        if _prepare(st, _in_main_thread(), st.zerocopy) < 0:
            st.status = STEP_ERROR
            _discard(st)
            _raise_errno(st.err)
        # SIGPIPE is blocked in this thread for the copy, and one left
        # pending by an EPIPE is consumed: a program that restored SIG_DFL
        # gets BrokenPipeError, not death (see the core's _compat.h).
        masked = False
        old: set[int | signal.Signals] = set()
        if st.dst_kind in (KIND_PIPE, KIND_SOCKET):
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
            masked = signal.SIGPIPE not in old
        try:
            while True:
                rc = _copy_step(st)
                if rc == STEP_CANCELLED:
                    st.cancelled = True
                    st.err = ECANCELED
                    rc = STEP_ERROR
                if rc == STEP_DONE:
                    st.status = STEP_DONE
                    return st.copied
                if rc == STEP_ERROR:
                    st.status = STEP_ERROR
                    self._raise_error()
                # STEP_SIGNALS: a main-thread tick, or a cancel's eventfd.
                # Unlike the core, nothing to do here: the interpreter runs
                # signal handlers between bytecodes by itself, and one that
                # raises has already left through _copy_step.
        finally:
            if masked:
                if st.err == EPIPE:
                    _discard_sigpipe()
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            # Bytes read but not written are lost only when run() raises.
            _discard(st)
            self._prefix = None


_METHOD_NAMES = ("readwrite", "copy_file_range", "sendfile", "splice")


def _in_main_thread() -> bool:
    return threading.get_ident() == threading.main_thread().ident


def copy_fd(src_fd: int, dst_fd: int, count: int | None = None, *, zerocopy: bool = True) -> int:
    """Copy from ``src_fd`` to ``dst_fd`` in this thread.

    Copies until end of file, or until ``count`` bytes, and returns when
    done.  Blocking and non-blocking fds both work: on EAGAIN the loop
    waits in ``poll`` and never spins.  Neither fd is closed, and their
    flags are left as they were.  The kernel path is chosen as for
    ``relay()``.  (The pure-Python twin holds the GIL between syscalls;
    the compiled core releases it for the whole copy.)

    In the main thread, signal handlers run within 100 ms even while the
    copy is blocked on an idle fd (PEP 475).  If a handler returns, the
    copy goes on with nothing lost; if it raises (``KeyboardInterrupt``),
    the exception gets out, and bytes read but not yet written are lost.

    Args:
        src_fd: the file descriptor to read from.
        dst_fd: the file descriptor to write to.
        count: the most bytes to copy, or None for everything.
        zerocopy: allow a kernel path where the fd pair has one; False
            forces the read/write loop with pooled buffers.

    Returns:
        The number of bytes copied.

    Raises:
        TypeError: an fd or the count is not an int (a ``bool`` is not).
        ValueError: an fd or the count is negative, an fd is above
            ``2**31 - 1``, or the count is above ``2**63 - 1``.
        OSError: the copy failed, with the errno of the failing syscall
            and its subclass: ``BrokenPipeError`` (EPIPE, never a
            SIGPIPE), ``ConnectionResetError``, ENOSPC from a full device,
            EBADF for a closed fd or one opened the wrong way,
            ``IsADirectoryError`` for a directory source, EINVAL when both
            fds are the same file and the copy would read what it wrote.
        Exception: whatever a signal handler raises in the main thread,
            such as ``KeyboardInterrupt``.
    """
    return CopyJob(src_fd, dst_fd, count, zerocopy=zerocopy).run()


def fd_ready(fd: int) -> bool:
    """True if reading ``fd`` now would not block (data, end of file or error)."""
    p = select.poll()
    p.register(_check_fd(fd, "fd"), POLLIN)
    return bool(p.poll(0))


# ---------------------------------------------------------------- pool core
# The worker pool's core: CWorker, WorkerHandle and PoolCore (the policy on
# the Python side lives in _pool.py).
#
# Workers are the threads that run copies.  A copy that must wait (nothing
# to read, or its sink full) is parked in the pool's poller and holds no
# thread; when its fd is ready it goes back to the queue and a worker resumes
# it where it stopped.  So the pool has as many threads as copies *run* at
# once, however many wait.
#
# A worker spends its whole life in PoolCore.worker_main.  With no copy to
# run it is either the leader, waiting in epoll_wait for parked copies (at
# most one worker is), or a follower, waiting on its own semaphore to be
# handed a copy: leader/followers.  The leader runs the first copy it wakes
# itself, so one connection becoming readable costs no hand-off between
# threads; further copies woken at once go to followers.  While the former
# leader runs its copy nobody polls, but only for as long as the copy moves
# less than SLICE_BYTES: at each slice a running copy looks at the pool
# (_look_at_pool) and hands the poller to a follower, or asks for a thread,
# if copies are left waiting.
#
# Threads are started by Python (_pool.py): submit() returns a WorkerHandle
# when it finds no idle worker, and a worker that needs another thread asks
# the completer, whose take_done() returns the handles to start.
#
# Twin: the core's lists threaded through CWorker and CopyState are Python
# lists and a deque; a worker's semaphore is a lock held until it is
# posted; and the conditions are notified under the lock, as
# threading.Condition requires (the core signals after the unlock).

# What _park does with a copy.
PARK_RETRY = 0  # not parked: run it again (cancelled, or wait in the thread)
PARK_DONE = 1  # parked: the worker moves on
PARK_FAILED = 2  # the poller refused with an errno: the copy ends with it
# Copies may wait this long in the queue, while every worker runs a copy,
# before the pool asks for another thread; and it asks for at most one per
# this long.  A backlog of short copies drains without new threads.
SPAWN_AFTER_MS = 2
# spawn_cap: this many workers per CPU the process may run on, and at least
# SPAWN_CAP_MIN.
SPAWN_CAP_PER_CPU = 2
SPAWN_CAP_MIN = 4


class CWorker:
    """One worker: its semaphore and what is handed to it."""

    __slots__ = ("wake", "job", "idle", "blocking", "coming", "exit_flag")

    def __init__(self) -> None:
        # The semaphore: held until posted (released), once per hand-out.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: CopyState | None = None  # set by whoever posts wake
        self.idle = False  # a follower, on the idle list
        self.blocking = False  # counted in n_blocking (see _before_blocking)
        self.coming = False  # counted in n_coming (see _maybe_spawn)
        self.exit_flag = False


class WorkerHandle:
    """A new worker's half, handed to the thread that will run it, once."""

    __slots__ = ("w",)

    w: CWorker | None


def _new_handle(w: CWorker) -> WorkerHandle:
    handle = WorkerHandle()
    handle.w = w
    return handle


class PoolCore:
    """The workers, the FIFO of ready copies, the poller of parked ones, and
    the finished copies.

    All of it lives under one lock, held for a few list moves (and one
    epoll_ctl when a copy parks).
    """

    def __init__(
        self, max_workers: int | None = None, idle_worker_timeout: float | None = None
    ) -> None:
        self.max_workers = -1 if max_workers is None else int(max_workers)  # -1: no limit
        # Past this many workers, copies that are merely ready (not stranded
        # by a worker about to block) wait for a running one instead of
        # getting a thread: a core runs one copy at a time, and a burst of
        # short copies is drained faster by a few threads than by a thread
        # each (in the twin, more so: they share one GIL).
        self.spawn_cap = max(SPAWN_CAP_MIN, SPAWN_CAP_PER_CPU * len(os.sched_getaffinity(0)))
        self.idle_ms = _check_idle_timeout(idle_worker_timeout)  # -1: never exit
        self.poller = Poller()
        self.peak = 0
        self.spawn_ms = 0  # when a thread was last asked for
        self.shutting_down = False
        # A caller's event loop that takes finished jobs itself
        # (take_ready): an eventfd it polls, written once per batch
        # (done_poked), in place of waking the completer.  -1: the
        # completer takes them.
        self.done_fd = -1
        self.done_poked = False
        self.reset_after_fork()

    def __del__(self) -> None:
        # As the core's __dealloc__: no worker is left (each holds the pool).
        if getattr(self, "done_fd", -1) >= 0:
            os.close(self.done_fd)
            self.done_fd = -1

    def reset_after_fork(self) -> None:
        """Start with no worker: in a child after ``os.fork()``, the parent's
        threads and the copies they ran are not here.  The poller's fds are
        the parent's epoll set: this process's copies of them are closed."""
        self.lock = threading.Lock()
        self.done_cond = threading.Condition(self.lock)
        # Threads blocked in Relay.result() that finish jobs themselves: a
        # finished job wakes one of them before it wakes the completer.
        self.helper_cond = threading.Condition(self.lock)
        self.helpers_waiting = 0
        self.idle_head: list[CWorker] = []  # followers, the most recently idle last
        self.leader: CWorker | None = None  # the idle worker in epoll_wait
        # A worker is in epoll_wait (the leader, or a busy one looking
        # without waiting).
        self.polling = False
        self.spawn_head: list[CWorker] = []  # made for the completer to start
        self.queue: deque[CopyState] = deque()  # ready copies: new, woken, yielding
        self.done: list[CopyState] = []
        self.n_workers = 0
        self.n_idle = 0
        self.n_busy = 0
        self.n_queued = 0
        self.n_blocking = 0  # workers blocked outside the pool's control
        self.n_coming = 0  # asked for by _maybe_spawn, not yet looked at the pool
        self.completer_waiting = False
        _poller_close(self.poller)
        # The loop that took finished jobs is the parent's: the child's
        # completer takes them.
        if self.done_fd >= 0:
            os.close(self.done_fd)
        self.done_fd = -1
        self.done_poked = False

    def stats(self) -> dict[str, int]:
        """The counts: ``workers``, ``idle`` (followers, and the leader),
        ``busy``, ``queued``, ``peak`` and ``parked``."""
        with self.lock:
            return {
                "workers": self.n_workers,
                "idle": self.n_idle + (1 if self.leader is not None else 0),
                "busy": self.n_busy,
                "queued": self.n_queued,
                "peak": self.peak,
                "parked": self.poller.n_parked,
            }

    def poller_fds(self) -> tuple[int, ...]:
        """The fds the poller holds (its epoll set and eventfd), if open."""
        with self.lock:
            p = self.poller
            return () if p.epfd is None else (p.epfd.fileno(), p.evfd)

    # -- the queue and the workers, all under the lock ---------------------

    def _note_busy(self) -> None:
        self.n_busy += 1
        if self.n_busy > self.peak:
            self.peak = self.n_busy

    def _unpolled(self) -> bool:
        # Copies are parked and nobody polls for them.
        return self.poller.n_parked > 0 and not self.polling

    def _has_room(self) -> bool:
        return self.max_workers < 0 or self.n_workers < self.max_workers

    def _spawn_room(self) -> bool:
        # Room for a thread for a copy that is only ready: see spawn_cap.
        return self._has_room() and self.n_workers - self.n_blocking < self.spawn_cap

    def _new_worker(self, st: CopyState | None) -> CWorker:
        # Counted at once, so that the room it takes is taken.
        w = CWorker()
        w.job = st
        self.n_workers += 1
        return w

    def _link_idle(self, w: CWorker) -> None:
        # From here on only a hand-out may write w.job, and only after taking
        # w off this list; it posts w.wake after the write.
        w.idle = True
        self.idle_head.append(w)
        self.n_idle += 1

    def _unlink_idle(self, w: CWorker) -> None:
        self.idle_head.remove(w)
        w.idle = False
        self.n_idle -= 1

    def _claim_idle(self, st: CopyState | None, wake: list[CWorker]) -> CWorker:
        # An idle follower gets st (or, with st None, is woken to look at the
        # pool); off the idle list, nothing else posts to it or lets it
        # leave, and it stays asleep until _post_all() posts it after the
        # unlock.
        w = self.idle_head.pop()
        w.idle = False
        self.n_idle -= 1
        w.job = st
        wake.append(w)
        return w

    def _post_all(self, wake: list[CWorker]) -> None:
        # After the unlock: a worker posted under the lock would block at
        # once on the lock it needs to take its job.
        for w in wake:
            w.wake.release()
        wake.clear()

    def _enqueue(self, st: CopyState) -> None:
        st.jstate = J_QUEUED
        st.queued_ms = _now_ms()
        self.queue.append(st)
        self.n_queued += 1

    def _pop_queue(self) -> CopyState:
        st = self.queue.popleft()
        st.jstate = J_RUNNING
        self.n_queued -= 1
        self._note_busy()
        return st

    def _dispatch(self, wake: list[CWorker]) -> None:
        """Hand queued copies to idle followers; if copies are still left,
        wake the leader to run one, or ask for a thread when they have
        waited too long."""
        while self.queue and self.idle_head:
            self._claim_idle(self._pop_queue(), wake)
        if self.queue:
            if self.leader is not None:
                _poller_poke(self.poller)
            else:
                self._maybe_spawn(False)

    def _maybe_spawn(self, now_please: bool) -> None:
        """Ask the completer for one more thread, if copies are stranded.

        Copies are stranded when they wait in the queue, or in the poller
        with no leader to poll for them, while every worker runs a copy.
        Unless now_please (a worker is about to block), they must have waited
        SPAWN_AFTER_MS, and the last thread must have been asked for as long
        ago: a backlog of short copies is drained by the threads there are.
        """
        if self.shutting_down or not self._has_room() or self.spawn_head:
            return
        if not now_please and not self._spawn_room():
            return
        if not self.queue and not self._unpolled():
            return
        # Threads asked for and not started yet will take those copies: a
        # thread that is slow to start (a busy machine) must not have every
        # worker that blocks meanwhile ask for one more.
        if self.n_coming >= self.n_queued + int(self._unpolled()):
            return
        if not now_please:
            now = _now_ms()
            if now - self.spawn_ms < SPAWN_AFTER_MS:
                return
            if self.queue and now - self.queue[0].queued_ms < SPAWN_AFTER_MS:
                if not self._unpolled():
                    return
            self.spawn_ms = now
        w = self._new_worker(None)
        w.coming = True
        self.n_coming += 1
        self.spawn_head.append(w)
        if self.completer_waiting:
            self.done_cond.notify()

    def _release_idle(self) -> None:
        # Idle followers leave (shutdown).
        while self.idle_head:
            w = self.idle_head.pop()
            w.idle = False
            self.n_idle -= 1
            self.n_workers -= 1
            w.exit_flag = True
            w.wake.release()
        if self.n_workers == 0 and self.completer_waiting:
            self.done_cond.notify()

    # -- the Python side's calls ------------------------------------------

    def _check_submit(self, job: CopyJob) -> None:
        st = job.st
        if job._started or st.status != STEP_AGAIN or st.owner is not None:
            raise RuntimeError("a CopyJob runs only once")

    def _own(self, job: CopyJob) -> None:
        # The pool holds the job from here until take_done() (st.owner), and
        # the job the pool, for cancel() to reach a parked copy.
        job.st.owner = job
        job.st.pooled = True
        job._pool = self

    def _disown(self, job: CopyJob) -> None:
        job.st.owner = None
        job._pool = None

    def _place(self, job: CopyJob, wake: list[CWorker]) -> bool | WorkerHandle:
        """Under the lock: give job to an idle follower (True), queue it for
        the leader or a running worker (False), or to a new worker (its
        WorkerHandle)."""
        st = job.st
        if not self.queue and self.idle_head:
            self._own(job)
            st.jstate = J_RUNNING
            self._note_busy()
            self._claim_idle(st, wake)
            return True
        if self.leader is None and self._spawn_room():
            handle = _new_handle(self._new_worker(st))
            self._own(job)
            st.jstate = J_HANDED
            self._note_busy()
            return handle
        # The leader (poked here) or a worker finishing its copy takes it.
        self._own(job)
        self._enqueue(st)
        self._dispatch(wake)
        return False

    def submit(self, job: CopyJob) -> bool | WorkerHandle:
        """Hand a job to an idle worker, or queue it.

        Returns:
            True when an idle worker took the job, False when it was queued
            (the leader or a running worker takes it), or a WorkerHandle
            when a new worker must be started for it (the caller starts a
            thread running ``worker_main(handle)``).

        Raises:
            RuntimeError: after shutdown().
        """
        wake: list[CWorker] = []
        self._check_submit(job)
        with self.lock:
            if self.shutting_down:
                raise RuntimeError("cannot start a relay after shutdown")
            placed = self._place(job, wake)
        self._post_all(wake)
        return placed

    def submit_pair(
        self, a: CopyJob, b: CopyJob
    ) -> tuple[bool | WorkerHandle, bool | WorkerHandle]:
        """Submit both jobs of a proxy, or neither (RuntimeError).

        Returns:
            What ``submit()`` returns, for each.
        """
        wake: list[CWorker] = []
        self._check_submit(a)
        self._check_submit(b)
        if a is b:
            raise RuntimeError("a CopyJob runs only once")
        # One poll for both sources, before the lock.  Only while a leader
        # polls (read here without the lock, as a hint; under it, looked at
        # again): it watches a parked copy from the start, and otherwise a
        # copy that is ready and one that waits take the same road.
        idle = [False, False]
        if self.leader is not None and self._may_park_first(a) and self._may_park_first(b):
            poller = select.poll()
            poller.register(a.st.src, select.POLLIN)
            if b.st.src != a.st.src:
                poller.register(b.st.src, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(0)}
            idle = [
                a.st.src not in ready and _src_idle(a.st),
                b.st.src not in ready and _src_idle(b.st),
            ]
        with self.lock:
            if self.shutting_down:
                raise RuntimeError("cannot start a relay after shutdown")
            for_a = False if self._park_first(a, idle[0]) else self._place(a, wake)
            for_b = False if self._park_first(b, idle[1]) else self._place(b, wake)
        self._post_all(wake)
        return for_a, for_b

    def _park_first(self, job: CopyJob, idle: bool) -> bool:
        """Under the lock: park a new job whose source has nothing to read
        (idle) in the poller at once, instead of waking a worker only to
        find that out; False if it must be placed as usual."""
        st = job.st
        if not idle or self.leader is None:
            return False
        st.park_fd = st.src
        st.park_events = POLLIN
        if _poller_arm(self.poller, st):
            return False  # epoll takes no such fd (EPERM): it runs as usual
        self._own(job)
        # Parked: it has started, as a copy that parked after running has.
        st.in_worker = True
        return True

    @staticmethod
    def _may_park_first(job: CopyJob) -> bool:
        # A fresh job with nothing to do before its first read: no Python
        # prologue (read-ahead to deliver, a writer to flush) and no idle
        # deadline (the heap wants one set by the copy itself).
        st = job.st
        return not st.needs_prologue and st.idle_ms < 0 and not st.cancel_req

    def unqueue(self, job: CopyJob) -> bool:
        """Take a job off the queue, or back from a new worker whose thread
        has not taken it, if no worker has ever run it; True if taken (it
        will never run)."""
        st = job.st
        found = False
        if st.orphan:
            return False  # the parent's queue, not this process's
        with self.lock:
            if st.jstate == J_QUEUED and not st.in_worker:
                self._unlink_queued(st)
                st.jstate = J_DONE
                found = True
            elif st.jstate == J_HANDED:
                # The thread that is to start this worker may be the caller
                # (a shutdown or cancel inside Thread.start()), so nothing may
                # wait for that thread.  The worker still points at st: the
                # pool's hold stays until the worker's thread takes it, or
                # abandon() undoes the worker, and that one lets it go.
                st.jstate = J_DONE
                self.n_busy -= 1
                return True
        if found:
            self._disown(job)  # the pool's hold
        return found

    def _kick(self, st: CopyState) -> None:
        """CopyJob.cancel() on a pool copy.  One that no worker holds (parked,
        or queued to resume) is stopped here and now, in the caller's thread:
        it needs no worker to end, however busy the pool.  A running one sees
        the flag at its next step (or its wait's eventfd); one that never ran
        sees it when it starts (or Python takes it off the queue)."""
        mine = False
        with self.lock:
            if st.jstate == J_PARKED:
                _poller_unpark(self.poller, st, 0)
                mine = True
            elif st.jstate == J_QUEUED and st.in_worker:
                self._unlink_queued(st)
                mine = True
            if mine:
                st.jstate = J_RUNNING  # this thread's until it is filed as done
        if mine:
            st.cancelled = True
            st.err = ECANCELED
            st.status = STEP_ERROR
            self._end(st)
            with self.lock:
                self._file_done(st)

    def _unlink_queued(self, st: CopyState) -> None:
        # Under the lock: take st, which is queued, off the queue.
        self.queue.remove(st)
        self.n_queued -= 1

    def _file_done(self, st: CopyState) -> None:
        """Under the lock: st is over; it goes to the done list, for the
        completer (or a thread helping in result()), which is woken."""
        st.jstate = J_DONE
        self.done.append(st)
        # A helper first: it completes the relay in the thread that waits
        # for it.
        if self.helpers_waiting:
            self.helper_cond.notify()
        elif self.done_fd >= 0:
            # Once per batch: take_ready() clears it when it takes them.
            if not self.done_poked:
                self.done_poked = True
                os.eventfd_write(self.done_fd, 1)
        elif self.completer_waiting:
            self.done_cond.notify()

    def abandon(self, handle: WorkerHandle) -> CopyJob | None:
        """The thread for a new worker could not start: undo it.

        Safe on a handle whose thread did start (then it does nothing), and
        on one abandoned before.

        Returns:
            The job it was to run first, to be failed by the caller; or None.
        """
        wake: list[CWorker] = []
        with self.lock:
            # Taken under the lock, as worker_main() takes it: exactly one
            # of the two gets it.
            w = handle.w
            handle.w = None
            if w is None:
                # Its thread did start and took the worker, or this handle
                # was abandoned already: the caller cancels the relay instead.
                return None
            st = w.job
            w.job = None
            self.n_workers -= 1
            if w.coming:
                self.n_coming -= 1
            taken_back = False
            if st is not None and st.jstate == J_HANDED:
                self.n_busy -= 1
                st.jstate = J_DONE
            elif st is not None:
                taken_back = True  # by unqueue(), which counted it out
            # Copies the missing thread was to run are the others' now.
            self._dispatch(wake)
            if self.n_workers == 0 and self.completer_waiting:
                self.done_cond.notify()
        self._post_all(wake)
        if st is None:
            return None
        job = st.owner
        assert job is not None
        self._disown(job)
        return None if taken_back else job

    def take_done(self) -> tuple[list[CopyJob], list[WorkerHandle]] | None:
        """Wait for finished jobs, or threads to start, and take them all.

        The completer thread's loop.

        Returns:
            ``(jobs, handles)``: the CopyJobs that finished, in the order
            they ended, and WorkerHandles of new workers to start a thread
            for; None once the pool is shut down and has no worker and no
            finished job left, which tells the completer to exit.
        """
        with self.lock:
            while (
                not self.done
                and not self.spawn_head
                and not (self.shutting_down and self.n_workers == 0 and not self.queue)
            ):
                self.completer_waiting = True
                try:
                    self.done_cond.wait()
                finally:
                    self.completer_waiting = False
            head, self.done = self.done, []
            spawn, self.spawn_head = self.spawn_head, []
        if not head and not spawn:
            return None
        return self._adopt(head), [_new_handle(w) for w in spawn]

    def completer_asleep(self) -> bool:
        """Whether the completer thread waits in take_done() for a wake-up."""
        with self.lock:
            return self.completer_waiting

    def ready_fd(self) -> int:
        """Have the caller's event loop take finished jobs: return an fd
        that turns readable when some are ready for take_ready().

        From then on a finished job no longer wakes the completer thread
        (which still starts the threads the core asks for, and takes what
        it finds when it wakes).

        Raises:
            OSError: no eventfd could be made.
        """
        with self.lock:
            if self.done_fd < 0:
                self.done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            # Jobs that finished before: the loop's first look takes them.
            if self.done and not self.done_poked:
                self.done_poked = True
                os.eventfd_write(self.done_fd, 1)
            return self.done_fd

    def take_ready(self) -> list[CopyJob]:
        """Take every finished job without waiting (the loop of ready_fd()).

        Returns:
            The CopyJobs that finished, in the order they ended; possibly
            none.
        """
        # Read before the list is taken: a job filed after this read pokes
        # again, or is in the list taken below.
        if self.done_fd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.done_fd)
        with self.lock:
            head, self.done = self.done, []
            self.done_poked = False
        return self._adopt(head)

    def help_done(self, job: CopyJob, timeout: float) -> list[CopyJob]:
        """Wait up to ``timeout`` seconds for ``job`` to finish, taking over
        the completer's work meanwhile.

        A thread about to block in ``Relay.result()`` calls this, so the
        common pattern, submit then wait, completes futures in the waiting
        thread, with no hand-over to the completer and back.

        Returns:
            The finished jobs it took (possibly empty), for the caller to
            complete.
        """
        st = job.st
        deadline_ms = -1
        if timeout >= 0:
            deadline_ms = _now_ms() + int(timeout * 1000.0)
        with self.lock:
            while not self.done and st.status == STEP_AGAIN:
                wait_s = None
                if deadline_ms >= 0:
                    left = deadline_ms - _now_ms()
                    if left <= 0:
                        break
                    wait_s = left / 1000.0
                self.helpers_waiting += 1
                try:
                    self.helper_cond.wait(wait_s)
                finally:
                    self.helpers_waiting -= 1
            head, self.done = self.done, []
            if head and self.helpers_waiting:
                # Other helpers' jobs may be in this batch: let them look.
                self.helper_cond.notify_all()
        return self._adopt(head)

    def _adopt(self, head: list[CopyState]) -> list[CopyJob]:
        # Turn the finished states into their CopyJobs, taking over the
        # pool's hold on them.
        jobs = []
        for st in head:
            job = st.owner
            assert job is not None
            st.owner = None
            job._pool = None
            jobs.append(job)
        return jobs

    def shutdown(self, cancel_queued: bool) -> list[CopyJob]:
        """Refuse new jobs and let idle workers exit; parked and running
        copies go on to their end.

        Returns:
            With ``cancel_queued``, the jobs taken off the queue that never
            ran (copies that ran and wait to resume stay queued).
        """
        taken: list[CopyState] = []
        with self.lock:
            self.shutting_down = True
            if cancel_queued:
                kept: deque[CopyState] = deque()
                for cur in self.queue:
                    if cur.in_worker:
                        kept.append(cur)
                    else:
                        self.n_queued -= 1
                        cur.jstate = J_DONE
                        taken.append(cur)
                self.queue = kept
            self._release_idle()
            _poller_poke(self.poller)
            self.done_cond.notify()
        jobs = []
        for st in taken:
            job = st.owner
            assert job is not None
            jobs.append(job)
            self._disown(job)
        return jobs

    # -- the worker's side -------------------------------------------------

    def worker_main(self, handle: WorkerHandle) -> None:
        """The body of a worker thread: returns when the worker exits."""
        with self.lock:
            # Taken under the lock, as abandon() takes it: exactly one of
            # the two gets it.  abandon() won if an exception hit the
            # starting thread before this ran: nothing is ours.
            w = handle.w
            handle.w = None
            if w is None:
                return
            # A worker made by submit() has its first copy already, unless
            # unqueue() took it back meanwhile: then the pool's hold on it
            # is this thread's to let go.
            st = w.job
            w.job = None
            handed = False
            if st is not None and st.jstate == J_HANDED:
                handed = True
                st.jstate = J_RUNNING
        if st is not None and not handed:
            assert st.owner is not None
            self._disown(st.owner)
            st = None
        # For the thread's life, as the core's workers (see _discard_sigpipe).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
        if st is None:
            st = self._next_job(w, None)
        while st is not None:
            r = self._run(w, st)
            if r == STEP_PARK:
                r = self._park(w, st)
                if r == PARK_RETRY:
                    continue
                if r == PARK_DONE:
                    st = self._next_job(w, None)
                    continue
            elif r == STEP_YIELD:
                st = self._yield(st)
                continue
            self._end(st)
            st = self._next_job(w, st)

    def _run(self, w: CWorker, st: CopyState) -> int:
        """Run st until it ends (STEP_DONE, with st.status set), must wait
        (STEP_PARK) or has moved a slice (STEP_YIELD)."""
        try:
            if not st.prepared:
                st.prepared = True
                st.in_worker = True
                if st.needs_prologue and not st.cancel_req:
                    # Python code that may wait, or block in a flush: copies
                    # must not be left stranded meanwhile.
                    self._before_blocking(w)
                    assert st.owner is not None
                    r = st.owner._run_prologue()
                    with self.lock:
                        self._unblocked(w)
                    if r < 0:
                        st.status = STEP_ERROR
                        st.err = 0  # the error is a Python exception on the job
                        return STEP_DONE
                if _prepare(st, False, st.zerocopy) < 0:
                    st.status = STEP_ERROR
                    return STEP_DONE
            st.slice_end = st.copied + SLICE_BYTES
            try:
                while True:
                    r = _copy_step(st)
                    # A slice moved: the pool gets a look, and the copy goes
                    # on here, holding its buffers and its pipe, unless
                    # another copy is owed this thread.
                    if r == STEP_YIELD and not self._look_at_pool():
                        st.slice_end = st.copied + SLICE_BYTES
                    # A cancel's eventfd ended a wait in this thread: the
                    # next step sees the flag.
                    elif r != STEP_SIGNALS:
                        break
            finally:
                _disarm_stall(st)
        except BaseException as exc:  # noqa: B036 - a worker must go on
            # Twin: Python code can raise where C cannot (no memory, a bug):
            # the copy fails with it, as with a prologue's error, and the
            # worker goes on to the next.
            assert st.owner is not None
            st.owner._error = exc
            st.status = STEP_ERROR
            st.err = 0
            return STEP_DONE
        if r in (STEP_PARK, STEP_YIELD):
            return r
        if r == STEP_CANCELLED:
            st.cancelled = True
            st.err = ECANCELED
            r = STEP_ERROR
        st.status = r
        return STEP_DONE

    def _park(self, w: CWorker, st: CopyState) -> int:
        """Park st in the poller: a PARK_* outcome."""
        reading = (st.park_events & POLLIN) != 0
        # A parked copy holds no buffer and no pipe, unless they hold bytes
        # not yet written (then it waits for its sink, to write them).
        if st.pend_len == 0:
            _release(st)
        if st.pipe_len == 0:
            _release_pipe(st)
        with self.lock:
            if st.cancel_req:
                # cancel() came between the copy's last look and this lock:
                # it found the copy running, so it must stop itself.
                return PARK_RETRY
            err = _poller_open(self.poller)
            if not err:
                err = _poller_arm(self.poller, st)
            if not err:
                self.n_busy -= 1
                if self.leader is not None and st.heap_idx == 0:
                    _poller_poke(self.poller)  # a deadline earlier than the leader's
                return PARK_DONE
        if err in (EPERM, EBUSY):
            # epoll takes no such fd, or another copy waits on it the same
            # way: this copy waits for it in its thread, as in a caller's.
            if st.park_fd == st.src and reading:
                st.src_unpollable = True
            else:
                st.dst_unpollable = True
            self._before_blocking(w)
            return PARK_RETRY
        st.err = err
        st.status = STEP_ERROR
        return PARK_FAILED

    def _before_blocking(self, w: CWorker) -> None:
        # The running worker is about to block outside the pool's control
        # (until _unblocked): it no longer counts against spawn_cap, and
        # copies that wait for a thread, or a poller without a leader, get
        # an idle follower or a new thread now.
        wake: list[CWorker] = []
        with self.lock:
            if not w.blocking:
                w.blocking = True
                self.n_blocking += 1
            if self.queue or self._unpolled():
                self._dispatch(wake)
                if self._unpolled() and self.idle_head:
                    self._claim_idle(None, wake)  # it becomes the leader
                self._maybe_spawn(True)
        self._post_all(wake)

    def _unblocked(self, w: CWorker) -> None:
        # Under the lock: w runs under the pool's control again.
        if w.blocking:
            w.blocking = False
            self.n_blocking -= 1

    def _look_at_pool(self) -> bool:
        """A running copy has moved a slice: poll for parked copies nobody
        polls for, hand queued ones to idle followers, and say whether the
        copy must give its thread to one of them (a pool at its thread bound
        with copies waiting: they take turns)."""
        wake: list[CWorker] = []
        switch = False
        with self.lock:
            if self._unpolled():
                if self.idle_head:
                    self._claim_idle(None, wake)  # it becomes the leader
                elif self._spawn_room():
                    self._maybe_spawn(False)
                else:
                    self._poll_now()
            if self.queue:
                self._dispatch(wake)
                switch = bool(self.queue) and not self._spawn_room()
        self._post_all(wake)
        return switch

    def _yield(self, st: CopyState) -> CopyState:
        """st gives its thread to the copy at the head of the queue and
        waits its turn at the tail; return the copy to run (st itself, if
        the queue emptied meanwhile)."""
        nxt = st
        # Nothing is pending at a slice's end: the buffers and an empty pipe
        # go back, so that a copy waiting its turn holds neither.  Before
        # the copy is queued: from then on another worker may run it.
        _release(st)
        _release_pipe(st)
        with self.lock:
            if self.queue:
                self.n_busy -= 1
                self._enqueue(st)
                nxt = self._pop_queue()
        return nxt

    def _poll_now(self) -> None:
        """Under the lock, with no leader: take what is ready without
        waiting (a worker of a full pool running a long copy)."""
        epfd = self.poller.epfd
        assert epfd is not None
        self.polling = True
        self.lock.release()
        try:
            evs = epfd.poll(0, POLL_EVENTS)
        except OSError:
            evs = []
        finally:
            self.lock.acquire()
            self.polling = False
        self._enqueue_all(_poller_events(self.poller, evs) if evs else [])

    def _enqueue_all(self, woken: list[CopyState]) -> None:
        for st in woken:
            self._enqueue(st)

    def _end(self, st: CopyState) -> None:
        """st has ended: out of the poller, buffers back, ends closed."""
        if st.status == STEP_ERROR and st.err == EPIPE:
            _discard_sigpipe()
        last = False
        partner = st.partner
        if st.reg_src or st.reg_dst or partner is not None:
            with self.lock:
                # Before its fds close: the number may be reused at once.
                _poller_release(self.poller, st)
                if partner is not None:
                    st.pair_ended = True
                    last = partner.pair_ended
        _discard(st)
        _close_ends(st)
        if last:
            assert partner is not None
            # Both directions are over and out of the poller: this worker
            # closes the proxy's two fds.  An fd closed and reused under a
            # parked copy is not ours.
            for fd in (st.src, st.dst):
                if fd not in (st.lost_fd, partner.lost_fd):
                    _close_quietly(fd)
            # The two states refer to each other: a cycle for the collector.
            st.partner = partner.partner = None

    def _next_job(self, w: CWorker, done: CopyState | None) -> CopyState | None:
        """File a finished copy (if any) and find the next one to run: from
        the queue, as the leader, or handed over as a follower.  None when
        the worker must exit."""
        st: CopyState | None = None
        wake: list[CWorker] = []
        counted_out = False
        self.lock.acquire()
        try:
            if w.coming:
                # Here at last: from this lock on, it takes what it was asked for.
                w.coming = False
                self.n_coming -= 1
            self._unblocked(w)  # a copy that waited in its thread has ended or parked
            if done is not None:
                self._file_done(done)
                self.n_busy -= 1
            while True:
                if self.queue:
                    st = self._pop_queue()
                    self._dispatch(wake)
                    break
                if self.shutting_down and (self.poller.n_parked == 0 or self.polling):
                    break  # the leader stays for the parked copies
                # This worker is about to wait: whoever it was to wake must
                # not wait with it.
                if wake:
                    self._post_all(wake)
                if self._unpolled():
                    self._lead(w)
                    continue
                if self._follow(w) < 0:
                    counted_out = True
                    break
                if w.job is not None:
                    st = w.job
                    w.job = None
                    break
                # Woken with no copy: to lead, or to look at the queue.
            if st is None:
                if not counted_out:
                    self.n_workers -= 1
                if self.n_workers == 0:
                    if self.poller.n_parked == 0:
                        _poller_close(self.poller)
                    if self.completer_waiting:
                        self.done_cond.notify()
        finally:
            self.lock.release()
        self._post_all(wake)
        return st

    def _lead(self, w: CWorker) -> None:
        """Under the lock: wait in epoll_wait for parked copies and queue the
        ones that are ready (or whose deadline, or fd, is gone)."""
        epfd = self.poller.epfd
        assert epfd is not None
        self.leader = w
        self.polling = True
        now = _now_ms()
        if self.poller.sweep_ms == 0:
            self.poller.sweep_ms = now + _sweep_ms
        timeout = _poller_timeout(self.poller, now)
        self.lock.release()
        try:
            evs = epfd.poll(timeout / 1000.0 if timeout >= 0 else -1, POLL_EVENTS)
        except OSError:
            evs = []
        finally:
            self.lock.acquire()
            self.leader = None
            self.polling = False
        self._enqueue_all(_poller_events(self.poller, evs) if evs else [])
        now = _now_ms()
        self._enqueue_all(_poller_expired(self.poller, now))
        if self.poller.n_parked and now >= self.poller.sweep_ms:
            self._enqueue_all(_poller_sweep(self.poller, now))

    def _follow(self, w: CWorker) -> int:
        """Under the lock: wait idle on the semaphore.  0 when posted (with
        w.job set, or woken to look at the pool); -1 when the worker must
        exit, already counted out of n_workers."""
        self._link_idle(w)
        self.lock.release()
        while True:
            try:
                if self.idle_ms >= 0:
                    posted = w.wake.acquire(timeout=self.idle_ms / 1000.0)
                else:
                    posted = w.wake.acquire()
            finally:
                self.lock.acquire()
            if posted:
                return -1 if w.exit_flag else 0
            # Timed out: leave the pool, unless a copy or the exit sentinel
            # was handed over just now (then w is no longer on the idle list
            # and the post is on its way).
            if w.idle:
                self._unlink_idle(w)
                self.n_workers -= 1
                return -1
            self.lock.release()


def _pool_kick(pool: PoolCore, st: CopyState) -> None:
    # CopyJob.cancel() for a copy its pool owns (see PoolCore._kick).
    pool._kick(st)
