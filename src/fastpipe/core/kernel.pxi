# The kernel step: copy_file_range, sendfile or splice until the end, with
# its helpers (the direct splice's EAGAIN, when a path gives up, the idle
# alarm that bounds a blocking sendfile or splice).

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
    st.used = st.method
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


cdef inline void _arm_stall(CopyState *st) noexcept nogil:
    """Before a pool copy's sendfile or splice into a blocking socket.

    Neither call honours a per-call non-blocking flag there, and the
    caller's fd is not ours to switch to O_NONBLOCK: a stalled peer would
    hold the worker's thread for as long as it stalls.  The worker's stall
    alarm (armed once per run, disarmed by the worker when the copy leaves
    it) interrupts such a call every STALL_MS; _sink_stalled then parks the
    copy until the socket is writable.  Where the alarm cannot be made, the
    call blocks as it does in a caller's thread.
    """
    cdef bint nb = False
    cdef int err = 0
    if st.kdst_stall == STALL_ASK:
        st.kdst_stall = STALL_NO
        if _is_nonblocking(st.dst, &nb, &err) == 0 and not nb:
            st.kdst_stall = STALL_YES
    if (
        st.kdst_stall == STALL_YES and not st.stall_armed and st.stall != NULL
        and _wake_signal > 0
    ):
        st.stall_armed = fp_alarm_arm_interval(st.stall, _wake_signal, STALL_MS) == 0


cdef inline int _sink_stalled(CopyState *st) noexcept nogil:
    """EINTR from a call that writes to dst: the stall alarm, or a signal.

    A pool copy whose stall alarm is armed parks until dst is writable (or
    stops, if the signal was a cancel); anything else is PEP 475's retry.
    """
    if st.stall_armed:
        return _wait_step(st, st.dst, POLLOUT)
    st.err = EINTR
    return STEP_SIGNALS


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
        if st.pooled and st.pipe_len == 0 and st.copied >= st.slice_end:
            return STEP_YIELD
        if st.pipe_len > 0 and (
            st.draining or not st.fill_pipe or st.pipe_len >= st.pipe.size or st.limit == 0
        ):
            # The second leg: intermediate pipe -> dst.
            if st.kdst_wait_first:
                r = _wait_step(st, st.dst, POLLOUT)
                if r != STEP_AGAIN:
                    return r
            _arm_idle_alarm(st)
            _arm_stall(st)
            n = splice(st.pipe.rfd, NULL, st.dst, NULL, <size_t>st.pipe_len, SPLICE_F_NONBLOCK)
            _disarm_idle_alarm(st)
            if n < 0:
                err = errno
                if err == EINTR:
                    r = _sink_stalled(st)
                    if r != STEP_AGAIN:
                        return r
                    continue
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
            _arm_stall(st)
            n = sendfile(st.dst, st.src, NULL, chunk)
            _disarm_idle_alarm(st)
        else:
            if st.ksrc_wait_first:
                # A blocking TCP socket ignores SPLICE_F_NONBLOCK: only
                # splice once it has bytes, so that ticks and timeouts run,
                # and a pool copy parks instead of blocking its worker (a
                # parked copy gives an empty pipe back; see _park).
                if st.pooled:
                    r = _wait_ready(st, st.src, POLLIN)
                else:
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
                _arm_stall(st)
                n = splice(st.src, NULL, st.dst, NULL, chunk, SPLICE_F_NONBLOCK)
                _disarm_idle_alarm(st)
        if n < 0:
            err = errno
            if err == EINTR:
                if st.method == M_SENDFILE or (st.method == M_SPLICE and not st.via_pipe):
                    r = _sink_stalled(st)
                    if r != STEP_AGAIN:
                        return r
                    continue
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
            st.used = st.method
            _release_pipe(st)
            return STEP_DONE
        st.splice_retried = False
        if st.method == M_SPLICE and st.via_pipe:
            st.pipe_len += n
            _moved(st, n, False)
        else:
            _moved(st, n, True)
