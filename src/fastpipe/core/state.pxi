# The copy state and the waits: CopyState (all a copy needs to resume where
# it stopped), giving its buffers and pipe back, the clock, and the poll that
# ends on readiness, a main-thread tick, idle_timeout or a cancel.

# A flag or a small enum value in CopyState: one byte, where a bint is four.
# Read as a flag it is 0 or 1; code that hands one to Python converts it
# with <bint> (a bare one would come out as an int).
ctypedef unsigned char flag
ctypedef signed char small

cdef struct CopyState:
    # The fields go from the widest to the narrowest (8-byte, 4-, 2-, then
    # 1-byte ones), so that the compiler pads nothing between them: a job
    # parked on an idle connection is mostly this struct.
    long long idle_ms       # idle_timeout in ms, or -1
    long long deadline_ms   # CLOCK_MONOTONIC ms by which a byte must move
    # Interrupts a sendfile or splice blocked on a blocking socket sink at
    # the idle deadline (see _compat.h); made, used and freed by the thread
    # running the copy.
    fp_alarm idle_alarm
    # Worker-pool fields.  owner is the CopyJob; the pool holds one reference
    # to it from submit() until the completer takes the job back.
    PyObject *owner
    CopyState *link         # next in the pool's queue or done list
    long long slice_end     # copied at which the worker looks at its pool
    long long queued_ms     # when it entered the pool's queue
    fp_alarm *stall         # the running worker's stall alarm, while armed
    # A proxy's other direction, when the two share both fds and the one
    # that ends last closes them (CopyJob.close_pair_with): read under the
    # pool's lock, while the proxy holds both jobs.
    CopyState *partner
    # Identity of each end, to tell a parked copy whose fd was closed and
    # reused under it (the poller's sweep).
    unsigned long src_dev
    unsigned long src_ino
    unsigned long dst_dev
    unsigned long dst_ino
    # Cancellation: cancel_req is set by CopyJob.cancel() from any thread and
    # read by the copy loop between syscalls.  thread/in_thread say which
    # worker to knock out of a blocking syscall; both change only under
    # wake_lock, so a cancel never signals a thread that has moved on.
    pthread_mutex_t wake_lock
    pthread_t thread
    long long limit         # bytes left to read, or -1 for "to end of file"
    long long copied        # bytes written to dst; read live by other threads
    char *bufs[MAX_IOV]
    # Bytes read but not yet written: pend_len bytes in bufs, or, for a
    # prefix handed in by Python, at pre_ptr (kept alive by the CopyJob).
    Py_ssize_t pend_off
    Py_ssize_t pend_len
    const char *pre_ptr
    Py_ssize_t pre_len
    FpPipe *pipe            # the intermediate pipe, while held
    Py_ssize_t pipe_len     # bytes inside it

    int src
    int dst
    int src_kind            # FdKind (an int: _fd_kind writes it)
    int dst_kind
    int dst_send_flags      # MSG_DONTWAIT where a blocked send must not stall
    int src_pipe_size       # a pipe source's capacity once asked (-1: unknown)
    int wait_ms             # poll timeout: -1, or a tick in the main thread
    # A pool copy (pooled) never blocks in a wait: _wait_step hands back
    # STEP_PARK with the fd and events to wait for, and the worker parks the
    # copy in the poller (poller.pxi) and runs another.  The rest is the
    # poller's and the pool's, changed under the pool's lock.
    int park_fd
    # Woken by the poller: the first wait for this fd and these events is
    # skipped (the poller saw them), unless a byte has moved since.
    int pass_fd
    int heap_idx            # in the poller's deadline heap, or -1
    int lost_fd             # an end's fd closed under the copy (else -1): EBADF
    int cancel_req          # read and written atomically (fp_load_int)
    int err

    short park_events
    short pass_events

    small status            # a Step: STEP_DONE or STEP_ERROR once finished
    small jstate            # a JobState
    small kdst_stall        # STALL_*: is dst a blocking socket (pool copies)
    # The kernel paths.  method is the path to take next (a Method); it only
    # ever moves towards M_READWRITE, and only while kmoved is false, so a
    # fallback can neither lose nor repeat a byte.
    small method
    # The path that last took bytes (or the end of file) from src, for
    # CopyJob.method; -1 until one has: a path chosen and then refused is
    # never reported.
    small used
    small want              # buffers per read (at most MAX_IOV)
    small want_max          # at most this many (0: not sized for the sink yet)
    small nbufs             # buffers held

    flag started            # run() has begun in the caller's thread
    flag src_wait_first     # a blocking, pollable source: poll before read
    flag dst_wait_first     # a blocking, pollable sink in the main thread
    flag dst_is_socket      # send with MSG_NOSIGNAL: EPIPE, never SIGPIPE
    flag dst_nowait         # a blocking pipe sink written with RWF_NOWAIT
    # A socket source is read with MSG_DONTWAIT, and a blocking pipe with
    # RWF_NOWAIT (Linux 5.x+; else poll first): neither blocks, whatever the
    # fd's own flag, so there is no poll before each read.
    flag src_is_socket
    flag src_nowait
    flag poll_next          # the last non-blocking read was short
    flag idle_expired       # the ETIMEDOUT is ours, not the socket's
    flag needs_prologue     # run CopyJob.prologue with the GIL first
    flag pooled
    flag src_unpollable     # epoll refused this end (EPERM): wait for it in
    flag dst_unpollable     # the worker's thread, as a caller's thread does
    flag reg_src            # the copy counts among its fd's users in the
    flag reg_dst            # poller's table (see _poller_release)
    flag stall_armed
    # The pool holds the job beyond its queue: a worker has taken it, or it
    # parked before it first ran.  It is running, for Relay.running(), and
    # only a cancel stops it (it is no longer simply taken off the queue).
    flag in_worker
    flag prepared           # _prepare has looked at its ends
    flag close_src          # close these int fds in C when the copy ends
    flag close_dst
    flag shut_wr_at_eof     # shutdown(dst, SHUT_WR) when the source ends
    flag cancelled          # the copy ended because of cancel_req
    flag in_thread
    flag kmoved             # the kernel path has taken bytes from src
    flag via_pipe           # splice src -> pipe -> dst (neither end a pipe)
    flag splice_later       # read/write first; splice once reads are large
    flag ksrc_wait_first    # a blocking socket source that must stay
    flag kdst_wait_first    # interruptible (main-thread tick, idle_timeout)
    flag zerocopy           # kernel paths allowed
    # A pipe source fills the intermediate pipe before it is written out:
    # the producer's small pipe is emptied at once (a page move) and the
    # sink gets few large writes.  A socket source never does: there the
    # pipe must be empty before each read, or EAGAIN would be ambiguous.
    flag fill_pipe
    flag splice_retried     # a direct splice's EAGAIN was retried once
    flag draining           # write the pipe out completely before reading
    flag src_eof
    # The copy was this process's parent's (inherited across fork()): it
    # never runs here, and cancel() leaves it alone.
    flag orphan
    # src_kind, src_dev and src_ino are known already (a copy parked before
    # it first ran looked at its source then): _prepare does not look again.
    flag src_known
    flag pair_ended         # see partner


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
    # Bytes moved: what the poller saw is stale now.
    st.pass_fd = -1
    if st.idle_ms >= 0:
        st.deadline_ms = _idle_deadline(st)


cdef inline int _park_step(CopyState *st, int fd, short events) noexcept nogil:
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
    if FP_CANCELLABLE and fp_load_int(&st.cancel_req):
        return STEP_CANCELLED
    st.park_fd = fd
    st.park_events = events
    return STEP_PARK


cdef inline bint _unpollable(CopyState *st, int fd) noexcept nogil:
    return (fd == st.src and st.src_unpollable) or (fd == st.dst and st.dst_unpollable)


cdef int _wait_step(CopyState *st, int fd, short events) noexcept nogil:
    """Block until fd is ready: STEP_AGAIN, or a step to hand back.

    It hands back STEP_SIGNALS for EINTR and for each main-thread tick, and
    STEP_ERROR with ETIMEDOUT (TimeoutError) once idle_timeout has passed
    without a byte moving.
    """
    cdef int r
    cdef int timeout
    cdef long long left
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


cdef int _wait_ready(CopyState *st, int fd, short events) noexcept nogil:
    """Like _wait_step, where the fd is likely ready already: a pool copy
    looks without waiting first, and parks only if it is not."""
    cdef int r
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
