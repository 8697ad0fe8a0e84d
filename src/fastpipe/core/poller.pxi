# The poller: where a pool's parked copies wait, holding no thread.  One
# epoll set per pool, a table of the fds it watches, and a heap of the parked
# copies' idle deadlines.  Every function here runs under the pool's lock.
#
# Registrations are one-shot (EPOLLONESHOT): an fd is armed when a copy parks
# on it and disarmed by the event that wakes it, so a copy that is moving
# bytes costs the poller nothing (a level- or edge-triggered registration
# would wake the poller for every packet of a busy connection).  Re-arming is
# one epoll_ctl per park, as a blocking poll() is one syscall per wait.
#
# The table is indexed by fd because two copies may park on one fd at once:
# a proxy's a->b direction waiting to read a socket while b->a waits to write
# it.  epoll keeps one registration per fd (and open file), so its events go
# to the slot, which wakes the copy parked for reading, the one parked for
# writing, or both.  A slot stays registered while any copy that parked on
# the fd has not ended; the last one to end removes it (_poller_release),
# before the fd is closed.
#
# An fd is the caller's until its relay ends.  If the caller closes it under
# a parked copy anyway, epoll drops the registration without a word and the
# copy would wait for ever; so the sweep looks at each watched fd every few
# seconds, and a copy whose fd is closed, or now names another file, ends
# with EBADF and leaves that fd number alone.

cdef enum:
    # epoll_event.data of the eventfd; every other registration carries its fd.
    POKE_TAG = -1


cdef struct FdSlot:
    CopyState *rd           # the copy parked until the fd is readable
    CopyState *wr           # the copy parked until it is writable
    int users               # copies that parked on the fd and have not ended
    bint registered         # in the epoll set (armed or not)


cdef struct Poller:
    int epfd                # -1 until the first copy parks
    int evfd                # an eventfd in the set: wakes the leader
    bint poked              # written and not yet read
    FdSlot *slots
    int nslots
    CopyState **heap        # parked copies with an idle_timeout, by deadline
    int nheap
    int heap_cap
    int n_parked
    int sweep_at            # the next slot the sweep looks at
    long long sweep_ms      # when it looks next


# How often the sweep looks; tests lengthen it to see a parked pool at rest.
cdef long long _sweep_ms = SWEEP_MS


def _set_sweep_interval(double seconds):
    """Set how often a poller looks for fds closed under parked copies."""
    global _sweep_ms
    _sweep_ms = <long long>(seconds * 1000)


cdef void _poller_init(Poller *p) noexcept nogil:
    memset(p, 0, sizeof(Poller))
    p.epfd = -1
    p.evfd = -1


cdef int _poller_open(Poller *p) noexcept nogil:
    """Make the epoll set and the eventfd on first use: 0, or an errno."""
    cdef epoll_event ev
    cdef int err
    if p.epfd >= 0:
        return 0
    p.epfd = epoll_create1(EPOLL_CLOEXEC)
    if p.epfd < 0:
        err = errno
        p.epfd = -1
        return err
    p.evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if p.evfd >= 0:
        memset(&ev, 0, sizeof(ev))
        ev.events = EPOLLIN
        ev.data.u64 = <unsigned long long>POKE_TAG
        if epoll_ctl(p.epfd, EPOLL_CTL_ADD, p.evfd, &ev) == 0:
            return 0
    err = errno
    if p.evfd >= 0:
        close(p.evfd)
    close(p.epfd)
    p.epfd = p.evfd = -1
    return err


cdef void _poller_close(Poller *p) noexcept nogil:
    """Close the set and forget every slot: nothing is parked, or (in a child
    after fork) what was parked belongs to the parent.  Closing this process's
    fds leaves a parent's set as it was."""
    if p.epfd >= 0:
        close(p.epfd)
    if p.evfd >= 0:
        close(p.evfd)
    free(p.slots)
    free(p.heap)
    _poller_init(p)


cdef inline void _poller_poke(Poller *p) noexcept nogil:
    # The leader wakes from epoll_wait and looks at the pool again.
    if p.evfd >= 0 and not p.poked:
        p.poked = True
        fp_eventfd_poke(p.evfd)


cdef FdSlot *_poller_slot(Poller *p, int fd) noexcept nogil:
    """fd's slot, growing the table to hold it; NULL without memory."""
    cdef int n
    cdef FdSlot *grown
    if fd < p.nslots:
        return &p.slots[fd]
    n = p.nslots * 2 if p.nslots else 256
    while n <= fd:
        n *= 2
    grown = <FdSlot *>realloc(p.slots, <size_t>n * sizeof(FdSlot))
    if grown == NULL:
        return NULL
    memset(&grown[p.nslots], 0, <size_t>(n - p.nslots) * sizeof(FdSlot))
    p.slots = grown
    p.nslots = n
    return &p.slots[fd]


cdef int _poller_apply(Poller *p, FdSlot *slot, int fd) noexcept nogil:
    """Arm fd for what its parked copies wait for: 0, or an errno."""
    cdef epoll_event ev
    cdef int r
    memset(&ev, 0, sizeof(ev))
    ev.events = EPOLLONESHOT
    if slot.rd != NULL:
        ev.events |= EPOLLIN
    if slot.wr != NULL:
        ev.events |= EPOLLOUT
    ev.data.u64 = <unsigned long long>fd
    if slot.registered:
        r = epoll_ctl(p.epfd, EPOLL_CTL_MOD, fd, &ev)
        if r < 0 and errno == ENOENT:
            # The fd was closed and opened anew since (its registration went
            # with the old file): a new registration.
            r = epoll_ctl(p.epfd, EPOLL_CTL_ADD, fd, &ev)
    else:
        r = epoll_ctl(p.epfd, EPOLL_CTL_ADD, fd, &ev)
        if r < 0 and errno == EEXIST:
            r = epoll_ctl(p.epfd, EPOLL_CTL_MOD, fd, &ev)
    if r < 0:
        return errno
    slot.registered = True
    return 0


cdef int _poller_arm(Poller *p, CopyState *st) noexcept nogil:
    """Park st on st.park_fd for st.park_events: 0, or an errno.

    EPERM: epoll takes no such fd (a regular file, some devices).  EBUSY:
    another copy is parked on the fd for the same events (two relays reading
    one socket); this one must wait some other way.
    """
    cdef int fd = st.park_fd
    cdef FdSlot *slot
    cdef int err
    cdef bint reading = (st.park_events & POLLIN) != 0
    slot = _poller_slot(p, fd)
    if slot == NULL or (st.idle_ms >= 0 and _heap_reserve(p) < 0):
        return ENOMEM
    if (slot.rd if reading else slot.wr) != NULL:
        return EBUSY
    if reading:
        slot.rd = st
    else:
        slot.wr = st
    err = _poller_apply(p, slot, fd)
    if err:
        if reading:
            slot.rd = NULL
        else:
            slot.wr = NULL
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


cdef void _poller_unpark(Poller *p, CopyState *st, short events) noexcept nogil:
    """st leaves the poller, ready to run; it skips its next wait for events
    on its fd (the poller saw them), unless events is 0."""
    cdef FdSlot *slot = &p.slots[st.park_fd]
    if slot.rd == st:
        slot.rd = NULL
    if slot.wr == st:
        slot.wr = NULL
    if st.heap_idx >= 0:
        _heap_remove(p, st)
    p.n_parked -= 1
    st.jstate = J_QUEUED
    st.pass_fd = st.park_fd if events else -1
    st.pass_events = events


cdef void _poller_release(Poller *p, CopyState *st) noexcept nogil:
    """st has ended: it no longer uses its fds.  The last user of an fd
    takes it out of the set, before the fd is closed."""
    cdef int i, fd
    cdef FdSlot *slot
    cdef epoll_event ev
    memset(&ev, 0, sizeof(ev))
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
        if fd >= p.nslots:
            # The table was reset: the last worker closed the set while this
            # copy, unparked by a cancel, was on its way to its end.
            continue
        slot = &p.slots[fd]
        slot.users -= 1
        if slot.users == 0:
            if slot.registered:
                epoll_ctl(p.epfd, EPOLL_CTL_DEL, fd, &ev)
            slot.registered = False


cdef CopyState *_poller_events(Poller *p, epoll_event *evs, int n) noexcept nogil:
    """Wake the copies these events are for; return them, linked by st.link."""
    cdef CopyState *woken = NULL
    cdef CopyState *st
    cdef FdSlot *slot
    cdef unsigned int revents
    cdef int i, fd
    for i in range(n):
        if evs[i].data.u64 == <unsigned long long>POKE_TAG:
            fp_eventfd_drain(p.evfd)
            p.poked = False
            continue
        fd = <int>evs[i].data.u64
        if fd >= p.nslots:
            continue
        slot = &p.slots[fd]
        revents = evs[i].events
        # An error or hang-up wakes both: each finds out with its own call.
        if slot.rd != NULL and revents & (EPOLLIN | EPOLLERR | EPOLLHUP):
            st = slot.rd
            _poller_unpark(p, st, POLLIN)
            st.link = woken
            woken = st
        if slot.wr != NULL and revents & (EPOLLOUT | EPOLLERR | EPOLLHUP):
            st = slot.wr
            _poller_unpark(p, st, POLLOUT)
            st.link = woken
            woken = st
        if slot.rd != NULL or slot.wr != NULL:
            # One-shot: the event disarmed the fd for the copy still parked.
            if _poller_apply(p, slot, fd):
                if slot.rd != NULL:
                    st = slot.rd
                    _poller_unpark(p, st, POLLIN)
                    st.link = woken
                    woken = st
                if slot.wr != NULL:
                    st = slot.wr
                    _poller_unpark(p, st, POLLOUT)
                    st.link = woken
                    woken = st
    return _reversed(woken)


cdef CopyState *_poller_expired(Poller *p, long long now) noexcept nogil:
    """Wake the copies whose idle deadline has passed: each then fails with
    TimeoutError at its next wait."""
    cdef CopyState *woken = NULL
    cdef CopyState *st
    while p.nheap and p.heap[0].deadline_ms <= now:
        st = p.heap[0]
        _poller_unpark(p, st, 0)
        st.link = woken
        woken = st
    return _reversed(woken)


cdef CopyState *_poller_sweep(Poller *p, long long now) noexcept nogil:
    """Look at the next SWEEP_SLOTS fds for one closed under a parked copy."""
    cdef CopyState *woken = NULL
    cdef CopyState *st
    cdef FdSlot *slot
    cdef stat sb
    cdef int fd, end, k
    cdef bint lost
    p.sweep_ms = now + _sweep_ms
    end = p.sweep_at + SWEEP_SLOTS
    if end > p.nslots:
        end = p.nslots
    for fd in range(p.sweep_at, end):
        slot = &p.slots[fd]
        if slot.rd == NULL and slot.wr == NULL:
            continue
        st = slot.rd if slot.rd != NULL else slot.wr
        if fstat(fd, &sb) < 0:
            lost = True
        elif fd == st.src:
            lost = sb.st_dev != st.src_dev or sb.st_ino != st.src_ino
        else:
            lost = sb.st_dev != st.dst_dev or sb.st_ino != st.dst_ino
        if not lost:
            continue
        # Its registration went with the file; the number is not ours now.
        slot.registered = False
        for k in range(2):
            st = slot.rd if k == 0 else slot.wr
            if st != NULL:
                st.lost_fd = fd
                _poller_unpark(p, st, 0)
                st.link = woken
                woken = st
    p.sweep_at = 0 if end >= p.nslots else end
    return _reversed(woken)


cdef long long _poller_timeout(Poller *p, long long now) noexcept nogil:
    """How long the leader may wait in epoll_wait: ms, or -1 for ever."""
    cdef long long t = -1
    if p.nheap:
        t = p.heap[0].deadline_ms - now
    if p.n_parked and (t < 0 or p.sweep_ms - now < t):
        t = p.sweep_ms - now
    if t < 0 and (p.nheap or p.n_parked):
        t = 0
    return t


cdef CopyState *_reversed(CopyState *head) noexcept nogil:
    # The wake-ups were linked newest first; the queue takes them in order.
    cdef CopyState *out = NULL
    cdef CopyState *nxt
    while head != NULL:
        nxt = head.link
        head.link = out
        out = head
        head = nxt
    return out


# -- the deadline heap: a binary min-heap on deadline_ms, each copy knowing
#    its index (heap_idx) so that a copy woken early leaves in O(log n).

cdef inline void _heap_set(Poller *p, int i, CopyState *st) noexcept nogil:
    p.heap[i] = st
    st.heap_idx = i


cdef void _heap_up(Poller *p, int i) noexcept nogil:
    cdef CopyState *st = p.heap[i]
    cdef int parent
    while i > 0:
        parent = (i - 1) // 2
        if p.heap[parent].deadline_ms <= st.deadline_ms:
            break
        _heap_set(p, i, p.heap[parent])
        i = parent
    _heap_set(p, i, st)


cdef void _heap_down(Poller *p, int i) noexcept nogil:
    cdef CopyState *st = p.heap[i]
    cdef int child
    while True:
        child = 2 * i + 1
        if child >= p.nheap:
            break
        if child + 1 < p.nheap and p.heap[child + 1].deadline_ms < p.heap[child].deadline_ms:
            child += 1
        if st.deadline_ms <= p.heap[child].deadline_ms:
            break
        _heap_set(p, i, p.heap[child])
        i = child
    _heap_set(p, i, st)


cdef int _heap_reserve(Poller *p) noexcept nogil:
    # Room for one more, made before the copy parks: 0, or -1 without memory.
    cdef CopyState **grown
    cdef int cap
    if p.nheap < p.heap_cap:
        return 0
    cap = p.heap_cap * 2 if p.heap_cap else 64
    grown = <CopyState **>realloc(p.heap, <size_t>cap * sizeof(CopyState *))
    if grown == NULL:
        return -1
    p.heap = grown
    p.heap_cap = cap
    return 0


cdef void _heap_push(Poller *p, CopyState *st) noexcept nogil:
    # After _heap_reserve.
    p.nheap += 1
    _heap_set(p, p.nheap - 1, st)
    _heap_up(p, p.nheap - 1)


cdef void _heap_remove(Poller *p, CopyState *st) noexcept nogil:
    cdef int i = st.heap_idx
    cdef CopyState *last
    st.heap_idx = -1
    p.nheap -= 1
    if i == p.nheap:
        return
    last = p.heap[p.nheap]
    _heap_set(p, i, last)
    _heap_up(p, i)
    _heap_down(p, last.heap_idx)
