# Path choice and the ends of a copy: the fds' kinds, the kernel path for the
# pair, the same-file check, _prepare before the loop, and _discard and
# _close_ends after it.

cdef int _fd_kind(
    int fd, int *kind, int *err, unsigned long *dev, unsigned long *ino
) noexcept nogil:
    cdef stat sb
    if fstat(fd, &sb) < 0:
        err[0] = errno
        return -1
    dev[0] = sb.st_dev
    ino[0] = sb.st_ino
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
    # A pool copy never blocks in a wait (it parks instead), so it polls a
    # blocking source socket first everywhere, and its writes into a
    # blocking socket run under the worker's stall alarm (_arm_stall, which
    # asks whether the sink blocks the first time it is needed).
    if in_main_thread or st.idle_ms >= 0 or st.via_pipe or st.pooled:
        if sk == KIND_SOCKET:
            if _is_nonblocking(st.src, &nb, &st.err) < 0:
                return -1
            st.ksrc_wait_first = not nb
    if st.pooled:
        if dk == KIND_SOCKET:
            st.kdst_stall = STALL_ASK
    elif st.idle_ms >= 0 and dk == KIND_SOCKET:
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
    if not st.src_known and _fd_kind(
        st.src, &st.src_kind, &st.err, &st.src_dev, &st.src_ino
    ) < 0:
        return -1
    if _fd_kind(st.dst, &st.dst_kind, &st.err, &st.dst_dev, &st.dst_ino) < 0:
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
    if st.dst_kind != KIND_FILE and not st.pooled and (in_main_thread or st.idle_ms >= 0):
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
    # A pool copy writes without blocking everywhere: it parks on EAGAIN.
    if not dst_nb and (st.wait_ms >= 0 or st.idle_ms >= 0 or st.pooled):
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


cdef void _close_ends(CopyState *st) noexcept nogil:
    """The copy is over and its buffers are back: half-close, close."""
    if st.shut_wr_at_eof and st.status == STEP_DONE:
        # proxy(): the peer sees end of file the moment our source does,
        # without waiting for the GIL.  shutdown() closes nothing, so the fd
        # stays ours; ENOTCONN (peer gone) is the other direction's story.
        shutdown(st.dst, SHUT_WR)
    # Closing int ends here, before completion, keeps the promise that a
    # finished relay's fds are closed, at no GIL cost.  Objects are closed
    # through their own close() by the completer.  An fd closed and reused
    # under a parked copy (lost_fd) is someone else's now.
    if st.close_src and st.src != st.lost_fd:
        close(st.src)
    if st.close_dst and not (st.close_src and st.dst == st.src) and st.dst != st.lost_fd:
        close(st.dst)
