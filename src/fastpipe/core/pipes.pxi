# The pipe pool: intermediate pipes for splice, taken and given back without
# the GIL, pipe_stats() and trim_pipes().  It owns every pipe no copy holds.
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
    """Close every idle pooled pipe.

    Pipes in use by running copies are not touched; they return to the pool
    when their copy no longer needs them.

    Returns:
        The number of pipes closed.
    """
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
