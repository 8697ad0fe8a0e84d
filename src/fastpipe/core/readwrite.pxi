# The copy loop and its read/write step: _copy_step drives a copy, handing
# over to the kernel step while a kernel path is in use, else reading into
# pooled buffers and writing them out (_write_pending).

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
            r = _wait_ready(st, st.dst, POLLOUT)
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
        if st.pooled and st.copied >= st.slice_end:
            return STEP_YIELD
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
