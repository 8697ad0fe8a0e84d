# cython: language_level=3
# System calls and types used by the copy loop, declared from _compat.h so
# that every feature macro is in force before the system headers are read.

from posix.types cimport mode_t
from posix.uio cimport iovec


cdef extern from "_compat.h" nogil:
    ctypedef unsigned long nfds_t

    struct pollfd:
        int fd
        short events
        short revents

    int poll(pollfd *fds, nfds_t nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL

    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    ssize_t recv(int fd, void *buf, size_t len, int flags)
    enum:
        MSG_NOSIGNAL
        MSG_DONTWAIT
        MSG_PEEK
    int shutdown(int fd, int how)
    enum:
        SHUT_WR

    ssize_t read(int fd, void *buf, size_t count)
    ssize_t readv(int fd, const iovec *iov, int iovcnt)
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, long offset, int flags)
    enum:
        RWF_NOWAIT
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
    ssize_t pwritev2(int fd, const iovec *iov, int iovcnt, long offset, int flags)

    int fcntl(int fd, int cmd, ...)
    enum:
        F_GETFL
        O_NONBLOCK

    struct stat:
        mode_t st_mode
        long st_size
        unsigned long st_dev
        unsigned long st_ino

    int fstat(int fd, stat *buf)
    bint S_ISREG(mode_t m)
    bint S_ISFIFO(mode_t m)
    bint S_ISSOCK(mode_t m)
    bint S_ISCHR(mode_t m)
    bint S_ISBLK(mode_t m)

    ctypedef struct pthread_mutex_t:
        pass

    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

    enum:
        FP_CANCELLABLE
    void fp_store_int(int *p, int v)
    int fp_load_int(const int *p)
    int fp_install_wake_signal()
    ctypedef struct fp_alarm:
        pass
    int fp_alarm_arm(fp_alarm *a, int sig, long long ms)
    void fp_alarm_disarm(fp_alarm *a)
    void fp_alarm_free(fp_alarm *a)
    ctypedef struct sigset_t:
        pass
    void fp_block_sigpipe(sigset_t *old)
    bint fp_sigpipe_blocked_in(const sigset_t *mask)
    void fp_discard_sigpipe()
    void fp_set_sigmask(const sigset_t *mask)
    enum:
        EPIPE
    void fp_store_ll(long long *p, long long v)
    long long fp_load_ll(const long long *p)

    ctypedef struct pthread_cond_t:
        pass

    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)

    ctypedef struct sem_t:
        pass

    int fp_cond_init_monotonic(pthread_cond_t *c)
    int fp_cond_wait_until_ms(pthread_cond_t *c, pthread_mutex_t *m, long long deadline_ms)

    int sem_init(sem_t *s, int pshared, unsigned int value)
    int sem_destroy(sem_t *s)
    int sem_wait(sem_t *s)
    int sem_post(sem_t *s)
    int fp_sem_wait_ms(sem_t *s, long long ms)

    int close(int fd)
    enum:
        ECANCELED
        EXDEV
        ENOSYS
        EPERM
        EIO
        EMFILE
        ENFILE

    # The kernel paths.  NULL offsets: each call reads and advances the
    # fds' own file positions, exactly as read() and write() would.
    ssize_t splice(int fd_in, long *off_in, int fd_out, long *off_out, size_t len,
                   unsigned int flags)
    ssize_t copy_file_range(int fd_in, long *off_in, int fd_out, long *off_out,
                            size_t len, unsigned int flags)
    ssize_t sendfile(int out_fd, int in_fd, long *offset, size_t count)
    int pipe2(int *fds, int flags)
    long lseek(int fd, long offset, int whence)
    int ioctl(int fd, unsigned long request, ...)
    enum:
        SEEK_CUR
        FIONREAD
    enum:
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        O_APPEND
        O_CLOEXEC

    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_setname_np(pthread_t thread, const char *name)
    int pthread_kill(pthread_t thread, int sig)

    # The poller: one epoll set per pool, and an eventfd to wake its leader.
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        unsigned int u32
        unsigned long long u64
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLONESHOT
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
    void fp_eventfd_poke(int fd)
    void fp_eventfd_drain(int fd)
    int fp_alarm_arm_interval(fp_alarm *a, int sig, long long ms)
    enum:
        ENOENT
        EEXIST
        ENOSPC
        EBUSY
