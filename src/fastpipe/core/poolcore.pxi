# The worker pool's GIL-free half: CWorker, WorkerHandle and PoolCore (the
# policy on the Python side lives in _pool.py).
#
# Workers are the threads that run copies.  A copy that must wait (nothing
# to read, or its sink full) is parked in the pool's poller (poller.pxi) and
# holds no thread; when its fd is ready it goes back to the queue and a
# worker resumes it where it stopped.  So the pool has as many threads as
# copies *run* at once, however many wait.
#
# A worker spends its whole life in PoolCore.worker_main with the GIL
# released.  With no copy to run it is either the leader, waiting in
# epoll_wait for parked copies (at most one worker is), or a follower,
# waiting on its own semaphore to be handed a copy: leader/followers, as in
# ACE, and as Go's scheduler polls the network from whichever thread is
# idle.  The leader runs the first copy it wakes itself, so one connection
# becoming readable costs no hand-off between threads; further copies woken
# at once go to followers.  While the former leader runs its copy nobody
# polls, but only for as long as the copy moves less than SLICE_BYTES: at
# each slice a running copy looks at the pool (_look_at_pool) and hands the poller
# to a follower, or asks for a thread, if copies are left waiting.
#
# Threads are started by Python (_pool.py): submit() returns a WorkerHandle
# when it finds no idle worker, and a worker that needs another thread asks
# the completer, whose take_done() returns the handles to start.  The
# hand-off and the completion are the only steps that need the GIL, and
# completion happens in batches: one GIL acquisition finishes every copy
# that ended meanwhile.

cdef enum:
    # What _park does with a copy.
    PARK_RETRY = 0          # not parked: run it again (cancelled, or wait in the thread)
    PARK_DONE = 1           # parked: the worker moves on
    PARK_FAILED = 2         # the poller refused with an errno: the copy ends with it
    # Copies may wait this long in the queue, while every worker runs a copy,
    # before the pool asks for another thread; and it asks for at most one
    # per this long.  A backlog of short copies drains without new threads.
    SPAWN_AFTER_MS = 2
    # spawn_cap: this many workers per CPU the process may run on, and at
    # least SPAWN_CAP_MIN.
    SPAWN_CAP_PER_CPU = 2
    SPAWN_CAP_MIN = 4


cdef struct CWorker:
    sem_t wake
    CWorker *prev           # idle list links, valid while idle is true;
    CWorker *next           # next also chains the workers to post or start
    CopyState *job          # set by whoever posts wake; read by the worker
    bint idle               # a follower, on the idle list
    bint blocking           # counted in n_blocking (see _before_blocking)
    bint coming             # counted in n_coming (see _maybe_spawn)
    bint exit_flag
    fp_alarm alarm          # this thread's stall alarm (see _arm_stall)


cdef class WorkerHandle:
    """A new worker's C half, handed to the thread that will run it, once."""

    cdef CWorker *w

    def __dealloc__(self):
        # Only reached with w set if the thread could not be started.
        if self.w != NULL:
            sem_destroy(&self.w.wake)
            free(self.w)
            self.w = NULL


cdef class PoolCore:
    """The workers, the FIFO of ready copies, the poller of parked ones, and
    the finished copies.

    All of it lives under one mutex, held for a few pointer moves (and one
    epoll_ctl when a copy parks), so workers take it without the GIL.
    """

    cdef pthread_mutex_t lock
    cdef pthread_cond_t done_cond
    cdef CWorker *idle_head       # followers, the most recently idle first
    cdef CWorker *leader          # the idle worker in epoll_wait, or NULL
    # A worker is in epoll_wait (the leader, or a busy one looking without
    # waiting).
    cdef bint polling
    cdef CWorker *spawn_head      # made for the completer to start
    cdef CopyState *queue_head    # ready copies: new, woken, or yielding
    cdef CopyState *queue_tail
    cdef CopyState *done_head
    cdef CopyState *done_tail
    cdef int n_workers, n_idle, n_busy, n_queued, peak
    cdef int n_blocking           # workers blocked outside the pool's control
    cdef int n_coming             # asked for by _maybe_spawn, not yet looked at the pool
    cdef int max_workers          # -1: no limit
    # Past this many workers, copies that are merely ready (not stranded by
    # a worker about to block) wait for a running one instead of getting a
    # thread: a core runs one copy at a time, and a burst of short copies
    # is drained faster by a few threads than by a thread each.
    cdef int spawn_cap
    cdef long long idle_ms        # -1: idle workers never exit
    cdef long long spawn_ms       # when a thread was last asked for
    cdef bint shutting_down
    cdef bint completer_waiting
    # Threads blocked in Relay.result() that finish jobs themselves: a
    # finished job wakes one of them before it wakes the completer thread.
    cdef pthread_cond_t helper_cond
    cdef int helpers_waiting
    # A caller's event loop that takes finished jobs itself (take_ready):
    # an eventfd it polls, written once per batch (done_poked), in place of
    # waking the completer thread.  -1: the completer takes them.
    cdef int done_fd
    cdef bint done_poked
    cdef Poller poller

    def __cinit__(self, max_workers=None, idle_worker_timeout=None):
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.done_cond, NULL)
        fp_cond_init_monotonic(&self.helper_cond)
        _poller_init(&self.poller)
        self.done_fd = -1
        self.max_workers = -1 if max_workers is None else max_workers
        self.idle_ms = _check_idle_timeout(idle_worker_timeout)
        self.spawn_cap = max(SPAWN_CAP_MIN, SPAWN_CAP_PER_CPU * len(_os.sched_getaffinity(0)))

    def __dealloc__(self):
        # No worker is left: each holds a reference to this object.
        _poller_close(&self.poller)
        if self.done_fd >= 0:
            close(self.done_fd)

    def reset_after_fork(self):
        # The child has none of the parent's threads.  Their CWorker structs
        # and the jobs they ran are unreachable here; dropping them without
        # freeing is the only safe choice (another thread may have been in
        # the middle of using them at fork time).  The poller's fds are the
        # parent's epoll set: this process's copies of them are closed.
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.done_cond, NULL)
        fp_cond_init_monotonic(&self.helper_cond)
        self.helpers_waiting = 0
        self.idle_head = self.leader = self.spawn_head = NULL
        self.polling = False
        self.queue_head = self.queue_tail = NULL
        self.done_head = self.done_tail = NULL
        self.n_workers = self.n_idle = self.n_busy = self.n_queued = self.n_blocking = 0
        self.n_coming = 0
        self.completer_waiting = False
        _poller_close(&self.poller)
        # The loop that took finished jobs is the parent's: the child's
        # completer takes them.
        if self.done_fd >= 0:
            close(self.done_fd)
        self.done_fd = -1
        self.done_poked = False

    def stats(self):
        cdef int workers, idle, busy, queued, peak, parked
        with nogil:
            pthread_mutex_lock(&self.lock)
            workers = self.n_workers
            idle = self.n_idle + (1 if self.leader != NULL else 0)
            busy = self.n_busy
            queued = self.n_queued
            peak = self.peak
            parked = self.poller.n_parked
            pthread_mutex_unlock(&self.lock)
        return {
            "workers": workers, "idle": idle, "busy": busy, "queued": queued, "peak": peak,
            "parked": parked,
        }

    def poller_fds(self):
        """The fds the poller holds (its epoll set and eventfd), if open."""
        cdef int epfd, evfd
        with nogil:
            pthread_mutex_lock(&self.lock)
            epfd = self.poller.epfd
            evfd = self.poller.evfd
            pthread_mutex_unlock(&self.lock)
        return () if epfd < 0 else (epfd, evfd)

    # -- the queue and the workers, all under the lock ---------------------

    cdef inline void _note_busy(self) noexcept nogil:
        self.n_busy += 1
        if self.n_busy > self.peak:
            self.peak = self.n_busy

    cdef inline bint _unpolled(self) noexcept nogil:
        # Copies are parked and nobody polls for them.
        return self.poller.n_parked > 0 and not self.polling

    cdef bint _has_room(self) noexcept nogil:
        return self.max_workers < 0 or self.n_workers < self.max_workers

    cdef bint _spawn_room(self) noexcept nogil:
        # Room for a thread for a copy that is only ready: see spawn_cap.
        return self._has_room() and self.n_workers - self.n_blocking < self.spawn_cap

    cdef CWorker *_new_worker(self, CopyState *st) noexcept nogil:
        return self._count_worker(<CWorker *>malloc(sizeof(CWorker)), st)

    cdef CWorker *_count_worker(self, CWorker *w, CopyState *st) noexcept nogil:
        # Counted at once, so that the room it takes is taken.
        if w == NULL:
            return NULL
        memset(w, 0, sizeof(CWorker))
        sem_init(&w.wake, 0, 0)
        w.job = st
        self.n_workers += 1
        return w

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

    cdef CWorker *_claim_idle(self, CopyState *st, CWorker **wake) noexcept nogil:
        # An idle follower gets st (or, with st NULL, is woken to look at the
        # pool); off the idle list, nothing else posts to it or lets it
        # leave, and it stays asleep until _post_all() posts it after the
        # unlock.  Its `next` link chains the workers to post.
        cdef CWorker *w = self.idle_head
        self._unlink_idle(w)
        w.job = st
        w.next = wake[0]
        wake[0] = w
        return w

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
        st.jstate = J_QUEUED
        st.queued_ms = _now_ms()
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
        st.jstate = J_RUNNING
        self.n_queued -= 1
        self._note_busy()
        return st

    cdef void _dispatch(self, CWorker **wake) noexcept nogil:
        """Hand queued copies to idle followers; if copies are still left,
        wake the leader to run one, or ask for a thread when they have
        waited too long."""
        while self.queue_head != NULL and self.idle_head != NULL:
            self._claim_idle(self._pop_queue(), wake)
        if self.queue_head != NULL:
            if self.leader != NULL:
                _poller_poke(&self.poller)
            else:
                self._maybe_spawn(False)

    cdef void _maybe_spawn(self, bint now_please) noexcept nogil:
        """Ask the completer for one more thread, if copies are stranded.

        Copies are stranded when they wait in the queue, or in the poller
        with no leader to poll for them, while every worker runs a copy.
        Unless now_please (a worker is about to block), they must have waited
        SPAWN_AFTER_MS, and the last thread must have been asked for as long
        ago: a backlog of short copies is drained by the threads there are.
        """
        cdef long long now
        cdef CWorker *w
        if self.shutting_down or not self._has_room() or self.spawn_head != NULL:
            return
        if not now_please and not self._spawn_room():
            return
        if self.queue_head == NULL and not self._unpolled():
            return
        # Threads asked for and not started yet will take those copies: a
        # thread that is slow to start (a busy machine) must not have every
        # worker that blocks meanwhile ask for one more.
        if self.n_coming >= self.n_queued + <int>self._unpolled():
            return
        if not now_please:
            now = _now_ms()
            if now - self.spawn_ms < SPAWN_AFTER_MS:
                return
            if self.queue_head != NULL and now - self.queue_head.queued_ms < SPAWN_AFTER_MS:
                if not self._unpolled():
                    return
            self.spawn_ms = now
        w = self._new_worker(NULL)
        if w == NULL:
            return  # no memory: the copies wait for the workers there are
        w.coming = True
        self.n_coming += 1
        w.next = self.spawn_head
        self.spawn_head = w
        if self.completer_waiting:
            pthread_cond_signal(&self.done_cond)

    cdef void _release_idle(self) noexcept nogil:
        # Idle followers leave (shutdown).
        cdef CWorker *w
        while self.idle_head != NULL:
            w = self.idle_head
            self._unlink_idle(w)
            self.n_workers -= 1
            w.exit_flag = True
            sem_post(&w.wake)
        if self.n_workers == 0 and self.completer_waiting:
            pthread_cond_signal(&self.done_cond)

    # -- the Python side's calls ------------------------------------------

    cdef int _check_submit(self, CopyJob job) except -1:
        cdef CopyState *st = &job.st
        if st.started or st.status != STEP_AGAIN or st.owner != NULL:
            raise RuntimeError("a CopyJob runs only once")
        return 0

    cdef void _own(self, CopyJob job) noexcept:
        # The pool owns a reference from here until take_done(), and the job
        # one to the pool, for cancel() to reach a parked copy.
        Py_INCREF(job)
        job.st.owner = <PyObject *>job
        job.st.link = NULL
        job.st.pooled = True
        job._pool = self

    cdef void _disown(self, CopyJob job) noexcept:
        job.st.owner = NULL
        job._pool = None
        Py_DECREF(job)

    cdef void _lock_with_gil(self):
        # Most calls find the lock free: taking it without letting the GIL
        # go spares the caller a GIL hand-over to the completer (which then
        # runs a whole batch of completions before the caller gets it back).
        if pthread_mutex_trylock(&self.lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.lock)

    cdef object _place(self, CopyJob job, CWorker **spare, CWorker **wake):
        """Under the lock: give job to an idle follower (True), queue it for
        the leader or a running worker (False), or to a new worker made from
        spare[0] (its WorkerHandle; spare[0] becomes NULL).  Raises
        MemoryError, with nothing changed, if it needs a worker and spare[0]
        is NULL and malloc fails."""
        cdef CopyState *st = &job.st
        cdef WorkerHandle handle
        if self.queue_head == NULL and self.idle_head != NULL:
            self._own(job)
            st.jstate = J_RUNNING
            self._note_busy()
            self._claim_idle(st, wake)
            return True
        if self.leader == NULL and self._spawn_room():
            if spare[0] == NULL:
                spare[0] = <CWorker *>malloc(sizeof(CWorker))
                if spare[0] == NULL:
                    raise MemoryError()
            handle = WorkerHandle.__new__(WorkerHandle)
            handle.w = self._count_worker(spare[0], st)
            spare[0] = NULL
            self._own(job)
            st.jstate = J_HANDED
            self._note_busy()
            return handle
        # The leader (poked here) or a worker finishing its copy takes it.
        self._own(job)
        self._enqueue(st)
        self._dispatch(wake)
        return False

    def submit(self, CopyJob job not None):
        """Hand a job to an idle worker, or queue it.

        Returns:
            True when an idle worker took the job, False when it was queued
            (the leader or a running worker takes it), or a WorkerHandle
            when a new worker must be started for it (the caller starts a
            thread running ``worker_main(handle)``).

        Raises:
            RuntimeError: after shutdown().
            MemoryError: no memory for a new worker.
        """
        cdef CWorker *wake = NULL
        cdef CWorker *spare = NULL
        self._check_submit(job)
        self._lock_with_gil()
        try:
            if self.shutting_down:
                raise RuntimeError("cannot start a relay after shutdown")
            return self._place(job, &spare, &wake)
        finally:
            pthread_mutex_unlock(&self.lock)
            self._post_all(wake)

    cdef bint _park_first(self, CopyJob job, bint idle) noexcept:
        """Under the lock: park a new job whose source has nothing to read
        (idle) in the poller at once, instead of waking a worker only to
        find that out; False if it must be placed as usual."""
        cdef CopyState *st = &job.st
        if not idle or self.leader == NULL:
            return False
        st.park_fd = st.src
        st.park_events = POLLIN
        if _poller_arm(&self.poller, st):
            return False  # epoll takes no such fd (EPERM): it runs as usual
        self._own(job)
        # Parked: it has started, as a copy that parked after running has.
        st.in_worker = True
        return True

    cdef bint _may_park_first(self, CopyJob job) noexcept:
        # A fresh job with nothing to do before its first read: no Python
        # prologue (read-ahead to deliver, a writer to flush) and no idle
        # deadline (the core's heap wants one set by the copy itself).
        cdef CopyState *st = &job.st
        return not st.needs_prologue and st.idle_ms < 0 and not fp_load_int(&st.cancel_req)

    def submit_pair(self, CopyJob a not None, CopyJob b not None):
        """Submit both jobs of a proxy, or neither (MemoryError, RuntimeError).

        A direction whose source has nothing to read yet (the reply
        direction of a new connection, typically) is parked in the poller
        at once: no worker is woken only to find its socket empty.

        Returns:
            What ``submit()`` returns, for each (False for a parked one).
        """
        cdef CWorker *wake = NULL
        cdef CWorker *spares[2]
        cdef object for_a, for_b
        cdef pollfd fds[2]
        cdef bint idle[2]
        self._check_submit(a)
        self._check_submit(b)
        if a is b:
            raise RuntimeError("a CopyJob runs only once")
        # One poll for both sources, before the lock (a few hundred ns; the
        # worker it may spare costs two context switches and a futex).  Only
        # while a leader polls (read here without the lock, as a hint; the
        # lock's holder looks again): it watches a parked copy from the
        # start, and otherwise a copy that is ready and one that waits take
        # the same road, through a worker.
        idle[0] = idle[1] = False
        if (
            self.leader != NULL
            and self._may_park_first(a)
            and self._may_park_first(b)
        ):
            fds[0].fd = a.st.src
            fds[1].fd = b.st.src
            fds[0].events = fds[1].events = POLLIN
            fds[0].revents = fds[1].revents = 0
            if poll(fds, 2, 0) >= 0:
                idle[0] = fds[0].revents == 0 and _src_idle(&a.st)
                idle[1] = fds[1].revents == 0 and _src_idle(&b.st)
        # Made first, so that running out of memory leaves nothing half done.
        spares[0] = <CWorker *>malloc(sizeof(CWorker))
        spares[1] = <CWorker *>malloc(sizeof(CWorker))
        if spares[0] == NULL or spares[1] == NULL:
            free(spares[0])
            free(spares[1])
            raise MemoryError()
        self._lock_with_gil()
        try:
            if self.shutting_down:
                raise RuntimeError("cannot start a relay after shutdown")
            if self._park_first(a, idle[0]):
                for_a = False
            else:
                for_a = self._place(a, &spares[0], &wake)
            if self._park_first(b, idle[1]):
                for_b = False
            else:
                for_b = self._place(b, &spares[1], &wake)
            return for_a, for_b
        finally:
            pthread_mutex_unlock(&self.lock)
            self._post_all(wake)
            free(spares[0])
            free(spares[1])

    def unqueue(self, CopyJob job not None):
        """Take a job off the queue, or back from a new worker whose thread
        has not taken it, if no worker has ever run it; True if taken (it
        will never run)."""
        cdef CopyState *st = &job.st
        cdef bint found = False
        cdef bint handed = False
        if st.orphan:
            return False  # the parent's queue, not this process's
        with nogil:
            pthread_mutex_lock(&self.lock)
            if st.jstate == J_QUEUED and not st.in_worker:
                self._unlink_queued(st)
                st.jstate = J_DONE
                found = True
            elif st.jstate == J_HANDED:
                # The thread that is to start this worker may be the caller
                # (a shutdown or cancel inside Thread.start()), so nothing may
                # wait for that thread.  The worker still points at st: the
                # pool's reference stays until the worker's thread takes it,
                # or abandon() undoes the worker, and that one lets it go.
                st.jstate = J_DONE
                self.n_busy -= 1
                handed = True
            pthread_mutex_unlock(&self.lock)
        if handed:
            return True
        if found:
            st.link = NULL
            self._disown(job)  # the pool's reference
        return found

    cdef void _kick(self, CopyState *st) noexcept nogil:
        """CopyJob.cancel() on a pool copy.  One that no worker holds (parked,
        or queued to resume) is stopped here and now, in the caller's thread:
        it needs no worker to end, however busy the pool.  A running one is
        signalled by cancel() itself; one that never ran sees the flag when
        it starts (or Python takes it off the queue)."""
        cdef bint mine = False
        pthread_mutex_lock(&self.lock)
        if st.jstate == J_PARKED:
            _poller_unpark(&self.poller, st, 0)
            mine = True
        elif st.jstate == J_QUEUED and st.in_worker:
            self._unlink_queued(st)
            mine = True
        if mine:
            st.jstate = J_RUNNING  # this thread's until it is filed as done
        pthread_mutex_unlock(&self.lock)
        if mine:
            st.cancelled = True
            st.err = ECANCELED
            st.status = STEP_ERROR
            self._end(st)
            pthread_mutex_lock(&self.lock)
            self._file_done(st)
            pthread_mutex_unlock(&self.lock)

    cdef void _unlink_queued(self, CopyState *st) noexcept nogil:
        # Under the lock: take st, which is queued, off the queue.
        cdef CopyState *prev = NULL
        cdef CopyState *cur = self.queue_head
        while cur != st:
            prev = cur
            cur = cur.link
        if prev == NULL:
            self.queue_head = st.link
        else:
            prev.link = st.link
        if self.queue_tail == st:
            self.queue_tail = prev
        st.link = NULL
        self.n_queued -= 1

    cdef void _file_done(self, CopyState *st) noexcept nogil:
        """Under the lock: st is over; it goes to the done list, for the
        completer (or a thread helping in result()), which is woken."""
        st.jstate = J_DONE
        st.link = NULL
        if self.done_tail == NULL:
            self.done_head = st
        else:
            self.done_tail.link = st
        self.done_tail = st
        # Signalled under the lock: the pool outlives its workers, and a
        # waiter re-checks under the lock.  A helper first: it completes the
        # relay in the thread that waits for it.
        if self.helpers_waiting:
            pthread_cond_signal(&self.helper_cond)
        elif self.done_fd >= 0:
            # Once per batch: take_ready() clears it when it takes them.
            if not self.done_poked:
                self.done_poked = True
                fp_eventfd_poke(self.done_fd)
        elif self.completer_waiting:
            pthread_cond_signal(&self.done_cond)

    def abandon(self, WorkerHandle handle not None):
        """The thread for a new worker could not start: undo it.

        Safe on a handle whose thread did start (then it does nothing), and
        on one abandoned before.

        Returns:
            The job it was to run first, to be failed by the caller; or None.
        """
        cdef CWorker *w = handle.w
        cdef CopyState *st
        cdef object job = None
        cdef CWorker *wake = NULL
        cdef bint taken_back = False
        handle.w = NULL
        if w == NULL:
            # Its thread did start and took the worker (the exception came
            # after, e.g. Ctrl-C in Thread.start()'s wait), or this handle was
            # abandoned already: the caller cancels the relay instead.
            return None
        with nogil:
            pthread_mutex_lock(&self.lock)
            st = w.job
            w.job = NULL
            self.n_workers -= 1
            if w.coming:
                self.n_coming -= 1
            if st != NULL and st.jstate == J_HANDED:
                self.n_busy -= 1
                st.jstate = J_DONE
            elif st != NULL:
                taken_back = True  # by unqueue(), which counted it out
            # Copies the missing thread was to run are the others' now.
            self._dispatch(&wake)
            if self.n_workers == 0 and self.completer_waiting:
                pthread_cond_signal(&self.done_cond)
            pthread_mutex_unlock(&self.lock)
            self._post_all(wake)
        sem_destroy(&w.wake)
        free(w)
        if st != NULL:
            job = <object>st.owner
            self._disown(<CopyJob>job)  # `job` still holds a reference
        return None if taken_back else job

    def name_this_thread(self, bytes name not None):
        """Give the calling thread an OS-level name (at most 15 bytes)."""
        pthread_setname_np(pthread_self(), name[:15])

    def take_done(self):
        """Wait for finished jobs, or threads to start, and take them all.

        The completer thread's loop; it waits without the GIL.

        Returns:
            ``(jobs, handles)``: the CopyJobs that finished, in the order
            they ended, and WorkerHandles of new workers to start a thread
            for; None once the pool is shut down and has no worker and no
            finished job left, which tells the completer to exit.
        """
        cdef CopyState *head
        cdef CWorker *spawn
        cdef CWorker *nxt
        cdef WorkerHandle handle
        cdef list handles = []
        with nogil:
            pthread_mutex_lock(&self.lock)
            while self.done_head == NULL and self.spawn_head == NULL and not (
                self.shutting_down and self.n_workers == 0 and self.queue_head == NULL
            ):
                self.completer_waiting = True
                pthread_cond_wait(&self.done_cond, &self.lock)
                self.completer_waiting = False
            head = self.done_head
            self.done_head = self.done_tail = NULL
            spawn = self.spawn_head
            self.spawn_head = NULL
            pthread_mutex_unlock(&self.lock)
        if head == NULL and spawn == NULL:
            return None
        while spawn != NULL:
            nxt = spawn.next
            spawn.next = NULL
            handle = WorkerHandle.__new__(WorkerHandle)
            handle.w = spawn
            handles.append(handle)
            spawn = nxt
        return self._adopt(head), handles

    def completer_asleep(self):
        """Whether the completer thread waits in take_done() for a wake-up."""
        cdef bint asleep
        with nogil:
            pthread_mutex_lock(&self.lock)
            asleep = self.completer_waiting
            pthread_mutex_unlock(&self.lock)
        return asleep

    def ready_fd(self):
        """Have the caller's event loop take finished jobs: return an fd
        that turns readable when some are ready for take_ready().

        From then on a finished job no longer wakes the completer thread
        (which still starts the threads the core asks for, and takes what
        it finds when it wakes).  A loop that completes its relays in its
        own thread spares each one a hand-over of the GIL to the completer
        and back.

        Raises:
            OSError: no eventfd could be made.
        """
        cdef int fd
        cdef int err = 0
        with nogil:
            pthread_mutex_lock(&self.lock)
            if self.done_fd < 0:
                self.done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
                if self.done_fd < 0:
                    err = errno
                    self.done_fd = -1
            fd = self.done_fd
            # Jobs that finished before: the loop's first look takes them.
            if fd >= 0 and self.done_head != NULL and not self.done_poked:
                self.done_poked = True
                fp_eventfd_poke(fd)
            pthread_mutex_unlock(&self.lock)
        if fd < 0:
            raise OSError(err, _os.strerror(err))
        return fd

    def take_ready(self):
        """Take every finished job without waiting (the loop of ready_fd()).

        Returns:
            The CopyJobs that finished, in the order they ended; possibly
            none.
        """
        cdef CopyState *head
        with nogil:
            # Read before the list is taken: a job filed after this read
            # pokes again, or is in the list taken below.
            if self.done_fd >= 0:
                fp_eventfd_drain(self.done_fd)
            pthread_mutex_lock(&self.lock)
            head = self.done_head
            self.done_head = self.done_tail = NULL
            self.done_poked = False
            pthread_mutex_unlock(&self.lock)
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
            (<CopyJob>owner)._pool = None
            jobs.append(<object>owner)
            Py_DECREF(<object>owner)  # the reference submit() took
            head = nxt
        return jobs

    def shutdown(self, bint cancel_queued):
        """Refuse new jobs and let idle workers exit; parked and running
        copies go on to their end.

        Returns:
            With ``cancel_queued``, the jobs taken off the queue that never
            ran (copies that ran and wait to resume stay queued).
        """
        cdef CopyState *taken = NULL
        cdef CopyState *prev = NULL
        cdef CopyState *cur
        cdef CopyState *nxt
        cdef list jobs = []
        cdef CopyJob job
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.shutting_down = True
            if cancel_queued:
                cur = self.queue_head
                while cur != NULL:
                    nxt = cur.link
                    if cur.in_worker:
                        prev = cur
                    else:
                        if prev == NULL:
                            self.queue_head = nxt
                        else:
                            prev.link = nxt
                        if self.queue_tail == cur:
                            self.queue_tail = prev
                        self.n_queued -= 1
                        cur.jstate = J_DONE
                        cur.link = taken
                        taken = cur
                    cur = nxt
                taken = _reversed(taken)
            self._release_idle()
            _poller_poke(&self.poller)
            pthread_cond_signal(&self.done_cond)
            pthread_mutex_unlock(&self.lock)
        while taken != NULL:
            nxt = taken.link
            taken.link = NULL
            job = <object>taken.owner
            jobs.append(job)
            self._disown(job)
            taken = nxt
        return jobs

    # -- the worker's side, without the GIL --------------------------------

    def worker_main(self, WorkerHandle handle not None):
        """The body of a worker thread: returns when the worker exits."""
        cdef CWorker *w = handle.w
        cdef CopyState *st
        cdef bint handed
        cdef int r
        cdef sigset_t oldmask
        # Taken with the GIL, as abandon() takes it: exactly one of the two
        # gets it.  abandon() won if an exception hit the starting thread
        # (Ctrl-C in Thread.start()) before this ran: nothing is ours.
        handle.w = NULL  # this thread owns it now
        if w == NULL:
            return
        # The OS-level name shows in top -H, ps -L, perf and gdb.
        pthread_setname_np(pthread_self(), b"fastpipe-worker")
        # A worker made by submit() has its first copy already, unless
        # unqueue() took it back meanwhile: then the pool's reference to it
        # is this thread's to drop (with the GIL).
        self._lock_with_gil()
        st = w.job
        w.job = NULL
        handed = st != NULL and st.jstate == J_HANDED
        if handed:
            st.jstate = J_RUNNING
        pthread_mutex_unlock(&self.lock)
        if st != NULL and not handed:
            self._disown(<CopyJob>st.owner)
            st = NULL
        with nogil:
            fp_block_sigpipe(&oldmask)  # for the thread's life (see _compat.h)
            if st == NULL:
                st = self._next_job(w, NULL)
            while st != NULL:
                r = self._run(w, st)
                if r == STEP_PARK:
                    r = self._park(w, st)
                    if r == PARK_RETRY:
                        continue
                    if r == PARK_DONE:
                        st = self._next_job(w, NULL)
                        continue
                elif r == STEP_YIELD:
                    st = self._yield(st)
                    continue
                self._end(st)
                st = self._next_job(w, st)
            fp_alarm_free(&w.alarm)
            sem_destroy(&w.wake)
            free(w)

    cdef int _run(self, CWorker *w, CopyState *st) noexcept nogil:
        """Run st until it ends (STEP_DONE, with st.status set), must wait
        (STEP_PARK) or has moved a slice (STEP_YIELD)."""
        cdef int r
        if not st.prepared:
            st.prepared = True
            st.in_worker = True
            if st.needs_prologue and not fp_load_int(&st.cancel_req):
                # Python code that may wait for the GIL, or block in a flush:
                # copies must not be left stranded meanwhile.
                self._before_blocking(w)
                with gil:
                    r = (<CopyJob>st.owner)._run_prologue()
                pthread_mutex_lock(&self.lock)
                self._unblocked(w)
                pthread_mutex_unlock(&self.lock)
                if r < 0:
                    st.status = STEP_ERROR
                    st.err = 0  # the error is a Python exception on the job
                    return STEP_DONE
            if _prepare(st, False, st.zerocopy) < 0:
                st.status = STEP_ERROR
                return STEP_DONE
        if FP_CANCELLABLE:
            pthread_mutex_lock(&st.wake_lock)
            st.thread = pthread_self()
            st.in_thread = True
            pthread_mutex_unlock(&st.wake_lock)
        st.stall = &w.alarm
        st.slice_end = st.copied + SLICE_BYTES
        while True:
            r = _copy_step(st)
            # A slice moved: the pool gets a look, and the copy goes on here,
            # holding its buffers, its pipe and its armed stall alarm,
            # unless another copy is owed this thread.
            if r == STEP_YIELD and not self._look_at_pool():
                st.slice_end = st.copied + SLICE_BYTES
            # EINTR in a worker: handlers run in the main thread, retry.
            elif r != STEP_SIGNALS:
                break
        if st.stall_armed:
            fp_alarm_disarm(st.stall)
            st.stall_armed = False
        st.stall = NULL
        if FP_CANCELLABLE:
            pthread_mutex_lock(&st.wake_lock)
            st.in_thread = False
            pthread_mutex_unlock(&st.wake_lock)
        if r == STEP_PARK or r == STEP_YIELD:
            return r
        if r == STEP_CANCELLED:
            st.cancelled = True
            st.err = ECANCELED
            r = STEP_ERROR
        st.status = r
        return STEP_DONE

    cdef int _park(self, CWorker *w, CopyState *st) noexcept nogil:
        """Park st in the poller: a PARK_* outcome."""
        cdef int err
        cdef bint reading = (st.park_events & POLLIN) != 0
        # A parked copy holds no buffer and no pipe, unless they hold bytes
        # not yet written (then it waits for its sink, to write them).
        if st.pend_len == 0:
            _release(st)
        if st.pipe_len == 0:
            _release_pipe(st)
        pthread_mutex_lock(&self.lock)
        if FP_CANCELLABLE and fp_load_int(&st.cancel_req):
            # cancel() came between the copy's last look and this lock: it
            # found the copy running, so it must stop itself.
            pthread_mutex_unlock(&self.lock)
            return PARK_RETRY
        err = _poller_open(&self.poller)
        if not err:
            err = _poller_arm(&self.poller, st)
        if not err:
            self.n_busy -= 1
            if self.leader != NULL and st.heap_idx == 0:
                _poller_poke(&self.poller)  # a deadline earlier than the leader's
            pthread_mutex_unlock(&self.lock)
            return PARK_DONE
        pthread_mutex_unlock(&self.lock)
        if err == EPERM or err == EBUSY:
            # epoll takes no such fd, or another copy waits on it the same
            # way: this copy waits for it in its thread, as in a caller's.
            if st.park_fd == st.src and reading:
                st.src_unpollable = True
            else:
                st.dst_unpollable = True
            self._before_blocking(w)
            return PARK_RETRY
        st.err = err
        st.status = STEP_ERROR
        return PARK_FAILED

    cdef void _before_blocking(self, CWorker *w) noexcept nogil:
        # The running worker is about to block outside the pool's control
        # (until _unblocked): it no longer counts against spawn_cap, and
        # copies that wait for a thread, or a poller without a leader, get
        # an idle follower or a new thread now.
        cdef CWorker *wake = NULL
        pthread_mutex_lock(&self.lock)
        if not w.blocking:
            w.blocking = True
            self.n_blocking += 1
        if self.queue_head != NULL or self._unpolled():
            self._dispatch(&wake)
            if self._unpolled() and self.idle_head != NULL:
                self._claim_idle(NULL, &wake)  # it becomes the leader
            self._maybe_spawn(True)
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)

    cdef inline void _unblocked(self, CWorker *w) noexcept nogil:
        # Under the lock: w runs under the pool's control again.
        if w.blocking:
            w.blocking = False
            self.n_blocking -= 1

    cdef bint _look_at_pool(self) noexcept nogil:
        """A running copy has moved a slice: poll for parked copies nobody
        polls for, hand queued ones to idle followers, and say whether the
        copy must give its thread to one of them (a pool at its thread bound
        with copies waiting: they take turns)."""
        cdef CWorker *wake = NULL
        cdef bint switch = False
        pthread_mutex_lock(&self.lock)
        if self._unpolled():
            if self.idle_head != NULL:
                self._claim_idle(NULL, &wake)  # it becomes the leader
            elif self._spawn_room():
                self._maybe_spawn(False)
            else:
                self._poll_now()
        if self.queue_head != NULL:
            self._dispatch(&wake)
            switch = self.queue_head != NULL and not self._spawn_room()
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)
        return switch

    cdef CopyState *_yield(self, CopyState *st) noexcept nogil:
        """st gives its thread to the copy at the head of the queue and
        waits its turn at the tail; return the copy to run (st itself, if
        the queue emptied meanwhile)."""
        cdef CopyState *nxt = st
        # Nothing is pending at a slice's end: the buffers and an empty pipe
        # go back, so that a copy waiting its turn holds neither.  Before
        # the copy is queued: from then on another worker may run it.
        _release(st)
        _release_pipe(st)
        pthread_mutex_lock(&self.lock)
        if self.queue_head != NULL:
            self.n_busy -= 1
            self._enqueue(st)
            nxt = self._pop_queue()
        pthread_mutex_unlock(&self.lock)
        return nxt

    cdef void _poll_now(self) noexcept nogil:
        """Under the lock, with no leader: take what is ready without
        waiting (a worker of a full pool running a long copy)."""
        cdef epoll_event evs[POLL_EVENTS]
        cdef CopyState *woken
        cdef int n
        self.polling = True
        pthread_mutex_unlock(&self.lock)
        n = epoll_wait(self.poller.epfd, evs, POLL_EVENTS, 0)
        pthread_mutex_lock(&self.lock)
        self.polling = False
        woken = _poller_events(&self.poller, evs, n) if n > 0 else NULL
        self._enqueue_all(woken)

    cdef void _enqueue_all(self, CopyState *st) noexcept nogil:
        cdef CopyState *nxt
        while st != NULL:
            nxt = st.link
            self._enqueue(st)
            st = nxt

    cdef void _end(self, CopyState *st) noexcept nogil:
        """st has ended: out of the poller, buffers back, ends closed."""
        cdef bint last = False
        if st.status == STEP_ERROR and st.err == EPIPE:
            fp_discard_sigpipe()
        if st.reg_src or st.reg_dst or st.partner != NULL:
            pthread_mutex_lock(&self.lock)
            # Before its fds close: the number may be reused at once.
            _poller_release(&self.poller, st)
            if st.partner != NULL:
                st.pair_ended = True
                last = st.partner.pair_ended
            pthread_mutex_unlock(&self.lock)
        _discard(st)
        _close_ends(st)
        if last:
            # Both directions are over and out of the poller: this worker
            # closes the proxy's two fds, with no GIL, so that the thread
            # completing the proxy only has to mark its objects closed.
            # An fd closed and reused under a parked copy is not ours.
            if st.src != st.lost_fd and st.src != st.partner.lost_fd:
                close(st.src)
            if st.dst != st.lost_fd and st.dst != st.partner.lost_fd:
                close(st.dst)

    cdef CopyState *_next_job(self, CWorker *w, CopyState *done) noexcept nogil:
        """File a finished copy (if any) and find the next one to run: from
        the queue, as the leader, or handed over as a follower.  NULL when
        the worker must exit."""
        cdef CopyState *st = NULL
        cdef CWorker *wake = NULL
        cdef bint wake_completer = False
        cdef bint counted_out = False
        cdef int r
        pthread_mutex_lock(&self.lock)
        if w.coming:
            # Here at last: from this lock on, it takes what it was asked for.
            w.coming = False
            self.n_coming -= 1
        self._unblocked(w)  # a copy that waited in its thread has ended or parked
        if done != NULL:
            self._file_done(done)
            self.n_busy -= 1
        while True:
            if self.queue_head != NULL:
                st = self._pop_queue()
                self._dispatch(&wake)
                break
            if self.shutting_down and (self.poller.n_parked == 0 or self.polling):
                break  # the leader stays for the parked copies
            # This worker is about to wait: whoever it was to wake must not
            # wait with it (posted under the lock this once).
            if wake != NULL:
                self._post_all(wake)
                wake = NULL
            if self._unpolled():
                self._lead(w)
                continue
            r = self._follow(w)
            if r < 0:
                counted_out = True
                break
            if w.job != NULL:
                st = w.job
                w.job = NULL
                break
            # Woken with no copy: to lead, or to look at the queue.
        if st == NULL:
            if not counted_out:
                self.n_workers -= 1
            if self.n_workers == 0:
                if self.poller.n_parked == 0:
                    _poller_close(&self.poller)
                wake_completer = self.completer_waiting
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)
        if wake_completer:
            pthread_cond_signal(&self.done_cond)
        return st

    cdef void _lead(self, CWorker *w) noexcept nogil:
        """Under the lock: wait in epoll_wait for parked copies and queue the
        ones that are ready (or whose deadline, or fd, is gone)."""
        cdef epoll_event evs[POLL_EVENTS]
        cdef CopyState *woken
        cdef long long now, timeout
        cdef int n
        self.leader = w
        self.polling = True
        now = _now_ms()
        if self.poller.sweep_ms == 0:
            self.poller.sweep_ms = now + _sweep_ms
        timeout = _poller_timeout(&self.poller, now)
        pthread_mutex_unlock(&self.lock)
        n = epoll_wait(
            self.poller.epfd, evs, POLL_EVENTS, <int>timeout if timeout < 0x7FFFFFFF else -1
        )
        pthread_mutex_lock(&self.lock)
        self.leader = NULL
        self.polling = False
        woken = _poller_events(&self.poller, evs, n) if n > 0 else NULL
        self._enqueue_all(woken)
        now = _now_ms()
        self._enqueue_all(_poller_expired(&self.poller, now))
        if self.poller.n_parked and now >= self.poller.sweep_ms:
            self._enqueue_all(_poller_sweep(&self.poller, now))

    cdef int _follow(self, CWorker *w) noexcept nogil:
        """Under the lock: wait idle on the semaphore.  0 when posted (with
        w.job set, or woken to look at the pool); -1 when the worker must
        exit, already counted out of n_workers."""
        cdef int r
        self._link_idle(w)
        pthread_mutex_unlock(&self.lock)
        while True:
            if self.idle_ms >= 0:
                r = fp_sem_wait_ms(&w.wake, self.idle_ms)
            else:
                r = sem_wait(&w.wake)
                if r < 0 and errno == EINTR:
                    continue
            if r == 0:
                pthread_mutex_lock(&self.lock)
                return -1 if w.exit_flag else 0
            # Timed out: leave the pool, unless a copy or the exit sentinel
            # was handed over just now (then w is no longer on the idle list
            # and the post is on its way).
            pthread_mutex_lock(&self.lock)
            if w.idle:
                self._unlink_idle(w)
                self.n_workers -= 1
                return -1
            pthread_mutex_unlock(&self.lock)


cdef bint _src_idle(CopyState *st) noexcept nogil:
    """Whether a new copy whose source poll() found not readable would
    only wait: a pipe's read end with nothing in it, or a socket whose read
    would say EAGAIN.  A pipe's write end, a listening socket or one not
    connected, which poll() finds not readable either, fail at their first
    read instead, so they must run.

    Its source's kind and identity are kept, as _prepare would find them,
    and the poller's sweep compares the fd with.  False, and the copy runs
    as usual, for any other fd, or when a syscall fails (the copy's own
    first call reports it).
    """
    cdef int err = 0
    cdef char c
    if _fd_kind(st.src, &st.src_kind, &err, &st.src_dev, &st.src_ino) < 0:
        return False
    st.src_known = True
    if st.src_kind == KIND_PIPE:
        # A read of nothing: 0 from a read end, EBADF from a write end.
        return read(st.src, &c, 0) == 0
    if st.src_kind != KIND_SOCKET:
        return False
    return recv(st.src, &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 and errno == EAGAIN


cdef void _pool_kick(object pool, CopyState *st) noexcept:
    # CopyJob.cancel() for a copy its pool owns (see PoolCore._kick).
    cdef PoolCore core = <PoolCore>pool
    with nogil:
        core._kick(st)
