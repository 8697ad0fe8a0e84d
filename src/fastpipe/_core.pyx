# cython: language_level=3, embedsignature=True
"""The compiled core: a free-list of 32 KiB buffers and a GIL-free copy loop.

Ownership rules, which every function below keeps:

* A buffer belongs either to the free-list or to exactly one ``CopyJob``.
  It is never exposed to Python code, so it can be used without the GIL.
* A ``CopyJob`` holds buffers only while bytes are in flight.  Before it
  waits for an idle source it gives them back, so a relay parked on an idle
  fd costs no buffer memory.
* The copy loop runs with the GIL released from start to end.  It only
  returns to GIL-held code to finish, to raise, or to let signal handlers
  run (PEP 475); all its state lives in ``CopyState`` so it resumes exactly
  where it stopped.
"""

from libc.stdlib cimport free, malloc
from libc.string cimport memset
from libc.errno cimport (
    errno, EINTR, EAGAIN, ENOMEM, EBADF, ETIMEDOUT, EINVAL, EOPNOTSUPP,
)
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.uio cimport iovec
from cpython.exc cimport PyErr_CheckSignals
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

import os as _os
import threading as _threading
from concurrent.futures import CancelledError as _CancelledError

from fastpipe._syscalls cimport (
    ECANCELED, EIO, ENOSYS, EPERM, EPIPE, EXDEV, FIONREAD, FP_CANCELLABLE, F_GETFL,
    F_GETPIPE_SZ, F_SETPIPE_SZ, MSG_DONTWAIT, MSG_NOSIGNAL, O_APPEND, O_CLOEXEC, O_NONBLOCK,
    POLLIN, POLLNVAL, POLLOUT, RWF_NOWAIT, SEEK_CUR, SHUT_WR, SPLICE_F_NONBLOCK, S_ISBLK,
    S_ISFIFO, S_ISREG, S_ISSOCK, close, copy_file_range, fcntl, fp_alarm, fp_alarm_arm,
    fp_alarm_disarm, fp_alarm_free, fp_block_sigpipe, fp_cond_init_monotonic,
    fp_cond_wait_until_ms, fp_discard_sigpipe, fp_install_wake_signal, fp_load_int, fp_load_ll,
    fp_sem_wait_ms, fp_set_sigmask, fp_sigpipe_blocked_in, fp_store_int, fp_store_ll, fstat,
    ioctl, lseek, msghdr, pipe2, poll, pollfd, preadv2, pthread_cond_broadcast,
    pthread_cond_init, pthread_cond_signal, pthread_cond_t, pthread_cond_wait, pthread_kill,
    pthread_mutex_init, pthread_mutex_lock, pthread_mutex_t, pthread_mutex_trylock,
    pthread_mutex_unlock, pthread_self,
    pthread_setname_np, pthread_t, pwritev2, readv, recvmsg, sem_destroy, sem_init, sem_post,
    sem_t, sem_wait, sendfile, sendmsg, shutdown, sigset_t, splice, stat, writev,
)


cdef enum:
    BUF_SIZE = 32768
    # Buffers per readv: up to 512 KiB per syscall.  Moving more per call is
    # what beats a 32 KiB read/write loop; the card keeps 32 KiB buffers.
    MAX_IOV = 16
    # Where a source of unknown size starts; it doubles while reads fill it.
    START_IOV = 2
    # How often a copy blocked in the main thread comes back for signals.
    MAIN_THREAD_TICK_MS = 50
    # The intermediate pipe: 1 MiB needed the fewest calls (256 KiB cost 50%
    # more CPU, 64 KiB twice as much).
    PIPE_SIZE = 1 << 20
    # Idle pipes kept: each counts against pipe-user-pages-soft (64 MiB by
    # default) whether or not it holds bytes.
    PIPE_POOL_MAX = 16
    # Most bytes per copy_file_range/sendfile/direct splice call: large enough
    # that the call count does not matter, small enough that bytes_copied
    # moves and a cancel is seen every few milliseconds.
    KERNEL_CHUNK = 8 << 20
    # A socket source starts on read/write and switches to splice once one
    # read returns this much: small messages are cheaper through buffers,
    # and an idle connection then never holds a pipe.
    SPLICE_MIN_READ = 64 * 1024
    # st.err for a copy of a file onto itself that would read back its own
    # writes: EINVAL, with a message that says why (not an errno).
    ERR_SAME_FILE = -1

cdef enum Method:
    M_READWRITE = 0
    M_COPY_FILE_RANGE = 1
    M_SENDFILE = 2
    M_SPLICE = 3

cdef enum FdKind:
    KIND_FILE = 0
    KIND_PIPE = 1
    KIND_SOCKET = 2
    KIND_CHAR = 3

cdef enum Step:
    STEP_DONE = 0
    STEP_ERROR = 1
    # Go back to GIL-held code to run signal handlers, then resume.
    STEP_SIGNALS = 2
    STEP_AGAIN = 3
    # CopyJob.cancel() was called: stop, keeping bytes_copied exact.
    STEP_CANCELLED = 4
    # A kernel path cannot serve this fd pair and has moved nothing: go on
    # with st.method, which the step has set to the next path.
    STEP_FALLBACK = 5

BUFFER_SIZE = BUF_SIZE

# ---------------------------------------------------------------------------
# The buffer free-list
# ---------------------------------------------------------------------------

cdef struct FreeBuf:
    FreeBuf *next

cdef pthread_mutex_t _buf_lock
cdef FreeBuf *_free_head = NULL
cdef Py_ssize_t _n_free = 0
cdef Py_ssize_t _n_in_use = 0
cdef Py_ssize_t _n_peak = 0

pthread_mutex_init(&_buf_lock, NULL)


cdef inline void _note_in_use(Py_ssize_t delta) noexcept nogil:
    # Called with _buf_lock held.
    global _n_in_use, _n_peak
    _n_in_use += delta
    if _n_in_use > _n_peak:
        _n_peak = _n_in_use


cdef int _buffers_take(char **out, int n) noexcept nogil:
    """Fill out[0:n] from the free-list, then malloc; returns how many it got."""
    global _free_head, _n_free
    cdef int got = 0
    cdef int fresh
    cdef void *p
    pthread_mutex_lock(&_buf_lock)
    while got < n and _free_head != NULL:
        out[got] = <char *>_free_head
        _free_head = _free_head.next
        _n_free -= 1
        got += 1
    _note_in_use(got)
    pthread_mutex_unlock(&_buf_lock)
    # malloc outside the lock: it may take its own arena lock or mmap.
    fresh = got
    while fresh < n:
        p = malloc(BUF_SIZE)
        if p == NULL:
            break
        out[fresh] = <char *>p
        fresh += 1
    if fresh > got:
        pthread_mutex_lock(&_buf_lock)
        _note_in_use(fresh - got)
        pthread_mutex_unlock(&_buf_lock)
    return fresh


cdef void _buffers_give(char **bufs, int n) noexcept nogil:
    global _free_head, _n_free, _n_in_use
    cdef int i
    cdef FreeBuf *node
    if n <= 0:
        return
    pthread_mutex_lock(&_buf_lock)
    for i in range(n):
        node = <FreeBuf *>bufs[i]
        node.next = _free_head
        _free_head = node
        bufs[i] = NULL
    _n_free += n
    _n_in_use -= n
    pthread_mutex_unlock(&_buf_lock)


def buffer_stats():
    """Return the state of the buffer free-list.

    Returns:
        A dict with ``buffer_size``, ``allocated`` (buffers that exist now,
        ``free + in_use``), ``free``, ``in_use`` and ``peak`` (the most ever
        in use at once).
    """
    cdef Py_ssize_t nfree, nuse, npeak
    with nogil:
        pthread_mutex_lock(&_buf_lock)
        nfree = _n_free
        nuse = _n_in_use
        npeak = _n_peak
        pthread_mutex_unlock(&_buf_lock)
    return {
        "buffer_size": BUF_SIZE,
        "allocated": nfree + nuse,
        "free": nfree,
        "in_use": nuse,
        "peak": npeak,
    }


def trim_buffers():
    """Free every idle pooled buffer.

    Buffers in use by running copies are not touched; they return to the
    free-list when their copy no longer needs them.

    Returns:
        The number of buffers freed.
    """
    global _free_head, _n_free
    cdef FreeBuf *head
    cdef FreeBuf *nxt
    cdef Py_ssize_t n
    with nogil:
        pthread_mutex_lock(&_buf_lock)
        head = _free_head
        n = _n_free
        _free_head = NULL
        _n_free = 0
        pthread_mutex_unlock(&_buf_lock)
        while head != NULL:
            nxt = head.next
            free(head)
            head = nxt
    return n


def _after_fork_in_child():
    # Another thread may have held the lock at fork time; the child has only
    # the forking thread, so a fresh mutex is correct.  Buffers held by the
    # parent's copies stay allocated (their owners do not exist here) but are
    # no longer counted as in use: they are simply unreachable in the child.
    global _n_in_use, _n_peak
    pthread_mutex_init(&_buf_lock, NULL)
    _n_in_use = 0
    _n_peak = 0


_os.register_at_fork(after_in_child=_after_fork_in_child)

# ---------------------------------------------------------------------------
# The pipe pool: intermediate pipes for splice
# ---------------------------------------------------------------------------
#
# splice needs a pipe on one side, so socket->socket (and pipe/socket->file)
# goes src -> pooled pipe -> dst.  A pipe is O_NONBLOCK (the pipe side of a
# splice never blocks, so EAGAIN is always about the other fd) and enlarged
# to 1 MiB where the per-user quota allows: fewer, larger splices.  Like a
# buffer, a pipe belongs to the pool or to exactly one copy; a copy holds one
# only while bytes are inside it or a splice is about to put them there.
# A pipe that comes back with bytes inside (the copy failed or was
# cancelled half-way) is closed, never pooled: the next relay must not
# receive a stranger's bytes.

cdef struct FpPipe:
    int rfd
    int wfd
    int size                # capacity after F_SETPIPE_SZ: what one splice can fill
    unsigned int gen        # _pipe_gen when created; stale after a fork
    FpPipe *next            # free-list link
    FpPipe *all_prev        # every live pipe, for the fork reset
    FpPipe *all_next

cdef pthread_mutex_t _pipe_lock
cdef FpPipe *_pipe_free = NULL
cdef FpPipe *_pipe_all = NULL
cdef Py_ssize_t _pipes_free = 0
cdef Py_ssize_t _pipes_in_use = 0
cdef Py_ssize_t _pipes_peak = 0
cdef Py_ssize_t _pipes_created = 0
cdef Py_ssize_t _pipes_small = 0    # created below PIPE_SIZE (quota)
cdef unsigned int _pipe_gen = 0
cdef int _pipe_want = PIPE_SIZE
cdef Py_ssize_t _splice_min_read = SPLICE_MIN_READ     # what F_SETPIPE_SZ asks for; tests lower it

pthread_mutex_init(&_pipe_lock, NULL)


cdef void _pipe_unlink_all(FpPipe *p) noexcept nogil:
    # Called with _pipe_lock held.
    global _pipe_all
    if p.all_prev != NULL:
        p.all_prev.all_next = p.all_next
    else:
        _pipe_all = p.all_next
    if p.all_next != NULL:
        p.all_next.all_prev = p.all_prev


cdef FpPipe *_pipe_take(int *err) noexcept nogil:
    """A pooled pipe, or a new one; NULL with err set (EMFILE, ENFILE...)."""
    global _pipe_free, _pipe_all, _pipes_free, _pipes_in_use, _pipes_peak
    global _pipes_created, _pipes_small
    cdef FpPipe *p
    cdef int fds[2]
    cdef int size
    pthread_mutex_lock(&_pipe_lock)
    p = _pipe_free
    if p != NULL:
        _pipe_free = p.next
        _pipes_free -= 1
        _pipes_in_use += 1
        if _pipes_in_use > _pipes_peak:
            _pipes_peak = _pipes_in_use
        pthread_mutex_unlock(&_pipe_lock)
        return p
    pthread_mutex_unlock(&_pipe_lock)
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        err[0] = errno
        return NULL
    # Past pipe-user-pages-soft an unprivileged F_SETPIPE_SZ fails (EPERM)
    # and new pipes may be as small as one page; the loop works with any
    # size, it just makes more calls.
    fcntl(fds[1], F_SETPIPE_SZ, _pipe_want)
    size = fcntl(fds[1], F_GETPIPE_SZ)
    if size <= 0:
        size = 4096
    p = <FpPipe *>malloc(sizeof(FpPipe))
    if p == NULL:
        close(fds[0])
        close(fds[1])
        err[0] = ENOMEM
        return NULL
    p.rfd = fds[0]
    p.wfd = fds[1]
    p.size = size
    p.next = NULL
    pthread_mutex_lock(&_pipe_lock)
    p.gen = _pipe_gen
    p.all_prev = NULL
    p.all_next = _pipe_all
    if _pipe_all != NULL:
        _pipe_all.all_prev = p
    _pipe_all = p
    _pipes_created += 1
    if size < _pipe_want:
        _pipes_small += 1
    _pipes_in_use += 1
    if _pipes_in_use > _pipes_peak:
        _pipes_peak = _pipes_in_use
    pthread_mutex_unlock(&_pipe_lock)
    return p


cdef void _pipe_give(FpPipe *p, bint empty) noexcept nogil:
    global _pipe_free, _pipes_free, _pipes_in_use
    cdef bint keep
    pthread_mutex_lock(&_pipe_lock)
    if p.gen != _pipe_gen:
        # Taken before a fork, given back in the child: its fds were closed
        # by the fork reset and the numbers may belong to someone else now.
        pthread_mutex_unlock(&_pipe_lock)
        free(p)
        return
    _pipes_in_use -= 1
    keep = empty and _pipes_free < PIPE_POOL_MAX
    if keep:
        p.next = _pipe_free
        _pipe_free = p
        _pipes_free += 1
    else:
        _pipe_unlink_all(p)
    pthread_mutex_unlock(&_pipe_lock)
    if not keep:
        close(p.rfd)
        close(p.wfd)
        free(p)


def pipe_stats():
    """Return the state of the pool of intermediate pipes used by splice.

    Returns:
        A dict with ``pipe_size`` (the size asked for with F_SETPIPE_SZ),
        ``allocated`` (pipes that exist now, ``free + in_use``), ``free``,
        ``in_use``, ``peak``, ``max_free`` (how many idle pipes are kept),
        ``created`` (pipes ever made) and ``small`` (pipes the kernel would
        not enlarge, because of the per-user pipe quota).
    """
    cdef Py_ssize_t nfree, nuse, npeak, ncreated, nsmall
    with nogil:
        pthread_mutex_lock(&_pipe_lock)
        nfree = _pipes_free
        nuse = _pipes_in_use
        npeak = _pipes_peak
        ncreated = _pipes_created
        nsmall = _pipes_small
        pthread_mutex_unlock(&_pipe_lock)
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


def _set_pipe_size(int size):
    """For tests: ask for ``size``-byte pipes from now on (the kernel rounds
    it up to a power of two pages, and never goes below one page), as the
    per-user pipe quota would.  Idle pipes of the old size are closed."""
    global _pipe_want
    _pipe_want = size
    trim_pipes()


def _set_splice_min_read(Py_ssize_t nbytes):
    """For tests and measurements: the read size at which a socket source
    moves to splice (0: splice from the first byte).  Returns the old one."""
    global _splice_min_read
    old = _splice_min_read
    _splice_min_read = nbytes
    return old


def trim_pipes():
    """Close every idle pooled pipe; return how many were closed."""
    global _pipe_free, _pipes_free
    cdef FpPipe *head
    cdef FpPipe *nxt
    cdef Py_ssize_t n
    with nogil:
        pthread_mutex_lock(&_pipe_lock)
        head = _pipe_free
        n = _pipes_free
        _pipe_free = NULL
        _pipes_free = 0
        nxt = head
        while nxt != NULL:
            _pipe_unlink_all(nxt)
            nxt = nxt.next
        pthread_mutex_unlock(&_pipe_lock)
        while head != NULL:
            nxt = head.next
            close(head.rfd)
            close(head.wfd)
            free(head)
            head = nxt
    return n


def _pipes_after_fork_in_child():
    # The child shares every pooled pipe with the parent: using one would mix
    # the two processes' bytes.  Close the child's copies of all of them
    # (free or held by copies whose threads did not survive the fork) and
    # start a new generation, so that a stale pipe given back is dropped.
    global _pipe_free, _pipe_all, _pipes_free, _pipes_in_use, _pipes_peak, _pipe_gen
    cdef FpPipe *p
    cdef FpPipe *nxt
    pthread_mutex_init(&_pipe_lock, NULL)
    p = _pipe_all
    while p != NULL:
        close(p.rfd)
        close(p.wfd)
        p = p.all_next
    p = _pipe_free
    while p != NULL:
        nxt = p.next
        free(p)
        p = nxt
    _pipe_free = NULL
    _pipe_all = NULL
    _pipes_free = 0
    _pipes_in_use = 0
    _pipes_peak = 0
    _pipe_gen += 1


_os.register_at_fork(after_in_child=_pipes_after_fork_in_child)

# ---------------------------------------------------------------------------
# The copy loop
# ---------------------------------------------------------------------------

cdef struct CopyState:
    int src
    int dst
    int src_kind
    int dst_kind
    bint src_wait_first     # a blocking, pollable source: poll before read
    bint dst_wait_first     # a blocking, pollable sink in the main thread
    bint dst_is_socket      # send with MSG_NOSIGNAL: EPIPE, never SIGPIPE
    int dst_send_flags      # MSG_DONTWAIT where a blocked send must not stall
    bint dst_nowait         # a blocking pipe sink written with RWF_NOWAIT
    # A socket source is read with MSG_DONTWAIT, and a blocking pipe with
    # RWF_NOWAIT (Linux 5.x+; else poll first): neither blocks, whatever the
    # fd's own flag, so there is no poll before each read.
    bint src_is_socket
    bint src_nowait
    bint poll_next          # the last non-blocking read was short
    int src_pipe_size       # a pipe source's capacity once asked (-1: unknown)
    int wait_ms             # poll timeout: -1, or a tick in the main thread
    long long idle_ms       # idle_timeout in ms, or -1
    long long deadline_ms   # CLOCK_MONOTONIC ms by which a byte must move
    bint idle_expired       # the ETIMEDOUT is ours, not the socket's
    # Interrupts a sendfile or splice blocked on a blocking socket sink at
    # the idle deadline (see _compat.h); made, used and freed by the thread
    # running the copy.
    fp_alarm idle_alarm
    # Worker-pool fields.  owner is the CopyJob; the pool holds one reference
    # to it from submit() until the completer takes the job back.
    PyObject *owner
    CopyState *link         # next in the pool's queue or done list
    bint pair_head          # queued with the next job as one pair (proxy)
    bint needs_prologue     # run CopyJob.prologue with the GIL first
    bint in_worker          # a worker has taken the job
    bint close_src          # close these int fds in C when the copy ends
    bint close_dst
    bint shut_wr_at_eof     # shutdown(dst, SHUT_WR) when the source ends
    int status              # STEP_DONE or STEP_ERROR once finished
    # Cancellation: cancel_req is set by CopyJob.cancel() from any thread and
    # read by the copy loop between syscalls.  thread/in_thread say which
    # worker to knock out of a blocking syscall; both change only under
    # wake_lock, so a cancel never signals a thread that has moved on.
    int cancel_req
    bint cancelled          # the copy ended because of cancel_req
    pthread_mutex_t wake_lock
    pthread_t thread
    bint in_thread
    long long limit         # bytes left to read, or -1 for "to end of file"
    long long copied        # bytes written to dst; read live by other threads
    int want                # buffers per read
    int want_max            # at most this many (0: not sized for the sink yet)
    int nbufs               # buffers held
    char *bufs[MAX_IOV]
    # Bytes read but not yet written: pend_len bytes in bufs, or, for a
    # prefix handed in by Python, at pre_ptr (kept alive by the CopyJob).
    Py_ssize_t pend_off
    Py_ssize_t pend_len
    const char *pre_ptr
    Py_ssize_t pre_len
    int err
    # The kernel paths.  method is the path in use (a Method); it only ever
    # moves towards M_READWRITE, and only while kmoved is false, so a
    # fallback can neither lose nor repeat a byte.
    int method
    bint kmoved             # the kernel path has taken bytes from src
    bint via_pipe           # splice src -> pipe -> dst (neither end a pipe)
    bint splice_later       # read/write first; splice once reads are large
    bint ksrc_wait_first    # a blocking socket source that must stay
    bint kdst_wait_first    # interruptible (main-thread tick, idle_timeout)
    bint zerocopy           # kernel paths allowed
    FpPipe *pipe            # the intermediate pipe, while held
    Py_ssize_t pipe_len     # bytes inside it
    # A pipe source fills the intermediate pipe before it is written out:
    # the producer's small pipe is emptied at once (a page move) and the
    # sink gets few large writes.  A socket source never does: there the
    # pipe must be empty before each read, or EAGAIN would be ambiguous.
    bint fill_pipe
    bint splice_retried     # a direct splice's EAGAIN was retried once
    bint draining           # write the pipe out completely before reading
    bint src_eof


cdef inline void _release(CopyState *st) noexcept nogil:
    _buffers_give(st.bufs, st.nbufs)
    st.nbufs = 0


cdef inline void _release_pipe(CopyState *st) noexcept nogil:
    if st.pipe != NULL:
        _pipe_give(st.pipe, st.pipe_len == 0)
        st.pipe = NULL
        st.pipe_len = 0


cdef int _wait(CopyState *st, int fd, short events, int timeout) noexcept nogil:
    """poll one fd; 1 ready, 0 timed out, -1 error in st.err (EINTR too)."""
    cdef pollfd p
    cdef int r
    p.fd = fd
    p.events = events
    p.revents = 0
    r = poll(&p, 1, timeout)
    if r < 0:
        st.err = errno
        return -1
    if r == 0:
        return 0
    if p.revents & POLLNVAL:
        st.err = EBADF
        return -1
    # POLLHUP/POLLERR count as ready: the next read or write reports EOF or
    # the real errno, which is better than guessing it here.
    return 1


cdef inline long long _now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline long long _idle_deadline(CopyState *st) noexcept nogil:
    # _now_ms() truncates to the millisecond, up to 1 ms behind the clock:
    # one more keeps idle_timeout from ever firing before its time.
    return _now_ms() + st.idle_ms + 1


cdef inline void _progress(CopyState *st) noexcept nogil:
    if st.idle_ms >= 0:
        st.deadline_ms = _idle_deadline(st)


cdef int _wait_step(CopyState *st, int fd, short events) noexcept nogil:
    """Block until fd is ready: STEP_AGAIN, or a step to hand back.

    It hands back STEP_SIGNALS for EINTR and for each main-thread tick, and
    STEP_ERROR with ETIMEDOUT (TimeoutError) once idle_timeout has passed
    without a byte moving.
    """
    cdef int r
    cdef int timeout
    cdef long long left
    while True:
        timeout = st.wait_ms
        if st.idle_ms >= 0:
            left = st.deadline_ms - _now_ms()
            if left <= 0:
                st.err = ETIMEDOUT
                st.idle_expired = True
                return STEP_ERROR
            if timeout < 0 or left < timeout:
                timeout = <int>left if left < 0x7FFFFFFF else 0x7FFFFFFF
        # A cancel whose signal landed since the loop's last look (during a
        # read that found nothing, say) would otherwise be slept through:
        # look once more, right before the one wait that can last for ever.
        # What is left of the window is closed by cancel()'s callers asking
        # again (Relay.cancel, and the re-poker for the pool's own stops).
        if FP_CANCELLABLE and fp_load_int(&st.cancel_req):
            return STEP_CANCELLED
        r = _wait(st, fd, events, timeout)
        if r > 0:
            return STEP_AGAIN
        if r < 0:
            return STEP_SIGNALS if st.err == EINTR else STEP_ERROR
        if st.wait_ms >= 0:
            return STEP_SIGNALS


cdef int _write_pending(CopyState *st) noexcept nogil:
    """Write what is pending; STEP_AGAIN once it is all out."""
    cdef iovec iov[MAX_IOV]
    cdef msghdr msg
    cdef int cnt, i, err, r
    cdef Py_ssize_t off, first, left
    cdef ssize_t n
    while st.pre_len > 0 or st.pend_len > 0:
        # A cancel's signal cuts a blocked send short, and the partial
        # count comes back here, not to _copy_step's check.
        if FP_CANCELLABLE and fp_load_int(&st.cancel_req):
            return STEP_CANCELLED
        if st.dst_wait_first:
            r = _wait_step(st, st.dst, POLLOUT)
            if r != STEP_AGAIN:
                return r
        cnt = 0
        if st.pre_len > 0:
            iov[0].iov_base = <void *>st.pre_ptr
            iov[0].iov_len = st.pre_len
            cnt = 1
        else:
            off = st.pend_off
            i = <int>(off // BUF_SIZE)
            first = off - i * BUF_SIZE
            left = st.pend_len - off
            while left > 0:
                iov[cnt].iov_base = st.bufs[i] + first
                iov[cnt].iov_len = BUF_SIZE - first
                if <Py_ssize_t>iov[cnt].iov_len > left:
                    iov[cnt].iov_len = left
                left -= iov[cnt].iov_len
                first = 0
                i += 1
                cnt += 1
        if st.dst_is_socket:
            memset(&msg, 0, sizeof(msg))
            msg.msg_iov = iov
            msg.msg_iovlen = cnt
            n = sendmsg(st.dst, &msg, MSG_NOSIGNAL | st.dst_send_flags)
        elif st.dst_nowait:
            n = pwritev2(st.dst, iov, cnt, -1, RWF_NOWAIT)
            if n < 0 and (errno == EOPNOTSUPP or errno == EINVAL):
                # An older kernel: no per-call non-blocking pipe write.
                st.dst_nowait = False
                st.dst_wait_first = True
                continue
        else:
            n = writev(st.dst, iov, cnt)
        if n < 0:
            err = errno
            if err == EINTR:
                st.err = EINTR
                return STEP_SIGNALS
            if err == EAGAIN:  # == EWOULDBLOCK on Linux
                r = _wait_step(st, st.dst, POLLOUT)
                if r != STEP_AGAIN:
                    return r
                continue
            st.err = err
            return STEP_ERROR
        fp_store_ll(&st.copied, st.copied + n)
        _progress(st)
        if st.pre_len > 0:
            st.pre_ptr += n
            st.pre_len -= n
        else:
            st.pend_off += n
            if st.pend_off == st.pend_len:
                st.pend_off = 0
                st.pend_len = 0
    return STEP_AGAIN


cdef int _wait_both(CopyState *st) noexcept nogil:
    """After EAGAIN from a direct splice: wait for whichever end is not ready.

    The pipe side of the splice is non-blocking and the other end may be
    too, so EAGAIN can mean an empty source or a full sink; poll tells which.
    """
    cdef pollfd p[2]
    cdef int r
    p[0].fd = st.src
    p[0].events = POLLIN
    p[0].revents = 0
    p[1].fd = st.dst
    p[1].events = POLLOUT
    p[1].revents = 0
    r = poll(p, 2, 0)
    if r < 0:
        st.err = errno
        return STEP_SIGNALS if st.err == EINTR else STEP_ERROR
    if (p[0].revents | p[1].revents) & POLLNVAL:
        st.err = EBADF
        return STEP_ERROR
    if p[0].revents == 0:
        return _wait_step(st, st.src, POLLIN)
    if not (p[0].revents & POLLIN):
        # End of file (POLLHUP alone): the next splice returns 0 without
        # touching the sink, which may stay full until our caller reads it.
        return STEP_AGAIN
    if not st.splice_retried:
        # The source has bytes now, but may have had none at the splice:
        # try once more before blaming the sink, whose POLLOUT can stay off
        # while it still has room (a unix socket's is a threshold).
        st.splice_retried = True
        return STEP_AGAIN
    if p[1].revents == 0:
        return _wait_step(st, st.dst, POLLOUT)
    # Both ends claim to be ready, yet the splice found no room or no data
    # (a socket whose POLLOUT threshold is below what a splice needs, say).
    # Never spin on it: back off for a millisecond.
    poll(NULL, 0, 1)
    return STEP_AGAIN


cdef inline bint _kernel_gives_up(int method, int err) noexcept nogil:
    """True if this errno means "this path cannot serve these fds"."""
    if method == M_COPY_FILE_RANGE:
        return (
            err == EINVAL or err == ENOSYS or err == EXDEV or err == EOPNOTSUPP
            or err == EPERM or err == EIO
        )
    return err == EINVAL or err == ENOSYS or err == EOPNOTSUPP


cdef inline void _moved(CopyState *st, ssize_t n, bint written) noexcept nogil:
    st.kmoved = True
    if st.limit > 0:
        st.limit -= n
    if written:
        fp_store_ll(&st.copied, st.copied + n)
    _progress(st)


cdef bint _src_has_bytes(CopyState *st) noexcept nogil:
    """Before polling a blocking sink: is there anything to send at all?

    A sink is polled first only so that a blocked send cannot hold off the
    main thread's signal ticks or idle_timeout.  At end of file the next
    sendfile or splice returns 0 without touching the sink, and a sink may
    well stay unwritable until its reader, perhaps our own caller, gets the
    result: polling it then would wait forever.
    """
    cdef stat sb
    cdef long pos
    cdef int avail = 0
    if st.src_kind == KIND_FILE:
        pos = lseek(st.src, 0, SEEK_CUR)
        if pos < 0 or fstat(st.src, &sb) < 0:
            return True  # let the syscall itself report the problem
        return pos < sb.st_size
    if ioctl(st.src, FIONREAD, &avail) < 0:
        return True
    return avail > 0


cdef inline void _arm_idle_alarm(CopyState *st) noexcept nogil:
    """Before a sendfile or splice into a blocking socket under idle_timeout.

    Neither honours a non-blocking flag there, and POLLOUT does not promise
    room for the whole chunk: without the alarm a stalled peer holds the call
    (and the relay) past its deadline for ever.  The wake signal interrupts
    the call at the deadline: EINTR, or a short count of bytes that did move.
    """
    if st.kdst_wait_first and _wake_signal > 0:
        fp_alarm_arm(&st.idle_alarm, _wake_signal, st.deadline_ms - _now_ms())


cdef inline void _disarm_idle_alarm(CopyState *st) noexcept nogil:
    # Keeps errno: the caller reads the syscall's right after.
    if st.kdst_wait_first:
        fp_alarm_disarm(&st.idle_alarm)


cdef int _kernel_step(CopyState *st) noexcept nogil:
    """Copy with copy_file_range, sendfile or splice until the end.

    Returns STEP_FALLBACK, with st.method set to the next path, when the
    kernel refuses the fd pair before any byte has moved.
    """
    cdef ssize_t n
    cdef size_t chunk
    cdef int err, r
    while True:
        if FP_CANCELLABLE and fp_load_int(&st.cancel_req):
            return STEP_CANCELLED
        if st.pipe_len > 0 and (
            st.draining or not st.fill_pipe or st.pipe_len >= st.pipe.size or st.limit == 0
        ):
            # The second leg: intermediate pipe -> dst.
            if st.kdst_wait_first:
                r = _wait_step(st, st.dst, POLLOUT)
                if r != STEP_AGAIN:
                    return r
            _arm_idle_alarm(st)
            n = splice(st.pipe.rfd, NULL, st.dst, NULL, <size_t>st.pipe_len, SPLICE_F_NONBLOCK)
            _disarm_idle_alarm(st)
            if n < 0:
                err = errno
                if err == EINTR:
                    st.err = EINTR
                    return STEP_SIGNALS
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
            fp_store_ll(&st.copied, st.copied + n)
            _progress(st)
            continue
        if st.limit == 0 or st.src_eof:
            _release_pipe(st)
            return STEP_DONE
        chunk = KERNEL_CHUNK
        if st.limit >= 0 and st.limit < <long long>chunk:
            chunk = <size_t>st.limit
        if st.method == M_COPY_FILE_RANGE:
            n = copy_file_range(st.src, NULL, st.dst, NULL, chunk, 0)
        elif st.method == M_SENDFILE:
            if st.kdst_wait_first and _src_has_bytes(st):
                r = _wait_step(st, st.dst, POLLOUT)
                if r != STEP_AGAIN:
                    return r
            _arm_idle_alarm(st)
            n = sendfile(st.dst, st.src, NULL, chunk)
            _disarm_idle_alarm(st)
        else:
            if st.ksrc_wait_first:
                # A blocking TCP socket ignores SPLICE_F_NONBLOCK: only
                # splice once it has bytes, so that ticks and timeouts run.
                _release_pipe(st)
                r = _wait_step(st, st.src, POLLIN)
                if r != STEP_AGAIN:
                    return r
            if st.via_pipe:
                if st.pipe == NULL:
                    st.pipe = _pipe_take(&err)
                    if st.pipe == NULL:
                        if not st.kmoved:
                            st.method = M_READWRITE  # EMFILE and co: no pipe
                            return STEP_FALLBACK
                        st.err = err
                        return STEP_ERROR
                if <size_t>(st.pipe.size - st.pipe_len) < chunk:
                    chunk = <size_t>(st.pipe.size - st.pipe_len)
                n = splice(st.src, NULL, st.pipe.wfd, NULL, chunk, SPLICE_F_NONBLOCK)
            else:
                if st.kdst_wait_first and _src_has_bytes(st):
                    r = _wait_step(st, st.dst, POLLOUT)
                    if r != STEP_AGAIN:
                        return r
                _arm_idle_alarm(st)
                n = splice(st.src, NULL, st.dst, NULL, chunk, SPLICE_F_NONBLOCK)
                _disarm_idle_alarm(st)
        if n < 0:
            err = errno
            if err == EINTR:
                st.err = EINTR
                return STEP_SIGNALS
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
            _release_pipe(st)
            return STEP_DONE
        st.splice_retried = False
        if st.method == M_SPLICE and st.via_pipe:
            st.pipe_len += n
            _moved(st, n, False)
        else:
            _moved(st, n, True)


cdef int _copy_step(CopyState *st) noexcept nogil:
    """Run the copy until it ends, fails, or must let signal handlers run."""
    cdef iovec iov[MAX_IOV]
    cdef msghdr msg
    cdef int cnt, r, err, got
    cdef Py_ssize_t want_bytes, left
    cdef ssize_t n
    st.err = 0
    while True:
        # One atomic load per round trip through the loop; a cancel that
        # lands mid-syscall interrupts it (EINTR) and comes back here.
        if FP_CANCELLABLE and fp_load_int(&st.cancel_req):
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
        if st.limit == 0:
            _release(st)
            return STEP_DONE
        if st.src_wait_first:
            # Holding buffers means bytes flowed a moment ago: look without
            # blocking first, and park only after giving the buffers back.
            if st.nbufs > 0:
                r = _wait(st, st.src, POLLIN, 0)
                if r < 0:
                    return STEP_SIGNALS if st.err == EINTR else STEP_ERROR
                if r == 0:
                    _release(st)
            if st.nbufs == 0:
                r = _wait_step(st, st.src, POLLIN)
                if r != STEP_AGAIN:
                    return r
        elif st.poll_next:
            # The last read was short: the source is drained, and reading
            # again now would almost always be EAGAIN and then a poll.  Poll
            # straight away (it returns at once if bytes came meanwhile):
            # one syscall less per message of a request/response protocol.
            st.poll_next = False
            _release(st)
            r = _wait_step(st, st.src, POLLIN)
            if r != STEP_AGAIN:
                return r
        if st.want_max == 0:
            _size_reads_for_sink(st)
        if st.nbufs < st.want:
            got = _buffers_take(&st.bufs[st.nbufs], st.want - st.nbufs)
            st.nbufs += got
            if st.nbufs == 0:
                st.err = ENOMEM
                return STEP_ERROR
        want_bytes = <Py_ssize_t>st.nbufs * BUF_SIZE
        if want_bytes > <Py_ssize_t>st.want_max * BUF_SIZE:
            want_bytes = <Py_ssize_t>st.want_max * BUF_SIZE
        if st.limit >= 0 and st.limit < want_bytes:
            want_bytes = <Py_ssize_t>st.limit
        cnt = 0
        left = want_bytes
        while left > 0:
            iov[cnt].iov_base = st.bufs[cnt]
            iov[cnt].iov_len = BUF_SIZE if left > BUF_SIZE else left
            left -= iov[cnt].iov_len
            cnt += 1
        if st.src_is_socket:
            memset(&msg, 0, sizeof(msg))
            msg.msg_iov = iov
            msg.msg_iovlen = cnt
            n = recvmsg(st.src, &msg, MSG_DONTWAIT)
        elif st.src_nowait:
            n = preadv2(st.src, iov, cnt, -1, RWF_NOWAIT)
            if n < 0 and (errno == EOPNOTSUPP or errno == EINVAL):
                # An older kernel: no per-call non-blocking read on pipes.
                st.src_nowait = False
                st.src_wait_first = True
                continue
        else:
            n = readv(st.src, iov, cnt)
        if n < 0:
            err = errno
            if err == EINTR:
                st.err = EINTR
                return STEP_SIGNALS
            if err == EAGAIN:  # == EWOULDBLOCK on Linux
                _release(st)
                r = _wait_step(st, st.src, POLLIN)
                if r != STEP_AGAIN:
                    return r
                continue
            st.err = err
            return STEP_ERROR
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
        # and one more read finds it without a poll.  A live connection pays
        # one EAGAIN read, once.
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
        if (
            n == want_bytes
            and st.want < st.want_max
            and want_bytes == <Py_ssize_t>st.nbufs * BUF_SIZE
        ):
            st.want *= 2
            if st.want > st.want_max:
                st.want = st.want_max


cdef void _size_reads_for_sink(CopyState *st) noexcept nogil:
    """Read no more per syscall than a pipe sink holds.

    A 512 KiB write into a 64 KiB pipe sleeps in the kernel each time the
    pipe fills, until the reader drains it: a wake-up per pipe-full.  Reading
    a pipe-full at a time, the loop reads the source while the reader drains,
    and its next write mostly finds room (file -> pipe: 0.73x copyfileobj's
    speed before, with 512 KiB writes).  Asked once, on the first read.
    """
    cdef int size
    st.want_max = MAX_IOV
    if st.dst_kind == KIND_PIPE:
        size = fcntl(st.dst, F_GETPIPE_SZ)
        if size > 0:
            st.want_max = size // BUF_SIZE
            if st.want_max < 1:
                st.want_max = 1
            elif st.want_max > MAX_IOV:
                st.want_max = MAX_IOV
    if st.want > st.want_max:
        st.want = st.want_max


cdef bint _emptied_full_pipe(CopyState *st, ssize_t n) noexcept nogil:
    """Whether a short read took a whole pipe's worth: the producer is ahead,
    blocked on the full pipe, and is refilling it now, so the next read is
    made at once rather than after a poll (one syscall less per pipe-full,
    and the buffers stay taken).  The capacity is asked once, and only when
    a read was a multiple of the page size, as a full pipe's is."""
    if st.src_kind != KIND_PIPE or n & 4095 or st.src_pipe_size < 0:
        return False
    if st.src_pipe_size == 0:
        st.src_pipe_size = fcntl(st.src, F_GETPIPE_SZ)
        if st.src_pipe_size <= 0:
            st.src_pipe_size = -1
            return False
    return n >= st.src_pipe_size


cdef int _pipe_leftovers(CopyState *st) noexcept nogil:
    """Read what a refused splice left in the intermediate pipe into buffers.

    The bytes were already counted against the limit when they entered the
    pipe; the read/write loop writes them out like any other read.
    """
    cdef iovec iov[MAX_IOV]
    cdef int cnt
    cdef Py_ssize_t left
    cdef ssize_t n
    if st.nbufs < MAX_IOV:
        st.nbufs += _buffers_take(&st.bufs[st.nbufs], MAX_IOV - st.nbufs)
        if st.nbufs == 0:
            st.err = ENOMEM
            return STEP_ERROR
    left = st.pipe_len
    if left > <Py_ssize_t>st.nbufs * BUF_SIZE:
        left = <Py_ssize_t>st.nbufs * BUF_SIZE
    cnt = 0
    while left > 0:
        iov[cnt].iov_base = st.bufs[cnt]
        iov[cnt].iov_len = BUF_SIZE if left > BUF_SIZE else left
        left -= iov[cnt].iov_len
        cnt += 1
    n = readv(st.pipe.rfd, iov, cnt)
    if n <= 0:
        # Our own non-blocking pipe holding pipe_len bytes cannot fail to
        # give them; if it does, say so rather than drop them silently.
        st.err = errno if n < 0 else EIO
        return STEP_SIGNALS if st.err == EINTR else STEP_ERROR
    st.pipe_len -= n
    st.pend_off = 0
    st.pend_len = n
    if st.pipe_len == 0:
        _release_pipe(st)
    return STEP_AGAIN


cdef int _fd_kind(int fd, int *kind, int *err) noexcept nogil:
    cdef stat sb
    if fstat(fd, &sb) < 0:
        err[0] = errno
        return -1
    if S_ISREG(sb.st_mode) or S_ISBLK(sb.st_mode):
        kind[0] = KIND_FILE
    elif S_ISFIFO(sb.st_mode):
        kind[0] = KIND_PIPE
    elif S_ISSOCK(sb.st_mode):
        kind[0] = KIND_SOCKET
    else:
        kind[0] = KIND_CHAR
    return 0


cdef int _is_nonblocking(int fd, bint *nonblock, int *err) noexcept nogil:
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        err[0] = errno
        return -1
    nonblock[0] = (flags & O_NONBLOCK) != 0
    return 0


cdef int _choose_kernel_path(CopyState *st, bint in_main_thread) noexcept nogil:
    """Pick the kernel path for this fd pair (st.method); -1 with st.err."""
    cdef int sk = st.src_kind
    cdef int dk = st.dst_kind
    cdef int flags
    cdef bint nb = False
    if sk == KIND_CHAR or dk == KIND_CHAR:
        return 0  # ttys, /dev/zero, /dev/full: read/write
    if dk == KIND_FILE:
        # An O_APPEND sink: copy_file_range refuses it (EBADF, which also
        # means a bad fd), splice and sendfile too; write() appends.
        flags = fcntl(st.dst, F_GETFL)
        if flags < 0:
            st.err = errno
            return -1
        if flags & O_APPEND:
            return 0
    if sk == KIND_FILE and dk == KIND_FILE:
        st.method = M_COPY_FILE_RANGE
    elif sk == KIND_FILE and dk == KIND_SOCKET:
        st.method = M_SENDFILE
    else:
        st.method = M_SPLICE
        # Neither end a pipe: go through one of ours.  A pipe->file copy goes
        # through one too: splicing straight into the page cache holds the
        # producer's pipe locked and stalls it.
        st.via_pipe = not (dk == KIND_PIPE or (sk == KIND_PIPE and dk != KIND_FILE))
        st.fill_pipe = st.via_pipe and sk == KIND_PIPE
        if sk == KIND_SOCKET and _splice_min_read > 0:
            st.method = M_READWRITE
            st.splice_later = True
    # SPLICE_F_NONBLOCK covers only the pipe side and sendfile has no such
    # flag, so a blocking socket end can hold the syscall as long as its peer
    # is idle (TCP's splice_read ignores the flag; AF_UNIX's honours it).  A
    # blocking source socket is polled first where a tick or idle_timeout
    # must interrupt that wait, and wherever the splice goes through a pooled
    # pipe, which a relay parked inside splice would keep: an idle
    # connection must hold none.  POLLIN is exact (data or end of file), and
    # one poll per pipe-full costs nothing next to the bytes.  A sink is
    # polled first only for idle_timeout, and only with bytes to send: its
    # POLLOUT is a threshold, not "room for one byte".  In the main thread a
    # signal interrupts a blocked splice or sendfile anyway (Python's
    # handlers are installed without SA_RESTART).
    if in_main_thread or st.idle_ms >= 0 or st.via_pipe:
        if sk == KIND_SOCKET:
            if _is_nonblocking(st.src, &nb, &st.err) < 0:
                return -1
            st.ksrc_wait_first = not nb
    if st.idle_ms >= 0 and dk == KIND_SOCKET:
        if _is_nonblocking(st.dst, &nb, &st.err) < 0:
            return -1
        st.kdst_wait_first = not nb
    return 0


cdef int _check_same_file(CopyState *st) noexcept nogil:
    """-1 with st.err = ERR_SAME_FILE if the copy would read what it wrote.

    ``cat f >> f``: with the same regular file at both ends (one fd, two
    dup'd fds, or two opens), reading to end of file chases the writes for
    ever (O_APPEND: the file grows until the disk is full), and overlapping
    ranges read back bytes already overwritten.  A counted copy between
    ranges that do not overlap is a legitimate move and goes ahead.
    """
    cdef stat a, b
    cdef long so, do
    cdef int flags
    if fstat(st.src, &a) < 0 or fstat(st.dst, &b) < 0:
        return 0  # the copy's own first syscall reports it
    if not (S_ISREG(a.st_mode) and S_ISREG(b.st_mode)):
        return 0
    if a.st_dev != b.st_dev or a.st_ino != b.st_ino or st.limit == 0:
        return 0
    if st.limit > 0:
        so = lseek(st.src, 0, SEEK_CUR)
        flags = fcntl(st.dst, F_GETFL)
        if flags >= 0 and flags & O_APPEND:
            do = b.st_size  # every write lands at the end
        else:
            do = lseek(st.dst, 0, SEEK_CUR)
        # Differences, not sums: limit may be up to 2**63-1.  A shared
        # offset (same fd, dup'd fds) gives so == do: overlapping.
        if so >= 0 and do >= 0:
            if (so <= do and do - so >= st.limit) or (do < so and so - do >= st.limit):
                return 0
    st.err = ERR_SAME_FILE
    return -1


cdef int _prepare(CopyState *st, bint in_main_thread, bint zerocopy) noexcept nogil:
    """Look at both ends, choose the path and how to wait; -1 with st.err."""
    cdef bint src_nb = False
    cdef bint dst_nb = False
    if _fd_kind(st.src, &st.src_kind, &st.err) < 0:
        return -1
    if _fd_kind(st.dst, &st.dst_kind, &st.err) < 0:
        return -1
    if st.src_kind == KIND_FILE and st.dst_kind == KIND_FILE and _check_same_file(st) < 0:
        return -1
    # Whether the source blocks only matters for pipes and devices (sockets
    # are read with MSG_DONTWAIT, regular files never block); the sink's only
    # when something must interrupt a blocked write: a main-thread tick or
    # idle_timeout.  Each fcntl saved is a syscall off every small relay.
    if st.src_kind == KIND_PIPE or st.src_kind == KIND_CHAR:
        if _is_nonblocking(st.src, &src_nb, &st.err) < 0:
            return -1
    if st.dst_kind != KIND_FILE and (in_main_thread or st.idle_ms >= 0):
        if _is_nonblocking(st.dst, &dst_nb, &st.err) < 0:
            return -1
    st.src_is_socket = st.src_kind == KIND_SOCKET
    st.dst_is_socket = st.dst_kind == KIND_SOCKET
    st.src_nowait = not src_nb and st.src_kind == KIND_PIPE
    st.src_wait_first = (
        not src_nb and st.src_kind == KIND_CHAR
    )
    if st.src_kind == KIND_FILE:
        st.want = MAX_IOV
    if zerocopy and _choose_kernel_path(st, in_main_thread) < 0:
        return -1
    # In the main thread, poll with a tick so that a signal landing just
    # before a blocking call still gets its handler run within the tick.
    st.wait_ms = MAIN_THREAD_TICK_MS if in_main_thread else -1
    # A blocking write can sit in the kernel for as long as the reader
    # stalls.  Where a tick or idle_timeout must be able to interrupt it,
    # write without blocking (MSG_DONTWAIT for a socket, RWF_NOWAIT for a
    # pipe) and poll on EAGAIN.  Never poll *before* writing: a unix socket
    # reports POLLOUT only while three quarters of its buffer are free, and
    # if its reader is our own caller, waiting for that never ends.  Only
    # devices, which have neither flag, are polled first.
    if not dst_nb and (st.wait_ms >= 0 or st.idle_ms >= 0):
        if st.dst_kind == KIND_SOCKET:
            st.dst_send_flags = MSG_DONTWAIT
        elif st.dst_kind == KIND_PIPE:
            st.dst_nowait = True
        elif st.dst_kind == KIND_CHAR:
            st.dst_wait_first = True
    if st.idle_ms >= 0:
        st.deadline_ms = _idle_deadline(st)
    return 0


cdef inline void _discard(CopyState *st) noexcept nogil:
    # The copy is over: give the buffers and the pipe back.  Bytes still
    # pending are lost only when it ended in an error; a pipe still holding
    # some is closed, not pooled.
    _release(st)
    _release_pipe(st)
    fp_alarm_free(&st.idle_alarm)
    st.pend_len = 0
    st.pre_len = 0


cdef void _copy_in_worker(CopyState *st) noexcept nogil:
    """The whole copy of a pool job; never needs the GIL past the prologue."""
    cdef int r
    st.in_worker = True
    if FP_CANCELLABLE:
        pthread_mutex_lock(&st.wake_lock)
        st.thread = pthread_self()
        st.in_thread = True
        pthread_mutex_unlock(&st.wake_lock)
    if st.needs_prologue and not fp_load_int(&st.cancel_req):
        with gil:
            r = (<CopyJob>st.owner)._run_prologue()
        if r < 0:
            st.status = STEP_ERROR
            st.err = 0  # the error is a Python exception on the job
    if st.status == STEP_AGAIN:
        if _prepare(st, False, st.zerocopy) < 0:
            st.status = STEP_ERROR
        else:
            while True:
                r = _copy_step(st)
                # EINTR in a worker: handlers run in the main thread, retry.
                if r != STEP_SIGNALS:
                    break
            if r == STEP_CANCELLED:
                st.cancelled = True
                st.err = ECANCELED
                r = STEP_ERROR
            st.status = r
    if FP_CANCELLABLE:
        pthread_mutex_lock(&st.wake_lock)
        st.in_thread = False
        pthread_mutex_unlock(&st.wake_lock)
    _discard(st)
    if st.shut_wr_at_eof and st.status == STEP_DONE:
        # proxy(): the peer sees end of file the moment our source does,
        # without waiting for the GIL.  shutdown() closes nothing, so the fd
        # stays ours; ENOTCONN (peer gone) is the other direction's story.
        shutdown(st.dst, SHUT_WR)
    # Closing int ends here, before completion, keeps the promise that a
    # finished relay's fds are closed, at no GIL cost.  Objects are closed
    # through their own close() by the completer.
    if st.close_src:
        close(st.src)
    if st.close_dst and not (st.close_src and st.dst == st.src):
        close(st.dst)


cdef int _raise_errno(int err) except -1:
    if err == ERR_SAME_FILE:
        raise OSError(EINVAL, "src and dst are the same file: the copy would read what it wrote")
    # OSError(errno, msg) picks the subclass (BrokenPipeError, ...) itself.
    raise OSError(err, _os.strerror(err))


cdef object _check_fd(object fd, str name):
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{name} must be an int file descriptor, not {type(fd).__name__}")
    if fd < 0:
        raise ValueError(f"{name} must be a non-negative file descriptor, got {fd}")
    if fd > 0x7FFFFFFF:
        raise ValueError(f"{name} is out of range: {fd}")
    return fd


cdef long long _check_count(object count) except -2:
    if count is None:
        return -1
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int or None, not {type(count).__name__}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    if count > 0x7FFFFFFFFFFFFFFF:
        # Said at once rather than wrapped into a short (or negative) copy.
        raise ValueError(f"count is out of range (at most 2**63-1): {count}")
    return count


cdef long long _check_idle_timeout(object seconds) except -2:
    if seconds is None:
        return -1
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"idle_timeout must be a number or None, not {type(seconds).__name__}")
    if not seconds > 0:
        raise ValueError(f"idle_timeout must be greater than 0, got {seconds}")
    if seconds > 1e9:
        return -1
    # Round up: a timeout must never fire early.
    return <long long>(seconds * 1000.0 + 0.999)


cdef class CopyJob:
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

    cdef CopyState st
    cdef bint _started
    cdef object _prefix       # keeps the bytes at st.pre_ptr alive
    cdef public object task
    cdef object _prologue
    cdef object _error        # a Python exception from the prologue

    def __cinit__(self):
        memset(&self.st, 0, sizeof(CopyState))
        pthread_mutex_init(&self.st.wake_lock, NULL)
        self.st.status = STEP_AGAIN

    def __init__(self, src_fd, dst_fd, count=None, *, zerocopy=True, idle_timeout=None):
        self.st.src = _check_fd(src_fd, "src_fd")
        self.st.dst = _check_fd(dst_fd, "dst_fd")
        self.st.limit = _check_count(count)
        self.st.idle_ms = _check_idle_timeout(idle_timeout)
        self.st.want = START_IOV
        self.st.zerocopy = bool(zerocopy)

    def __dealloc__(self):
        # Normally the copy has already given the buffers back; this covers a
        # job dropped half-way (an exception raised through run()).
        _release(&self.st)
        _release_pipe(&self.st)

    @property
    def bytes_copied(self):
        """Bytes written to ``dst_fd`` so far; safe to read while running."""
        return fp_load_ll(&self.st.copied)

    @property
    def method(self):
        """The path in use: ``"copy_file_range"``, ``"sendfile"``, ``"splice"``
        or ``"readwrite"``.

        Before the copy starts this is the path it would start with only for
        ``zerocopy=False`` (``"readwrite"``); the choice is made when it
        starts, and a fallback can change it once, before any byte has moved.
        A socket source starts on ``"readwrite"`` and moves to ``"splice"``
        once the data comes in bulk.
        """
        return _METHOD_NAMES[self.st.method]

    @property
    def src_fd(self):
        return self.st.src

    @property
    def dst_fd(self):
        return self.st.dst

    @property
    def remaining(self):
        """Bytes still allowed by ``count``, or None without a count."""
        return None if self.st.limit < 0 else self.st.limit

    @property
    def finished(self):
        """True once the copy has ended, successfully or not."""
        return self.st.status != STEP_AGAIN

    @property
    def started(self):
        """True once the copy has begun, in this thread or a worker."""
        return self._started or self.st.in_worker or self.st.status != STEP_AGAIN

    @property
    def cancelled(self):
        """True once the copy has ended because of ``cancel()``."""
        return self.st.cancelled

    def cancel(self):
        """Ask the copy to stop, from any thread; True if it had not ended.

        A queued job stops before it copies a byte; a running one stops at
        its next syscall, and one blocked in a syscall (a wait on an idle
        fd, or a splice into a stalled socket) is knocked out of it with a
        signal.  The signal can land just before the syscall starts, so a
        caller waiting for the job calls ``cancel()`` again every few
        milliseconds until ``finished``.  Afterwards ``bytes_copied`` is
        exact (bytes read but not yet written are dropped) and ``result()``
        raises ``CancelledError``.  ``run()`` in the caller's thread is
        stopped the same way.
        """
        if self.st.status != STEP_AGAIN:
            return False
        fp_store_int(&self.st.cancel_req, 1)
        with nogil:
            pthread_mutex_lock(&self.st.wake_lock)
            if self.st.in_thread and _wake_signal > 0:
                pthread_kill(self.st.thread, _wake_signal)
            pthread_mutex_unlock(&self.st.wake_lock)
        return True

    def close_fds(self, bint src, bint dst):
        """Have the worker close these int fds in C when the copy ends."""
        self.st.close_src = src
        self.st.close_dst = dst

    def shut_wr_at_eof(self, bint on):
        """Have the worker ``shutdown(dst, SHUT_WR)`` when the copy ends by
        reaching end of file (not on an error or a cancel)."""
        self.st.shut_wr_at_eof = on

    def prepend(self, bytes data not None):
        """Queue ``data`` to be written before anything read from the source.

        The bytes count towards ``count`` and ``bytes_copied``.
        """
        if self._started or self.st.status != STEP_AGAIN:
            raise RuntimeError("the copy has already started")
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if self.st.limit >= 0:
            if n > self.st.limit:
                raise ValueError("the prefix is longer than the remaining count")
            self.st.limit -= n
        self._prefix = data
        self.st.pre_ptr = PyBytes_AS_STRING(data)
        self.st.pre_len = n

    @property
    def prologue(self):
        return self._prologue

    @prologue.setter
    def prologue(self, value):
        self._prologue = value
        self.st.needs_prologue = value is not None

    cdef int _run_prologue(self) noexcept:
        # Called by a worker with the GIL; 0, or -1 with the error kept.
        try:
            self._prologue(self)
        except BaseException as exc:  # delivered through the relay
            self._error = exc
            return -1
        return 0

    def result(self):
        """After a pool ran the job: the byte count, or raise its error."""
        if self.st.status == STEP_DONE:
            return fp_load_ll(&self.st.copied)
        if self.st.status != STEP_ERROR:
            raise RuntimeError("the job has not finished")
        if self._error is not None:
            raise self._error
        self._raise_error()

    cdef int _raise_error(self) except -1:
        if self.st.cancelled:
            raise _CancelledError()
        if self.st.idle_expired:
            raise TimeoutError(
                ETIMEDOUT, f"no byte moved for {self.st.idle_ms / 1000:g} s (idle_timeout)"
            )
        _raise_errno(self.st.err)

    def run(self):
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
        cdef int rc
        if self._started or self.st.status != STEP_AGAIN:
            raise RuntimeError("a CopyJob runs only once")
        cdef sigset_t oldmask
        cdef bint masked = False
        self._started = True
        if _prepare(&self.st, _in_main_thread(), self.st.zerocopy) < 0:
            self.st.status = STEP_ERROR
            _raise_errno(self.st.err)
        if self.st.dst_kind == KIND_PIPE or self.st.dst_kind == KIND_SOCKET:
            fp_block_sigpipe(&oldmask)
            masked = not fp_sigpipe_blocked_in(&oldmask)
        with nogil:
            pthread_mutex_lock(&self.st.wake_lock)
            self.st.thread = pthread_self()
            self.st.in_thread = True
            pthread_mutex_unlock(&self.st.wake_lock)
        try:
            while True:
                with nogil:
                    rc = _copy_step(&self.st)
                if rc == STEP_CANCELLED:
                    self.st.cancelled = True
                    self.st.err = ECANCELED
                    rc = STEP_ERROR
                if rc == STEP_DONE:
                    self.st.status = STEP_DONE
                    return fp_load_ll(&self.st.copied)
                if rc == STEP_ERROR:
                    self.st.status = STEP_ERROR
                    self._raise_error()
                # STEP_SIGNALS: PEP 475, run the handlers and retry unless
                # one of them raised.
                PyErr_CheckSignals()
        finally:
            with nogil:
                pthread_mutex_lock(&self.st.wake_lock)
                self.st.in_thread = False
                pthread_mutex_unlock(&self.st.wake_lock)
            if masked:
                if self.st.err == EPIPE:
                    fp_discard_sigpipe()
                fp_set_sigmask(&oldmask)
            # Bytes read but not written are lost only when run() raises.
            _discard(&self.st)
            self._prefix = None


cdef int _wake_signal = fp_install_wake_signal()

_METHOD_NAMES = ("readwrite", "copy_file_range", "sendfile", "splice")


cdef bint _in_main_thread():
    return _threading.get_ident() == _threading.main_thread().ident


def copy_fd(src_fd, dst_fd, count=None, *, zerocopy=True):
    """Copy from ``src_fd`` to ``dst_fd`` with the GIL released.

    Copies until end of file, or until ``count`` bytes.  Blocking and
    non-blocking fds both work: on EAGAIN the loop waits in ``poll`` and
    never spins.  Neither fd is closed, and their flags are left unchanged.

    Args:
        src_fd: the file descriptor to read from.
        dst_fd: the file descriptor to write to.
        count: the most bytes to copy, or None for everything.
        zerocopy: allow a kernel path where the fd pair has one; False
            forces the read/write loop with pooled buffers.

    Returns:
        The number of bytes copied.

    Raises:
        TypeError: an fd or the count is not an int.
        ValueError: an fd or the count is negative.
        OSError: see ``CopyJob.run``.
    """
    return CopyJob(src_fd, dst_fd, count, zerocopy=zerocopy).run()


def fd_ready(fd):
    """True if reading ``fd`` now would not block (data, end of file or error)."""
    cdef pollfd p
    cdef int r
    p.fd = _check_fd(fd, "fd")
    p.events = POLLIN
    p.revents = 0
    with nogil:
        r = poll(&p, 1, 0)
    if r < 0:
        _raise_errno(errno)
    return r > 0


# ---------------------------------------------------------------------------
# The worker pool's GIL-free half
# ---------------------------------------------------------------------------
#
# A worker thread spends its whole life in PoolCore.worker_main with the GIL
# released: parked on its own semaphore, copying, or handing the finished job
# to the completer.  The hand-off (submit) and the completion (take_done)
# are the only steps that need the GIL, and completion happens in batches:
# one GIL acquisition finishes every job that ended meanwhile.

cdef struct CWorker:
    sem_t wake
    CWorker *prev           # idle list links, valid while idle is true
    CWorker *next
    CopyState *job          # set by whoever posts wake; read by the worker
    bint idle
    bint exit_flag
    # A spare from submit_pair(), idle before its thread runs.  It takes a
    # job only after the post that comes with it, like any parked worker:
    # posts come after the unlock, and the poster must find the worker
    # still there (not run, relinked or freed on a job it took unposted).
    bint born_idle


cdef class WorkerHandle:
    """A new worker's C half, handed from submit() to its thread once."""

    cdef CWorker *w

    def __dealloc__(self):
        # Only reached with w set if the thread could not be started.
        if self.w != NULL:
            sem_destroy(&self.w.wake)
            free(self.w)
            self.w = NULL


cdef class PoolCore:
    """Idle workers, the FIFO of waiting jobs, and the finished jobs.

    All of it lives under one mutex that is only ever held for a few pointer
    moves, so workers take it without the GIL.

    The queue holds single jobs and pairs (a proxy's two directions, the
    first marked pair_head), in order.  A pair starts whole or not at all:
    half a proxy running under max_workers would forward a request whose
    reply has no worker.  So an idle worker may wait while a pair at the head
    needs one more; it neither times out nor leaves meanwhile.  Invariant:
    while the queue is not empty the pool has no room to start a worker.
    """

    cdef pthread_mutex_t lock
    cdef pthread_cond_t done_cond
    cdef CWorker *idle_head
    cdef CopyState *queue_head
    cdef CopyState *queue_tail
    cdef CopyState *done_head
    cdef CopyState *done_tail
    cdef int n_workers, n_idle, n_busy, n_queued, peak
    cdef int max_workers      # -1: no limit
    cdef long long idle_ms    # -1: idle workers never exit
    cdef bint shutting_down
    cdef bint completer_waiting
    # Threads blocked in Relay.result() that finish jobs themselves: a
    # finished job wakes one of them before it wakes the completer thread.
    cdef pthread_cond_t helper_cond
    cdef int helpers_waiting

    def __cinit__(self, max_workers=None, idle_worker_timeout=None):
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.done_cond, NULL)
        fp_cond_init_monotonic(&self.helper_cond)
        self.max_workers = -1 if max_workers is None else max_workers
        self.idle_ms = _check_idle_timeout(idle_worker_timeout)

    def reset_after_fork(self):
        # The child has none of the parent's threads.  Their CWorker structs
        # and the jobs they ran are unreachable here; dropping them without
        # freeing is the only safe choice (another thread may have been in
        # the middle of using them at fork time).
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.done_cond, NULL)
        fp_cond_init_monotonic(&self.helper_cond)
        self.helpers_waiting = 0
        self.idle_head = NULL
        self.queue_head = self.queue_tail = NULL
        self.done_head = self.done_tail = NULL
        self.n_workers = self.n_idle = self.n_busy = self.n_queued = 0
        self.completer_waiting = False

    def stats(self):
        cdef int workers, idle, busy, queued, peak
        with nogil:
            pthread_mutex_lock(&self.lock)
            workers = self.n_workers
            idle = self.n_idle
            busy = self.n_busy
            queued = self.n_queued
            peak = self.peak
            pthread_mutex_unlock(&self.lock)
        return {"workers": workers, "idle": idle, "busy": busy, "queued": queued, "peak": peak}

    cdef inline void _note_busy(self) noexcept nogil:
        self.n_busy += 1
        if self.n_busy > self.peak:
            self.peak = self.n_busy

    cdef int _check_submit(self, CopyJob job) except -1:
        cdef CopyState *st = &job.st
        if job._started or st.status != STEP_AGAIN or st.owner != NULL:
            raise RuntimeError("a CopyJob runs only once")
        return 0

    cdef bint _has_room(self, int n) noexcept nogil:
        return self.max_workers < 0 or self.n_idle + self.max_workers - self.n_workers >= n

    cdef object _hand(self, CopyState *st, CWorker *fresh, CWorker **wake):
        """Under the lock: give st to an idle worker (True; it joins the
        ``wake`` chain, for the caller to post once it has unlocked), else
        to ``fresh``, a new worker made by the caller (its WorkerHandle, for
        the caller to start a thread for)."""
        cdef WorkerHandle handle
        self._note_busy()
        if self.idle_head != NULL:
            self._claim_idle(st, wake)
            return True
        fresh.job = st
        handle = WorkerHandle.__new__(WorkerHandle)
        handle.w = fresh
        return handle

    cdef CWorker *_new_worker(self, CopyState *st) noexcept nogil:
        # Counted at once, so that the room it takes is taken.
        cdef CWorker *w = <CWorker *>malloc(sizeof(CWorker))
        if w == NULL:
            return NULL
        memset(w, 0, sizeof(CWorker))
        sem_init(&w.wake, 0, 0)
        w.job = st
        self.n_workers += 1
        return w

    cdef void _free_worker(self, CWorker *w) noexcept nogil:
        # Under the lock: a worker made by _new_worker that never got a job
        # or a thread.
        if w != NULL:
            self.n_workers -= 1
            sem_destroy(&w.wake)
            free(w)

    cdef void _claim_idle(self, CopyState *st, CWorker **wake) noexcept nogil:
        # Under the lock, with an idle worker: it gets st, and is no longer
        # idle, so nothing else posts to it or lets it leave; it stays parked
        # until _post_all() posts it, after the unlock.  Off the idle list,
        # its `next` link chains the workers to post.
        cdef CWorker *w = self.idle_head
        self._unlink_idle(w)
        w.job = st
        w.next = wake[0]
        wake[0] = w

    cdef void _post_all(self, CWorker *w) noexcept nogil:
        # After the unlock: a worker posted under the lock would block at
        # once on the lock it needs to take its job.  `next` is read before
        # the post: once posted, the worker may run, go idle and relink.
        cdef CWorker *nxt
        while w != NULL:
            nxt = w.next
            sem_post(&w.wake)
            w = nxt

    cdef void _enqueue(self, CopyState *st) noexcept nogil:
        st.link = NULL
        if self.queue_tail == NULL:
            self.queue_head = st
        else:
            self.queue_tail.link = st
        self.queue_tail = st
        self.n_queued += 1

    cdef CopyState *_pop_queue(self) noexcept nogil:
        cdef CopyState *st = self.queue_head
        self.queue_head = st.link
        if self.queue_head == NULL:
            self.queue_tail = NULL
        st.link = NULL
        st.pair_head = False
        self.n_queued -= 1
        return st

    cdef CopyState *_dispatch(self, bint spare, CWorker **wake) noexcept nogil:
        """Under the lock: hand out queued entries while the head can start
        whole, to idle workers put on the ``wake`` chain.  With ``spare`` (a
        worker that just finished a job and is still counted busy), the
        first job handed out is returned for it."""
        cdef CopyState *mine = NULL
        cdef int need
        while self.queue_head != NULL:
            need = 2 if self.queue_head.pair_head else 1
            if self.n_idle + (1 if spare and mine == NULL else 0) < need:
                break
            while need:
                need -= 1
                if spare and mine == NULL:
                    mine = self._pop_queue()
                else:
                    self._note_busy()
                    self._claim_idle(self._pop_queue(), wake)
        if self.shutting_down and self.queue_head == NULL:
            self._release_idle()
        return mine

    cdef void _release_idle(self) noexcept nogil:
        # Under the lock: idle workers leave (shutdown, once nothing waits).
        cdef CWorker *w
        while self.idle_head != NULL:
            w = self.idle_head
            self._unlink_idle(w)
            self.n_workers -= 1
            w.exit_flag = True
            sem_post(&w.wake)
        if self.n_workers == 0 and self.completer_waiting:
            pthread_cond_signal(&self.done_cond)

    cdef void _own(self, CopyJob job) noexcept:
        # The pool owns a reference from here until take_done().
        Py_INCREF(job)
        job.st.owner = <PyObject *>job
        job.st.link = NULL

    cdef void _disown(self, CopyJob job) noexcept:
        job.st.owner = NULL
        Py_DECREF(job)

    def submit(self, CopyJob job not None):
        """Hand a job to an idle worker, or queue it.

        Returns:
            True when an idle worker took the job, False when it was queued,
            or a WorkerHandle when a new worker must be started for it (the
            caller starts a thread running ``worker_main(handle)``).

        Raises:
            RuntimeError: after shutdown().
        """
        cdef object handed = False
        cdef CWorker *fresh = NULL
        cdef CWorker *wake = NULL
        self._check_submit(job)
        self._lock_with_gil()
        if self.shutting_down:
            pthread_mutex_unlock(&self.lock)
            raise RuntimeError("cannot start a relay after shutdown")
        if self.queue_head == NULL and self._has_room(1):
            if self.idle_head == NULL:
                fresh = self._new_worker(NULL)
                if fresh == NULL:
                    pthread_mutex_unlock(&self.lock)
                    raise MemoryError()
            self._own(job)
            handed = self._hand(&job.st, fresh, &wake)
        else:
            self._own(job)
            self._enqueue(&job.st)
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)
        return handed

    cdef void _lock_with_gil(self):
        # Most calls find the lock free: taking it without letting the GIL
        # go spares the caller a GIL hand-over to the completer (which then
        # runs a whole batch of completions before the caller gets it back).
        if pthread_mutex_trylock(&self.lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.lock)

    def submit_pair(self, CopyJob a not None, CopyJob b not None):
        """Start both jobs, or queue them to start together.

        Returns:
            ``(for_a, for_b, spare)``: what ``submit()`` returns for each job,
            and a WorkerHandle for a new idle worker (or None) for the caller
            to start.  When the pair must wait for a second worker, a free
            place in the pool is filled now: only a running worker can later
            hand the pair out.

        Raises:
            RuntimeError: after shutdown().
        """
        cdef object for_a = False
        cdef object for_b = False
        cdef CWorker *fresh_a = NULL
        cdef CWorker *fresh_b = NULL
        cdef CWorker *wake = NULL
        cdef CWorker *w
        cdef WorkerHandle spare = None
        self._check_submit(a)
        self._check_submit(b)
        if a is b:
            raise RuntimeError("a CopyJob runs only once")
        self._lock_with_gil()
        if self.shutting_down:
            pthread_mutex_unlock(&self.lock)
            raise RuntimeError("cannot start a relay after shutdown")
        if self.queue_head == NULL and self._has_room(2):
            # Every new worker is made before either job is handed out, so
            # that running out of memory leaves nothing half started.
            if self.n_idle < 2:
                fresh_b = self._new_worker(NULL)
                if self.n_idle < 1 and fresh_b != NULL:
                    fresh_a = self._new_worker(NULL)
                    if fresh_a == NULL:
                        self._free_worker(fresh_b)
                        fresh_b = NULL
                if fresh_b == NULL:
                    pthread_mutex_unlock(&self.lock)
                    raise MemoryError()
            self._own(a)
            self._own(b)
            for_a = self._hand(&a.st, fresh_a, &wake)
            for_b = self._hand(&b.st, fresh_b, &wake)
        else:
            self._own(a)
            self._own(b)
            self._enqueue(&a.st)
            a.st.pair_head = True
            self._enqueue(&b.st)
            if self.max_workers >= 0 and self.n_workers < self.max_workers:
                w = self._new_worker(NULL)
                if w != NULL:
                    # Idle from birth: a finishing worker may hand it the
                    # pair's other job before its thread is even running.
                    w.born_idle = True
                    self._link_idle(w)
                    spare = WorkerHandle.__new__(WorkerHandle)
                    spare.w = w
                # Without memory for it the pair waits for running workers.
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)
        return for_a, for_b, spare

    def unqueue(self, CopyJob job not None):
        """Take a job off the queue if no worker has it yet; True if taken.

        The other half of a queued pair stays queued as a single job (and may
        start at once)."""
        cdef CopyState *st = &job.st
        cdef CopyState *prev = NULL
        cdef CopyState *cur
        cdef bint found = False
        cdef CWorker *wake = NULL
        with nogil:
            pthread_mutex_lock(&self.lock)
            cur = self.queue_head
            while cur != NULL:
                if cur == st:
                    if prev == NULL:
                        self.queue_head = cur.link
                    else:
                        prev.link = cur.link
                        prev.pair_head = False
                    if self.queue_tail == cur:
                        self.queue_tail = prev
                    cur.pair_head = False
                    self.n_queued -= 1
                    found = True
                    break
                prev = cur
                cur = cur.link
            if found:
                self._dispatch(False, &wake)
            pthread_mutex_unlock(&self.lock)
            self._post_all(wake)
        if found:
            st.link = NULL
            self._disown(job)  # the pool's reference
        return found

    def abandon(self, WorkerHandle handle not None):
        """The thread for a new worker could not start: undo its submit.

        Safe on a handle whose thread did start (then it does nothing), and
        on one abandoned before.

        Returns:
            The job it was carrying, or had been handed meanwhile (a spare
            from ``submit_pair``), to be failed by the caller; or None.
        """
        cdef CWorker *w = handle.w
        cdef CopyState *st
        cdef object job = None
        cdef bint wake_completer
        handle.w = NULL
        if w == NULL:
            # Its thread did start and took the worker (the exception came
            # after, e.g. Ctrl-C in Thread.start()'s wait), or this handle was
            # abandoned already: the caller cancels the relay instead.
            return None
        with nogil:
            pthread_mutex_lock(&self.lock)
            if w.idle:
                self._unlink_idle(w)
            st = w.job
            w.job = NULL
            if not w.exit_flag:
                # Else shutdown's _release_idle let this spare go, and
                # counted it out, before its thread failed to start.
                self.n_workers -= 1
            if st != NULL:
                self.n_busy -= 1
            # The completer of a pool that shuts down waits for the last
            # worker to leave; this may have been it.
            wake_completer = self.n_workers == 0 and self.completer_waiting
            pthread_mutex_unlock(&self.lock)
            if wake_completer:
                pthread_cond_signal(&self.done_cond)
            if st != NULL and w.born_idle:
                # A spare handed a job: its post comes after the hand-out's
                # unlock, maybe not yet.  Take it before freeing the worker.
                while sem_wait(&w.wake) < 0 and errno == EINTR:
                    pass
        sem_destroy(&w.wake)
        free(w)
        if st != NULL:
            job = <object>st.owner
            st.owner = NULL
            Py_DECREF(job)  # the pool's reference; `job` still holds one
        return job

    cdef inline void _link_idle(self, CWorker *w) noexcept nogil:
        # From here on only a hand-out may write w.job, and only after taking
        # w off this list; it posts w.wake after the write.
        w.idle = True
        w.prev = NULL
        w.next = self.idle_head
        if self.idle_head != NULL:
            self.idle_head.prev = w
        self.idle_head = w
        self.n_idle += 1

    cdef inline void _unlink_idle(self, CWorker *w) noexcept nogil:
        if w.prev != NULL:
            w.prev.next = w.next
        else:
            self.idle_head = w.next
        if w.next != NULL:
            w.next.prev = w.prev
        w.prev = w.next = NULL
        w.idle = False
        self.n_idle -= 1

    cdef bint _park(self, CWorker *w) noexcept nogil:
        """Wait for the next job; True when the worker must exit instead."""
        cdef int r
        while True:
            if self.idle_ms >= 0:
                r = fp_sem_wait_ms(&w.wake, self.idle_ms)
            else:
                r = sem_wait(&w.wake)
                if r < 0 and errno == EINTR:
                    continue
            if r == 0:
                return w.exit_flag
            # Timed out: leave the pool, unless a job or the exit sentinel
            # was handed over just now (then w is no longer on the idle list
            # and the post is on its way), or a pair waiting at the head of
            # the queue counts on this worker.
            pthread_mutex_lock(&self.lock)
            if w.idle and self.queue_head == NULL:
                self._unlink_idle(w)
                self.n_workers -= 1
                pthread_mutex_unlock(&self.lock)
                return True
            pthread_mutex_unlock(&self.lock)

    cdef CopyState *_finish(self, CWorker *w, CopyState *st, bint *leave) noexcept nogil:
        """File a finished job; return the next queued one, or go idle.

        Sets leave when the worker must exit (the pool is shutting down).
        """
        cdef CopyState *nxt = NULL
        cdef CWorker *wake = NULL
        cdef bint wake_helper, wake_completer
        pthread_mutex_lock(&self.lock)
        if self.done_tail == NULL:
            self.done_head = st
        else:
            self.done_tail.link = st
        self.done_tail = st
        st.link = NULL
        nxt = self._dispatch(True, &wake)
        if nxt == NULL:
            self.n_busy -= 1
            if self.shutting_down and self.queue_head == NULL:
                self.n_workers -= 1
                leave[0] = True
            else:
                self._link_idle(w)
        # Posted and signalled after the unlock, so that the woken threads
        # do not block at once on the lock still held here.  The pool
        # outlives its workers, and a waiter re-checks under the lock.
        wake_helper = self.helpers_waiting
        wake_completer = self.completer_waiting and (not wake_helper or leave[0])
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)
        if wake_helper:
            pthread_cond_signal(&self.helper_cond)
        if wake_completer:
            # With leave: the last worker leaving a pool that shuts down is
            # what lets the completer exit; a helper in result() may take the
            # job (and its wake-up), so the completer is woken to look too.
            pthread_cond_signal(&self.done_cond)
        return nxt

    cdef CopyState *_take_job(self, CWorker *w) noexcept nogil:
        cdef CopyState *st
        pthread_mutex_lock(&self.lock)
        st = w.job
        w.job = NULL
        pthread_mutex_unlock(&self.lock)
        return st

    def worker_main(self, WorkerHandle handle not None):
        """The body of a worker thread: returns when the worker exits."""
        cdef CWorker *w = handle.w
        cdef CopyState *st
        cdef bint leave = False
        cdef sigset_t oldmask
        # Taken with the GIL, as abandon() takes it: exactly one of the two
        # gets it.  abandon() won if an exception hit the starting thread
        # (Ctrl-C in Thread.start()) before this ran: nothing is ours.
        handle.w = NULL  # this thread owns it now
        if w == NULL:
            return
        # The OS-level name shows in top -H, ps -L, perf and gdb.
        pthread_setname_np(pthread_self(), b"fastpipe-worker")
        with nogil:
            fp_block_sigpipe(&oldmask)  # for the thread's life (see _compat.h)
            # The first job was stored before this thread started, unless it
            # is a spare from submit_pair(), idle from birth, which parks
            # first: a job is handed to it with a post, as to any idle worker.
            st = NULL if w.born_idle else self._take_job(w)
            while True:
                if st == NULL:
                    if self._park(w):
                        break
                    st = self._take_job(w)
                    if st == NULL:
                        continue
                _copy_in_worker(st)
                if st.status == STEP_ERROR and st.err == EPIPE:
                    fp_discard_sigpipe()
                st = self._finish(w, st, &leave)
                if leave:
                    break
            sem_destroy(&w.wake)
            free(w)

    def name_this_thread(self, bytes name not None):
        """Give the calling thread an OS-level name (at most 15 bytes)."""
        pthread_setname_np(pthread_self(), name[:15])

    def take_done(self):
        """Wait for finished jobs and take them all, in the order they ended.

        The completer thread's loop; it waits without the GIL.

        Returns:
            A list of CopyJobs; None once the pool is shut down and has no
            worker and no finished job left, which tells the completer to
            exit.
        """
        cdef CopyState *head
        with nogil:
            pthread_mutex_lock(&self.lock)
            while self.done_head == NULL and not (
                self.shutting_down and self.n_workers == 0 and self.queue_head == NULL
            ):
                self.completer_waiting = True
                pthread_cond_wait(&self.done_cond, &self.lock)
                self.completer_waiting = False
            head = self.done_head
            self.done_head = self.done_tail = NULL
            pthread_mutex_unlock(&self.lock)
        if head == NULL:
            return None
        return self._adopt(head)

    def help_done(self, CopyJob job not None, double timeout):
        """Wait up to ``timeout`` seconds for ``job`` to finish, taking over
        the completer's work meanwhile.

        A thread about to block in ``Relay.result()`` calls this, so the
        common pattern, submit then wait, completes futures in the waiting
        thread, with no hand-over to the completer and back.

        Returns:
            The finished jobs it took (possibly empty), for the caller to
            complete.
        """
        cdef CopyState *head = NULL
        cdef CopyState *st = &job.st
        cdef long long deadline_ms = -1
        if timeout >= 0:
            deadline_ms = _now_ms() + <long long>(timeout * 1000.0)
        with nogil:
            pthread_mutex_lock(&self.lock)
            while self.done_head == NULL and st.status == STEP_AGAIN:
                if deadline_ms >= 0 and _now_ms() >= deadline_ms:
                    break
                self.helpers_waiting += 1
                if deadline_ms >= 0:
                    fp_cond_wait_until_ms(&self.helper_cond, &self.lock, deadline_ms)
                else:
                    pthread_cond_wait(&self.helper_cond, &self.lock)
                self.helpers_waiting -= 1
            head = self.done_head
            self.done_head = self.done_tail = NULL
            if head != NULL and self.helpers_waiting:
                # Other helpers' jobs may be in this batch: let them look.
                pthread_cond_broadcast(&self.helper_cond)
            pthread_mutex_unlock(&self.lock)
        return self._adopt(head)

    cdef list _adopt(self, CopyState *head):
        # Turn the C list into CopyJobs, taking over submit()'s references.
        cdef CopyState *nxt
        cdef PyObject *owner
        cdef list jobs = []
        while head != NULL:
            nxt = head.link
            head.link = NULL
            owner = head.owner
            head.owner = NULL
            jobs.append(<object>owner)
            Py_DECREF(<object>owner)  # the reference submit() took
            head = nxt
        return jobs

    def shutdown(self, bint cancel_queued):
        """Refuse new jobs and let idle workers exit.

        Returns:
            The queued jobs taken off the queue when ``cancel_queued``.
        """
        cdef CopyState *queued = NULL
        cdef CopyState *nxt
        cdef list jobs = []
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.shutting_down = True
            if cancel_queued:
                queued = self.queue_head
                self.queue_head = self.queue_tail = NULL
                self.n_queued = 0
            # Idle workers stay while a pair waits for one more of them.
            if self.queue_head == NULL:
                self._release_idle()
            pthread_cond_signal(&self.done_cond)
            pthread_mutex_unlock(&self.lock)
        while queued != NULL:
            nxt = queued.link
            queued.link = NULL
            queued.pair_head = False
            jobs.append(<object>queued.owner)
            Py_DECREF(<object>queued.owner)
            queued.owner = NULL
            queued = nxt
        return jobs
