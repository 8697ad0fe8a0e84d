/* Feature macros and tiny helpers for _core.pyx.
 *
 * Python.h already defines _GNU_SOURCE (pyconfig.h), which readv/sendmsg/
 * preadv2/MSG_NOSIGNAL and, later, splice/copy_file_range need. */
#ifndef FASTPIPE_COMPAT_H
#define FASTPIPE_COMPAT_H

#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

/* bytes_copied is written by a worker without the GIL and read by other
 * threads with it, so it goes through the compiler's atomics. */
static inline void fp_store_ll(long long *p, long long v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline long long fp_load_ll(const long long *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* A benchmark-only build (CFLAGS=-DFASTPIPE_NO_CANCEL) compiles the cancel
 * checks out, to measure what being cancellable costs; never ship it. */
#ifdef FASTPIPE_NO_CANCEL
#define FP_CANCELLABLE 0
#else
#define FP_CANCELLABLE 1
#endif

static inline void fp_store_int(int *p, int v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}

static inline int fp_load_int(const int *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

/* Cancelling a relay that sits inside a blocking syscall.
 *
 * Polls and reads could watch an eventfd, but splice and sendfile on a
 * blocking TCP socket ignore every per-call non-blocking flag (SPLICE_F_NONBLOCK
 * only covers the pipe side), and the caller's fds are not ours to switch to
 * O_NONBLOCK.  So, like OpenJDK's NativeThread, a cancel sends the worker a
 * real-time signal whose handler does nothing and is installed without
 * SA_RESTART: whatever the worker is blocked in returns EINTR (or a short
 * count), and the copy loop then sees the cancel flag.  Nothing but a
 * worker running a cancelled job is ever sent this signal. */
static void fp_wake_handler(int sig) {
    (void)sig;
}

/* Install the handler; the signal number, or -1 when the program already
 * uses that signal for something else (then cancel waits for the next
 * syscall to return by itself). */
static inline int fp_install_wake_signal(void) {
    struct sigaction old, sa;
    int sig = SIGRTMAX - 2;
    if (sig <= SIGRTMIN)
        return -1;
    if (sigaction(sig, NULL, &old) < 0)
        return -1;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == fp_wake_handler)
        return sig;
    if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL)
        return -1;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = fp_wake_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  /* no SA_RESTART: interrupting is the point */
    if (sigaction(sig, &sa, NULL) < 0)
        return -1;
    return sig;
}

/* idle_timeout over a blocking socket sink.  sendfile, and splice into a
 * socket, ignore every per-call non-blocking flag: on a blocking socket they
 * wait until the whole chunk is queued, however long the peer stalls.  Polling
 * POLLOUT first does not bound that wait (POLLOUT means "a third of the buffer
 * is free", not "room for this chunk"), so with a small send buffer or a large
 * chunk a stalled peer held the copy past its idle_timeout for ever.  Before
 * such a call the copy arms a one-shot CLOCK_MONOTONIC timer that sends the
 * wake signal above to its own thread (SIGEV_THREAD_ID) at the idle deadline:
 * the call then returns EINTR or a short count, and the loop sees the
 * deadline.  The timer is made on first use by the thread running the copy and
 * deleted by that thread when the copy ends.  -1 where this cannot be done
 * (no SIGEV_THREAD_ID, timer_create refused): the copy then works as before. */
typedef struct {
    timer_t id;
    int state; /* 0: not made yet, 1: made, -1: cannot be made */
} fp_alarm;

/* Make the timer on first use and set it to fire after ms, then every
 * interval_ms (0: once).  -1 where it cannot be made. */
static inline int fp_alarm_set(fp_alarm *a, int sig, long long ms, long long interval_ms) {
#ifdef SIGEV_THREAD_ID
    struct sigevent sev;
    struct itimerspec its;
    if (a->state == 0) {
        memset(&sev, 0, sizeof(sev));
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = sig;
        sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
        a->state = timer_create(CLOCK_MONOTONIC, &sev, &a->id) == 0 ? 1 : -1;
    }
    if (a->state != 1)
        return -1;
    if (ms < 1)
        ms = 1; /* an all-zero it_value would disarm it instead */
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = ms / 1000;
    its.it_value.tv_nsec = (ms % 1000) * 1000000L;
    its.it_interval.tv_sec = interval_ms / 1000;
    its.it_interval.tv_nsec = (interval_ms % 1000) * 1000000L;
    return timer_settime(a->id, 0, &its, NULL);
#else
    (void)a;
    (void)sig;
    (void)ms;
    (void)interval_ms;
    return -1;
#endif
}

static inline int fp_alarm_arm(fp_alarm *a, int sig, long long ms) {
    return fp_alarm_set(a, sig, ms, 0);
}

/* The same timer, firing every ms milliseconds until disarmed: a pool
 * worker's stall alarm.  A worker writing into a blocking socket with
 * sendfile or splice (which no per-call flag makes non-blocking) arms it; if
 * the peer stalls, the call returns EINTR (or a short count) within ms, and
 * the copy parks until the socket is writable instead of holding the thread. */
static inline int fp_alarm_arm_interval(fp_alarm *a, int sig, long long ms) {
    return fp_alarm_set(a, sig, ms, ms);
}

/* Wake the poller's leader: one write to its eventfd.  Keeps errno. */
static inline void fp_eventfd_poke(int fd) {
    uint64_t one = 1;
    int saved = errno;
    ssize_t r = write(fd, &one, sizeof(one));
    (void)r; /* EAGAIN: already at the counter's limit, still readable */
    errno = saved;
}

static inline void fp_eventfd_drain(int fd) {
    uint64_t n;
    ssize_t r = read(fd, &n, sizeof(n));
    (void)r;
}

/* Keeps errno: it runs between a syscall and the check of its errno. */
static inline void fp_alarm_disarm(fp_alarm *a) {
#ifdef SIGEV_THREAD_ID
    struct itimerspec its;
    int saved = errno;
    if (a->state == 1) {
        memset(&its, 0, sizeof(its));
        timer_settime(a->id, 0, &its, NULL);
    }
    errno = saved;
#else
    (void)a;
#endif
}

static inline void fp_alarm_free(fp_alarm *a) {
#ifdef SIGEV_THREAD_ID
    if (a->state == 1)
        timer_delete(a->id);
#endif
    a->state = 0;
}

/* SIGPIPE.  A write to a pipe or socket whose reader is gone raises SIGPIPE
 * in the writing thread; sendmsg(MSG_NOSIGNAL) can say no, but writev,
 * splice and sendfile cannot.  CPython ignores SIGPIPE, yet programs that
 * restore SIG_DFL (to die quietly under `| head`) would be killed by a
 * relay's EPIPE.  So copies block SIGPIPE in their thread (workers for good,
 * a caller's thread for the length of the copy), and a SIGPIPE left pending
 * by an EPIPE is consumed before the mask is restored: the error reaches
 * Python as BrokenPipeError and nothing else happens. */
static inline void fp_block_sigpipe(sigset_t *old) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &s, old);
}

static inline int fp_sigpipe_blocked_in(const sigset_t *mask) {
    return sigismember(mask, SIGPIPE) == 1;
}

static inline void fp_discard_sigpipe(void) {
    sigset_t s;
    struct timespec zero = {0, 0};
    sigemptyset(&s);
    sigaddset(&s, SIGPIPE);
    while (sigtimedwait(&s, NULL, &zero) > 0) {
    }
}

static inline void fp_set_sigmask(const sigset_t *mask) {
    pthread_sigmask(SIG_SETMASK, mask, NULL);
}

/* Wait on a semaphore for at most ms milliseconds of CLOCK_MONOTONIC time
 * (a wall-clock jump must not wake or strand an idle worker).  Returns 0,
 * or -1 with errno ETIMEDOUT; EINTR is retried here. */
static inline int fp_sem_wait_ms(sem_t *s, long long ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    for (;;) {
        if (sem_clockwait(s, CLOCK_MONOTONIC, &ts) == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* A condition variable that times out on CLOCK_MONOTONIC. */
static inline int fp_cond_init_monotonic(pthread_cond_t *c) {
    pthread_condattr_t attr;
    int r;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    r = pthread_cond_init(c, &attr);
    pthread_condattr_destroy(&attr);
    return r;
}

/* Wait until woken or until the CLOCK_MONOTONIC time deadline_ms. */
static inline int fp_cond_wait_until_ms(pthread_cond_t *c, pthread_mutex_t *m,
                                        long long deadline_ms) {
    struct timespec ts;
    ts.tv_sec = deadline_ms / 1000;
    ts.tv_nsec = (deadline_ms % 1000) * 1000000L;
    return pthread_cond_timedwait(c, m, &ts);
}

#endif
