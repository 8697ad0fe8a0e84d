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
from libc.errno cimport errno, EINTR, EAGAIN, ENOMEM, EBADF, ETIMEDOUT
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.uio cimport iovec
from cpython.exc cimport PyErr_CheckSignals
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import os as _os
import threading as _threading

from fastpipe._syscalls cimport (
    F_GETFL, MSG_NOSIGNAL, O_NONBLOCK, POLLIN, POLLNVAL, POLLOUT, S_ISBLK,
    S_ISCHR, S_ISFIFO, S_ISREG, S_ISSOCK, fcntl, fp_load_ll, fp_store_ll,
    fstat, msghdr, poll, pollfd, pthread_mutex_init, pthread_mutex_lock,
    pthread_mutex_t, pthread_mutex_unlock, readv, sendmsg, stat, writev,
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
    int wait_ms             # poll timeout: -1, or a tick in the main thread
    long long idle_ms       # idle_timeout in ms, or -1
    long long deadline_ms   # CLOCK_MONOTONIC ms by which a byte must move
    bint idle_expired       # the ETIMEDOUT is ours, not the socket's
    long long limit         # bytes left to read, or -1 for "to end of file"
    long long copied        # bytes written to dst; read live by other threads
    int want                # buffers per read
    int nbufs               # buffers held
    char *bufs[MAX_IOV]
    # Bytes read but not yet written: pend_len bytes in bufs, or, for a
    # prefix handed in by Python, at pre_ptr (kept alive by the CopyJob).
    Py_ssize_t pend_off
    Py_ssize_t pend_len
    const char *pre_ptr
    Py_ssize_t pre_len
    int err


cdef inline void _release(CopyState *st) noexcept nogil:
    _buffers_give(st.bufs, st.nbufs)
    st.nbufs = 0


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


cdef inline void _progress(CopyState *st) noexcept nogil:
    if st.idle_ms >= 0:
        st.deadline_ms = _now_ms() + st.idle_ms


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
            n = sendmsg(st.dst, &msg, MSG_NOSIGNAL)
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


cdef int _copy_step(CopyState *st) noexcept nogil:
    """Run the copy until it ends, fails, or must let signal handlers run."""
    cdef iovec iov[MAX_IOV]
    cdef int cnt, r, err, got
    cdef Py_ssize_t want_bytes, left
    cdef ssize_t n
    st.err = 0
    while True:
        r = _write_pending(st)
        if r != STEP_AGAIN:
            return r
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
        if st.nbufs < st.want:
            got = _buffers_take(&st.bufs[st.nbufs], st.want - st.nbufs)
            st.nbufs += got
            if st.nbufs == 0:
                st.err = ENOMEM
                return STEP_ERROR
        want_bytes = <Py_ssize_t>st.nbufs * BUF_SIZE
        if st.limit >= 0 and st.limit < want_bytes:
            want_bytes = <Py_ssize_t>st.limit
        cnt = 0
        left = want_bytes
        while left > 0:
            iov[cnt].iov_base = st.bufs[cnt]
            iov[cnt].iov_len = BUF_SIZE if left > BUF_SIZE else left
            left -= iov[cnt].iov_len
            cnt += 1
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
        # A full read means the source had more: read more per syscall next
        # time.  A short one means we are ahead of it: stay where we are.
        if n == want_bytes and st.want < MAX_IOV and want_bytes == <Py_ssize_t>st.nbufs * BUF_SIZE:
            st.want *= 2
            if st.want > MAX_IOV:
                st.want = MAX_IOV


cdef int _fd_kind(int fd, int *kind, bint *nonblock) except -1:
    cdef stat sb
    cdef int flags
    if fstat(fd, &sb) < 0:
        _raise_errno(errno)
    if S_ISREG(sb.st_mode) or S_ISBLK(sb.st_mode):
        kind[0] = KIND_FILE
    elif S_ISFIFO(sb.st_mode):
        kind[0] = KIND_PIPE
    elif S_ISSOCK(sb.st_mode):
        kind[0] = KIND_SOCKET
    else:
        kind[0] = KIND_CHAR
    flags = fcntl(fd, F_GETFL)
    if flags < 0:
        _raise_errno(errno)
    nonblock[0] = (flags & O_NONBLOCK) != 0
    return 0


cdef int _raise_errno(int err) except -1:
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
        raise ValueError(f"count is out of range: {count}")
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

    ``copy_fd`` is ``CopyJob(...).run()``.  The worker pool keeps the job so
    that ``bytes_copied`` can be read live from another thread while ``run``
    copies with the GIL released.
    """

    cdef CopyState st
    cdef bint _started
    cdef bint _zerocopy
    cdef bint _started_clock
    cdef object _prefix       # keeps the bytes at st.pre_ptr alive

    def __cinit__(self):
        memset(&self.st, 0, sizeof(CopyState))

    def __init__(self, src_fd, dst_fd, count=None, *, zerocopy=True, idle_timeout=None):
        self.st.src = _check_fd(src_fd, "src_fd")
        self.st.dst = _check_fd(dst_fd, "dst_fd")
        self.st.limit = _check_count(count)
        self.st.idle_ms = _check_idle_timeout(idle_timeout)
        self.st.want = START_IOV
        self._zerocopy = bool(zerocopy)

    def __dealloc__(self):
        # Normally run() has already given the buffers back; this covers a
        # job dropped half-way (an exception raised through run()).
        _release(&self.st)

    @property
    def bytes_copied(self):
        """Bytes written to ``dst_fd`` so far; safe to read while running."""
        return fp_load_ll(&self.st.copied)

    @property
    def method(self):
        """The path in use: ``"readwrite"`` (kernel paths come later)."""
        return "readwrite"

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

    def prepend(self, bytes data not None):
        """Queue ``data`` to be written before anything read from the source.

        The bytes count towards ``count`` and ``bytes_copied``; the caller
        must have read no more than ``remaining`` bytes.
        """
        if self._started:
            raise RuntimeError("the copy has already started")
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if self.st.limit >= 0:
            if n > self.st.limit:
                raise ValueError("the prefix is longer than the remaining count")
            self.st.limit -= n
        self._prefix = data
        self.st.pre_ptr = PyBytes_AS_STRING(data)
        self.st.pre_len = n

    cdef int _raise_error(self) except -1:
        if self.st.idle_expired:
            raise TimeoutError(
                ETIMEDOUT, f"no byte moved for {self.st.idle_ms / 1000:g} s (idle_timeout)"
            )
        _raise_errno(self.st.err)

    cdef int _setup_waits(self) except -1:
        # In the main thread, poll with a tick so that a signal landing just
        # before a blocking call still gets its handler run within the tick.
        self.st.wait_ms = MAIN_THREAD_TICK_MS if _in_main_thread() else -1
        if self.st.idle_ms >= 0 and not self._started_clock:
            self._started_clock = True
            self.st.deadline_ms = _now_ms() + self.st.idle_ms
        return 0

    def wait_readable(self):
        """Block, without the GIL, until the source has bytes or end of file.

        Raises:
            OSError: poll failed (EBADF for a closed fd).
        """
        cdef int r
        self._setup_waits()
        while True:
            with nogil:
                r = _wait_step(&self.st, self.st.src, POLLIN)
            if r == STEP_AGAIN:
                return
            if r == STEP_ERROR:
                self._raise_error()
            PyErr_CheckSignals()

    def run(self):
        """Copy until end of file or ``count`` bytes; return the bytes copied.

        Raises:
            OSError: with the errno of the failing syscall: EBADF for a bad
                or closed fd, EPIPE (BrokenPipeError) or ECONNRESET
                (ConnectionResetError) from a closed peer, ENOSPC from a full
                device, EISDIR for a directory, ...
            RuntimeError: the job has already run.
            Exception: whatever a signal handler raises, such as
                KeyboardInterrupt, when run in the main thread.
        """
        cdef int rc
        cdef bint src_nb, dst_nb
        if self._started:
            raise RuntimeError("a CopyJob runs only once")
        self._started = True
        _fd_kind(self.st.src, &self.st.src_kind, &src_nb)
        _fd_kind(self.st.dst, &self.st.dst_kind, &dst_nb)
        self.st.src_wait_first = not src_nb and self.st.src_kind != KIND_FILE
        self.st.dst_is_socket = self.st.dst_kind == KIND_SOCKET
        if self.st.src_kind == KIND_FILE:
            self.st.want = MAX_IOV
        self._setup_waits()
        # A blocking write can sit in the kernel for as long as the reader
        # stalls; poll first wherever something must interrupt that wait.
        self.st.dst_wait_first = (
            not dst_nb and self.st.dst_kind != KIND_FILE
            and (self.st.wait_ms >= 0 or self.st.idle_ms >= 0)
        )
        try:
            while True:
                with nogil:
                    rc = _copy_step(&self.st)
                if rc == STEP_DONE:
                    return fp_load_ll(&self.st.copied)
                if rc == STEP_ERROR:
                    self._raise_error()
                # STEP_SIGNALS: PEP 475, run the handlers and retry unless
                # one of them raised.
                PyErr_CheckSignals()
        finally:
            # Bytes read but not written are lost only when run() raises.
            _release(&self.st)
            self.st.pend_len = 0
            self.st.pre_len = 0
            self._prefix = None


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
