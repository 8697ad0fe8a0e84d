# The worker pool's GIL-free half: CWorker, WorkerHandle and PoolCore (the
# policy lives in _pool.py).
#
# A worker thread spends its whole life in PoolCore.worker_main with the GIL
# released: parked on its own semaphore, copying, or handing the finished job
# to the completer.  The hand-off (submit) and the completion (take_done)
# are the only steps that need the GIL, and completion happens in batches:
# one GIL acquisition finishes every job that ended meanwhile.

cdef struct CWorker:
    sem_t wake
    CWorker *prev           # idle list links, valid while idle is true
    CWorker *next
    CopyState *job          # set by whoever posts wake; read by the worker
    bint idle
    bint exit_flag
    # A spare from submit_pair(), idle before its thread runs.  It takes a
    # job only after the post that comes with it, like any parked worker:
    # posts come after the unlock, and the poster must find the worker
    # still there (not run, relinked or freed on a job it took unposted).
    bint born_idle


cdef class WorkerHandle:
    """A new worker's C half, handed from submit() to its thread once."""

    cdef CWorker *w

    def __dealloc__(self):
        # Only reached with w set if the thread could not be started.
        if self.w != NULL:
            sem_destroy(&self.w.wake)
            free(self.w)
            self.w = NULL


cdef class PoolCore:
    """Idle workers, the FIFO of waiting jobs, and the finished jobs.

    All of it lives under one mutex that is only ever held for a few pointer
    moves, so workers take it without the GIL.

    The queue holds single jobs and pairs (a proxy's two directions, the
    first marked pair_head), in order.  A pair starts whole or not at all:
    half a proxy running under max_workers would forward a request whose
    reply has no worker.  So an idle worker may wait while a pair at the head
    needs one more; it neither times out nor leaves meanwhile.  Invariant:
    while the queue is not empty the pool has no room to start a worker.
    """

    cdef pthread_mutex_t lock
    cdef pthread_cond_t done_cond
    cdef CWorker *idle_head
    cdef CopyState *queue_head
    cdef CopyState *queue_tail
    cdef CopyState *done_head
    cdef CopyState *done_tail
    cdef int n_workers, n_idle, n_busy, n_queued, peak
    cdef int max_workers      # -1: no limit
    cdef long long idle_ms    # -1: idle workers never exit
    cdef bint shutting_down
    cdef bint completer_waiting
    # Threads blocked in Relay.result() that finish jobs themselves: a
    # finished job wakes one of them before it wakes the completer thread.
    cdef pthread_cond_t helper_cond
    cdef int helpers_waiting

    def __cinit__(self, max_workers=None, idle_worker_timeout=None):
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.done_cond, NULL)
        fp_cond_init_monotonic(&self.helper_cond)
        self.max_workers = -1 if max_workers is None else max_workers
        self.idle_ms = _check_idle_timeout(idle_worker_timeout)

    def reset_after_fork(self):
        # The child has none of the parent's threads.  Their CWorker structs
        # and the jobs they ran are unreachable here; dropping them without
        # freeing is the only safe choice (another thread may have been in
        # the middle of using them at fork time).
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.done_cond, NULL)
        fp_cond_init_monotonic(&self.helper_cond)
        self.helpers_waiting = 0
        self.idle_head = NULL
        self.queue_head = self.queue_tail = NULL
        self.done_head = self.done_tail = NULL
        self.n_workers = self.n_idle = self.n_busy = self.n_queued = 0
        self.completer_waiting = False

    def stats(self):
        cdef int workers, idle, busy, queued, peak
        with nogil:
            pthread_mutex_lock(&self.lock)
            workers = self.n_workers
            idle = self.n_idle
            busy = self.n_busy
            queued = self.n_queued
            peak = self.peak
            pthread_mutex_unlock(&self.lock)
        return {"workers": workers, "idle": idle, "busy": busy, "queued": queued, "peak": peak}

    cdef inline void _note_busy(self) noexcept nogil:
        self.n_busy += 1
        if self.n_busy > self.peak:
            self.peak = self.n_busy

    cdef int _check_submit(self, CopyJob job) except -1:
        cdef CopyState *st = &job.st
        if job._started or st.status != STEP_AGAIN or st.owner != NULL:
            raise RuntimeError("a CopyJob runs only once")
        return 0

    cdef bint _has_room(self, int n) noexcept nogil:
        return self.max_workers < 0 or self.n_idle + self.max_workers - self.n_workers >= n

    cdef object _hand(self, CopyState *st, CWorker *fresh, CWorker **wake):
        """Under the lock: give st to an idle worker (True; it joins the
        ``wake`` chain, for the caller to post once it has unlocked), else
        to ``fresh``, a new worker made by the caller (its WorkerHandle, for
        the caller to start a thread for)."""
        cdef WorkerHandle handle
        self._note_busy()
        if self.idle_head != NULL:
            self._claim_idle(st, wake)
            return True
        fresh.job = st
        handle = WorkerHandle.__new__(WorkerHandle)
        handle.w = fresh
        return handle

    cdef CWorker *_new_worker(self, CopyState *st) noexcept nogil:
        # Counted at once, so that the room it takes is taken.
        cdef CWorker *w = <CWorker *>malloc(sizeof(CWorker))
        if w == NULL:
            return NULL
        memset(w, 0, sizeof(CWorker))
        sem_init(&w.wake, 0, 0)
        w.job = st
        self.n_workers += 1
        return w

    cdef void _free_worker(self, CWorker *w) noexcept nogil:
        # Under the lock: a worker made by _new_worker that never got a job
        # or a thread.
        if w != NULL:
            self.n_workers -= 1
            sem_destroy(&w.wake)
            free(w)

    cdef void _claim_idle(self, CopyState *st, CWorker **wake) noexcept nogil:
        # Under the lock, with an idle worker: it gets st, and is no longer
        # idle, so nothing else posts to it or lets it leave; it stays parked
        # until _post_all() posts it, after the unlock.  Off the idle list,
        # its `next` link chains the workers to post.
        cdef CWorker *w = self.idle_head
        self._unlink_idle(w)
        w.job = st
        w.next = wake[0]
        wake[0] = w

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
        st.pair_head = False
        self.n_queued -= 1
        return st

    cdef CopyState *_dispatch(self, bint spare, CWorker **wake) noexcept nogil:
        """Under the lock: hand out queued entries while the head can start
        whole, to idle workers put on the ``wake`` chain.  With ``spare`` (a
        worker that just finished a job and is still counted busy), the
        first job handed out is returned for it."""
        cdef CopyState *mine = NULL
        cdef int need
        while self.queue_head != NULL:
            need = 2 if self.queue_head.pair_head else 1
            if self.n_idle + (1 if spare and mine == NULL else 0) < need:
                break
            while need:
                need -= 1
                if spare and mine == NULL:
                    mine = self._pop_queue()
                else:
                    self._note_busy()
                    self._claim_idle(self._pop_queue(), wake)
        if self.shutting_down and self.queue_head == NULL:
            self._release_idle()
        return mine

    cdef void _release_idle(self) noexcept nogil:
        # Under the lock: idle workers leave (shutdown, once nothing waits).
        cdef CWorker *w
        while self.idle_head != NULL:
            w = self.idle_head
            self._unlink_idle(w)
            self.n_workers -= 1
            w.exit_flag = True
            sem_post(&w.wake)
        if self.n_workers == 0 and self.completer_waiting:
            pthread_cond_signal(&self.done_cond)

    cdef void _own(self, CopyJob job) noexcept:
        # The pool owns a reference from here until take_done().
        Py_INCREF(job)
        job.st.owner = <PyObject *>job
        job.st.link = NULL

    cdef void _disown(self, CopyJob job) noexcept:
        job.st.owner = NULL
        Py_DECREF(job)

    def submit(self, CopyJob job not None):
        """Hand a job to an idle worker, or queue it.

        Returns:
            True when an idle worker took the job, False when it was queued,
            or a WorkerHandle when a new worker must be started for it (the
            caller starts a thread running ``worker_main(handle)``).

        Raises:
            RuntimeError: after shutdown().
        """
        cdef object handed = False
        cdef CWorker *fresh = NULL
        cdef CWorker *wake = NULL
        self._check_submit(job)
        self._lock_with_gil()
        if self.shutting_down:
            pthread_mutex_unlock(&self.lock)
            raise RuntimeError("cannot start a relay after shutdown")
        if self.queue_head == NULL and self._has_room(1):
            if self.idle_head == NULL:
                fresh = self._new_worker(NULL)
                if fresh == NULL:
                    pthread_mutex_unlock(&self.lock)
                    raise MemoryError()
            self._own(job)
            handed = self._hand(&job.st, fresh, &wake)
        else:
            self._own(job)
            self._enqueue(&job.st)
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)
        return handed

    cdef void _lock_with_gil(self):
        # Most calls find the lock free: taking it without letting the GIL
        # go spares the caller a GIL hand-over to the completer (which then
        # runs a whole batch of completions before the caller gets it back).
        if pthread_mutex_trylock(&self.lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.lock)

    def submit_pair(self, CopyJob a not None, CopyJob b not None):
        """Start both jobs, or queue them to start together.

        Returns:
            ``(for_a, for_b, spare)``: what ``submit()`` returns for each job,
            and a WorkerHandle for a new idle worker (or None) for the caller
            to start.  When the pair must wait for a second worker, a free
            place in the pool is filled now: only a running worker can later
            hand the pair out.

        Raises:
            RuntimeError: after shutdown().
        """
        cdef object for_a = False
        cdef object for_b = False
        cdef CWorker *fresh_a = NULL
        cdef CWorker *fresh_b = NULL
        cdef CWorker *wake = NULL
        cdef CWorker *w
        cdef WorkerHandle spare = None
        self._check_submit(a)
        self._check_submit(b)
        if a is b:
            raise RuntimeError("a CopyJob runs only once")
        self._lock_with_gil()
        if self.shutting_down:
            pthread_mutex_unlock(&self.lock)
            raise RuntimeError("cannot start a relay after shutdown")
        if self.queue_head == NULL and self._has_room(2):
            # Every new worker is made before either job is handed out, so
            # that running out of memory leaves nothing half started.
            if self.n_idle < 2:
                fresh_b = self._new_worker(NULL)
                if self.n_idle < 1 and fresh_b != NULL:
                    fresh_a = self._new_worker(NULL)
                    if fresh_a == NULL:
                        self._free_worker(fresh_b)
                        fresh_b = NULL
                if fresh_b == NULL:
                    pthread_mutex_unlock(&self.lock)
                    raise MemoryError()
            self._own(a)
            self._own(b)
            for_a = self._hand(&a.st, fresh_a, &wake)
            for_b = self._hand(&b.st, fresh_b, &wake)
        else:
            self._own(a)
            self._own(b)
            self._enqueue(&a.st)
            a.st.pair_head = True
            self._enqueue(&b.st)
            if self.max_workers >= 0 and self.n_workers < self.max_workers:
                w = self._new_worker(NULL)
                if w != NULL:
                    # Idle from birth: a finishing worker may hand it the
                    # pair's other job before its thread is even running.
                    w.born_idle = True
                    self._link_idle(w)
                    spare = WorkerHandle.__new__(WorkerHandle)
                    spare.w = w
                # Without memory for it the pair waits for running workers.
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)
        return for_a, for_b, spare

    def unqueue(self, CopyJob job not None):
        """Take a job off the queue if no worker has it yet; True if taken.

        The other half of a queued pair stays queued as a single job (and may
        start at once)."""
        cdef CopyState *st = &job.st
        cdef CopyState *prev = NULL
        cdef CopyState *cur
        cdef bint found = False
        cdef CWorker *wake = NULL
        with nogil:
            pthread_mutex_lock(&self.lock)
            cur = self.queue_head
            while cur != NULL:
                if cur == st:
                    if prev == NULL:
                        self.queue_head = cur.link
                    else:
                        prev.link = cur.link
                        prev.pair_head = False
                    if self.queue_tail == cur:
                        self.queue_tail = prev
                    cur.pair_head = False
                    self.n_queued -= 1
                    found = True
                    break
                prev = cur
                cur = cur.link
            if found:
                self._dispatch(False, &wake)
            pthread_mutex_unlock(&self.lock)
            self._post_all(wake)
        if found:
            st.link = NULL
            self._disown(job)  # the pool's reference
        return found

    def abandon(self, WorkerHandle handle not None):
        """The thread for a new worker could not start: undo its submit.

        Safe on a handle whose thread did start (then it does nothing), and
        on one abandoned before.

        Returns:
            The job it was carrying, or had been handed meanwhile (a spare
            from ``submit_pair``), to be failed by the caller; or None.
        """
        cdef CWorker *w = handle.w
        cdef CopyState *st
        cdef object job = None
        cdef bint wake_completer
        handle.w = NULL
        if w == NULL:
            # Its thread did start and took the worker (the exception came
            # after, e.g. Ctrl-C in Thread.start()'s wait), or this handle was
            # abandoned already: the caller cancels the relay instead.
            return None
        with nogil:
            pthread_mutex_lock(&self.lock)
            if w.idle:
                self._unlink_idle(w)
            st = w.job
            w.job = NULL
            if not w.exit_flag:
                # Else shutdown's _release_idle let this spare go, and
                # counted it out, before its thread failed to start.
                self.n_workers -= 1
            if st != NULL:
                self.n_busy -= 1
            # The completer of a pool that shuts down waits for the last
            # worker to leave; this may have been it.
            wake_completer = self.n_workers == 0 and self.completer_waiting
            pthread_mutex_unlock(&self.lock)
            if wake_completer:
                pthread_cond_signal(&self.done_cond)
            if st != NULL and w.born_idle:
                # A spare handed a job: its post comes after the hand-out's
                # unlock, maybe not yet.  Take it before freeing the worker.
                while sem_wait(&w.wake) < 0 and errno == EINTR:
                    pass
        sem_destroy(&w.wake)
        free(w)
        if st != NULL:
            job = <object>st.owner
            st.owner = NULL
            Py_DECREF(job)  # the pool's reference; `job` still holds one
        return job

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

    cdef bint _park(self, CWorker *w) noexcept nogil:
        """Wait for the next job; True when the worker must exit instead."""
        cdef int r
        while True:
            if self.idle_ms >= 0:
                r = fp_sem_wait_ms(&w.wake, self.idle_ms)
            else:
                r = sem_wait(&w.wake)
                if r < 0 and errno == EINTR:
                    continue
            if r == 0:
                return w.exit_flag
            # Timed out: leave the pool, unless a job or the exit sentinel
            # was handed over just now (then w is no longer on the idle list
            # and the post is on its way), or a pair waiting at the head of
            # the queue counts on this worker.
            pthread_mutex_lock(&self.lock)
            if w.idle and self.queue_head == NULL:
                self._unlink_idle(w)
                self.n_workers -= 1
                pthread_mutex_unlock(&self.lock)
                return True
            pthread_mutex_unlock(&self.lock)

    cdef CopyState *_finish(self, CWorker *w, CopyState *st, bint *leave) noexcept nogil:
        """File a finished job; return the next queued one, or go idle.

        Sets leave when the worker must exit (the pool is shutting down).
        """
        cdef CopyState *nxt = NULL
        cdef CWorker *wake = NULL
        cdef bint wake_helper, wake_completer
        pthread_mutex_lock(&self.lock)
        if self.done_tail == NULL:
            self.done_head = st
        else:
            self.done_tail.link = st
        self.done_tail = st
        st.link = NULL
        nxt = self._dispatch(True, &wake)
        if nxt == NULL:
            self.n_busy -= 1
            if self.shutting_down and self.queue_head == NULL:
                self.n_workers -= 1
                leave[0] = True
            else:
                self._link_idle(w)
        # Posted and signalled after the unlock, so that the woken threads
        # do not block at once on the lock still held here.  The pool
        # outlives its workers, and a waiter re-checks under the lock.
        wake_helper = self.helpers_waiting
        wake_completer = self.completer_waiting and (not wake_helper or leave[0])
        pthread_mutex_unlock(&self.lock)
        self._post_all(wake)
        if wake_helper:
            pthread_cond_signal(&self.helper_cond)
        if wake_completer:
            # With leave: the last worker leaving a pool that shuts down is
            # what lets the completer exit; a helper in result() may take the
            # job (and its wake-up), so the completer is woken to look too.
            pthread_cond_signal(&self.done_cond)
        return nxt

    cdef CopyState *_take_job(self, CWorker *w) noexcept nogil:
        cdef CopyState *st
        pthread_mutex_lock(&self.lock)
        st = w.job
        w.job = NULL
        pthread_mutex_unlock(&self.lock)
        return st

    def worker_main(self, WorkerHandle handle not None):
        """The body of a worker thread: returns when the worker exits."""
        cdef CWorker *w = handle.w
        cdef CopyState *st
        cdef bint leave = False
        cdef sigset_t oldmask
        # Taken with the GIL, as abandon() takes it: exactly one of the two
        # gets it.  abandon() won if an exception hit the starting thread
        # (Ctrl-C in Thread.start()) before this ran: nothing is ours.
        handle.w = NULL  # this thread owns it now
        if w == NULL:
            return
        # The OS-level name shows in top -H, ps -L, perf and gdb.
        pthread_setname_np(pthread_self(), b"fastpipe-worker")
        with nogil:
            fp_block_sigpipe(&oldmask)  # for the thread's life (see _compat.h)
            # The first job was stored before this thread started, unless it
            # is a spare from submit_pair(), idle from birth, which parks
            # first: a job is handed to it with a post, as to any idle worker.
            st = NULL if w.born_idle else self._take_job(w)
            while True:
                if st == NULL:
                    if self._park(w):
                        break
                    st = self._take_job(w)
                    if st == NULL:
                        continue
                _copy_in_worker(st)
                if st.status == STEP_ERROR and st.err == EPIPE:
                    fp_discard_sigpipe()
                st = self._finish(w, st, &leave)
                if leave:
                    break
            sem_destroy(&w.wake)
            free(w)

    def name_this_thread(self, bytes name not None):
        """Give the calling thread an OS-level name (at most 15 bytes)."""
        pthread_setname_np(pthread_self(), name[:15])

    def take_done(self):
        """Wait for finished jobs and take them all, in the order they ended.

        The completer thread's loop; it waits without the GIL.

        Returns:
            A list of CopyJobs; None once the pool is shut down and has no
            worker and no finished job left, which tells the completer to
            exit.
        """
        cdef CopyState *head
        with nogil:
            pthread_mutex_lock(&self.lock)
            while self.done_head == NULL and not (
                self.shutting_down and self.n_workers == 0 and self.queue_head == NULL
            ):
                self.completer_waiting = True
                pthread_cond_wait(&self.done_cond, &self.lock)
                self.completer_waiting = False
            head = self.done_head
            self.done_head = self.done_tail = NULL
            pthread_mutex_unlock(&self.lock)
        if head == NULL:
            return None
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
            jobs.append(<object>owner)
            Py_DECREF(<object>owner)  # the reference submit() took
            head = nxt
        return jobs

    def shutdown(self, bint cancel_queued):
        """Refuse new jobs and let idle workers exit.

        Returns:
            The queued jobs taken off the queue when ``cancel_queued``.
        """
        cdef CopyState *queued = NULL
        cdef CopyState *nxt
        cdef list jobs = []
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.shutting_down = True
            if cancel_queued:
                queued = self.queue_head
                self.queue_head = self.queue_tail = NULL
                self.n_queued = 0
            # Idle workers stay while a pair waits for one more of them.
            if self.queue_head == NULL:
                self._release_idle()
            pthread_cond_signal(&self.done_cond)
            pthread_mutex_unlock(&self.lock)
        while queued != NULL:
            nxt = queued.link
            queued.link = NULL
            queued.pair_head = False
            jobs.append(<object>queued.owner)
            Py_DECREF(<object>queued.owner)
            queued.owner = NULL
            queued = nxt
        return jobs
