# CopyJob, one copy runnable once, in the caller's thread or a pool worker;
# copy_fd() and fd_ready(), and the module-level names they use.

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
    cdef object _prefix       # keeps the bytes at st.pre_ptr alive
    cdef public object task
    cdef object _prologue
    cdef object _error        # a Python exception from the prologue
    cdef object _pool         # the PoolCore that owns it, while it does

    def __cinit__(self):
        memset(&self.st, 0, sizeof(CopyState))
        pthread_mutex_init(&self.st.wake_lock, NULL)
        self.st.status = STEP_AGAIN
        self.st.used = -1
        # fd 0 is an fd: "none" is -1.
        self.st.park_fd = self.st.pass_fd = self.st.lost_fd = -1
        self.st.heap_idx = -1

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
        or ``"readwrite"``; None until one has taken bytes from the source.

        Only a path that has moved bytes (or read the end of file) is named:
        a kernel path that the fd pair refuses falls back before it moves a
        byte, and is never reported.  A prefix (a buffered reader's
        read-ahead) is written first and is no path.  A socket source starts
        on ``"readwrite"`` and moves to ``"splice"`` once the data comes in
        bulk.
        """
        cdef int used = self.st.used
        return None if used < 0 else _METHOD_NAMES[used]

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
        return <bint>(self.st.started or self.st.in_worker or self.st.status != STEP_AGAIN)

    @property
    def cancelled(self):
        """True once the copy has ended because of ``cancel()``."""
        return <bint>self.st.cancelled

    def cancel(self):
        """Ask the copy to stop, from any thread; True if it had not ended.

        A queued job stops before it copies a byte; a parked one (a pool
        copy waiting in the poller) is ended here, in the calling thread; a
        running one stops at its next syscall, and one blocked in a syscall (a wait on
        an idle fd, or a splice into a stalled socket) is knocked out of it
        with a signal.  The signal can land just before the syscall starts, so a
        caller waiting for the job calls ``cancel()`` again every few
        milliseconds until ``finished``.  Afterwards ``bytes_copied`` is
        exact (bytes read but not yet written are dropped) and ``result()``
        raises ``CancelledError``.  ``run()`` in the caller's thread is
        stopped the same way.
        """
        if self.st.status != STEP_AGAIN or self.st.orphan:
            return False
        fp_store_int(&self.st.cancel_req, 1)
        if self._pool is not None:
            _pool_kick(self._pool, &self.st)
        with nogil:
            pthread_mutex_lock(&self.st.wake_lock)
            if self.st.in_thread and _wake_signal > 0:
                pthread_kill(self.st.thread, _wake_signal)
            pthread_mutex_unlock(&self.st.wake_lock)
        return True

    def orphan(self):
        """In a child after ``fork()``: the copy was submitted by the parent
        and goes on there.  Here no thread runs it, it never finishes, and
        ``cancel()`` does nothing (False): its pool state, its worker's
        thread and its poller slot are the parent's."""
        self.st.orphan = True
        self._pool = None

    def close_fds(self, bint src, bint dst):
        """Have the worker close these int fds in C when the copy ends."""
        self.st.close_src = src
        self.st.close_dst = dst

    def close_pair_with(self, CopyJob other not None):
        """Have whichever of this job and ``other`` ends last close both
        fds in C: a proxy's two directions over the same two ends (one
        reads what the other writes), whose fds a worker may close.

        Only a job that ends in a worker counts: if either never runs
        (taken off the queue), neither closes, and the caller closes both.
        The caller keeps both jobs alive until both have ended.
        """
        if other is self or self.st.src != other.st.dst or self.st.dst != other.st.src:
            raise ValueError("close_pair_with() wants the other direction over the same fds")
        if self.st.src == self.st.dst:
            raise ValueError("close_pair_with() wants two different fds")
        self.st.partner = &other.st
        other.st.partner = &self.st

    def shut_wr_at_eof(self, bint on):
        """Have the worker ``shutdown(dst, SHUT_WR)`` when the copy ends by
        reaching end of file (not on an error or a cancel)."""
        self.st.shut_wr_at_eof = on

    def prepend(self, bytes data not None):
        """Queue ``data`` to be written before anything read from the source.

        The bytes count towards ``count`` and ``bytes_copied``.
        """
        if self.st.started or self.st.status != STEP_AGAIN:
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
        """After a pool ran the job: the byte count, or raise its error.

        The completer asks this first of every finished job, so the prefix,
        written or dropped with the error by now, is let go here: a finished
        relay keeps its job, and the job none of the bytes.
        """
        if self.st.status == STEP_AGAIN:
            raise RuntimeError("the job has not finished")
        self._prefix = None
        if self.st.status == STEP_DONE:
            return fp_load_ll(&self.st.copied)
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
        if self.st.started or self.st.status != STEP_AGAIN:
            raise RuntimeError("a CopyJob runs only once")
        cdef sigset_t oldmask
        cdef bint masked = False
        self.st.started = True
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
    """Copy from ``src_fd`` to ``dst_fd`` in this thread, with the GIL released.

    Copies until end of file, or until ``count`` bytes, and returns when
    done.  Blocking and non-blocking fds both work: on EAGAIN the loop
    waits in ``poll`` and never spins.  Neither fd is closed, and their
    flags are left as they were.  The kernel path is chosen as for
    ``relay()``.

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
