# The buffer free-list: BUF_SIZE buffers taken and given back without the
# GIL, buffer_stats() and trim_buffers().  It owns every buffer no copy holds.

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
