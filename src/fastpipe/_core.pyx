# cython: language_level=3, embedsignature=True
"""The compiled core: a free-list of 32 KiB buffers and a GIL-free copy loop.

Ownership rules, which every function in the included files keeps:

* A buffer belongs either to the free-list or to exactly one ``CopyJob``.
  It is never exposed to Python code, so it can be used without the GIL.
* A ``CopyJob`` holds buffers only while bytes are in flight.  Before it
  waits for an idle source it gives them back, so a relay parked on an idle
  fd costs no buffer memory.
* The copy loop runs with the GIL released from start to end.  It only
  returns to GIL-held code to finish, to raise, or to let signal handlers
  run (PEP 475); all its state lives in ``CopyState`` so it resumes exactly
  where it stopped.

The code is one extension and one C file, split by concern into the files
of ``core/`` that this file includes, in this order:

* ``consts.pxi``: sizes, and the Method, FdKind and Step enums.
* ``buffers.pxi``: the buffer free-list.
* ``pipes.pxi``: the pipe pool, intermediate pipes for splice.
* ``state.pxi``: ``CopyState``, the clock and the waits (a pool copy's
  wait parks it instead).
* ``poller.pxi``: where parked copies wait: the epoll set, its fd table and
  the deadline heap.
* ``kernel.pxi``: the kernel step (copy_file_range, sendfile, splice).
* ``readwrite.pxi``: the copy loop and its read/write step.
* ``prepare.pxi``: path choice, and the start and end of a copy.
* ``checks.pxi``: errno to ``OSError``, and the argument checks.
* ``copyjob.pxi``: ``CopyJob``, ``copy_fd`` and ``fd_ready``.
* ``poolcore.pxi``: the worker pool's GIL-free half, ``PoolCore``: workers,
  the leader that polls for parked copies, the queue.
"""

from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memset
from libc.errno cimport (
    errno, EINTR, EAGAIN, ENOMEM, EBADF, ETIMEDOUT, EINVAL, EOPNOTSUPP,
)
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.uio cimport iovec
from cpython.exc cimport PyErr_CheckSignals
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

import os as _os
import threading as _threading
from concurrent.futures import CancelledError as _CancelledError

from fastpipe._syscalls cimport (
    ECANCELED, EIO, ENOSYS, EPERM, EPIPE, EXDEV, FIONREAD, FP_CANCELLABLE, F_GETFL,
    F_GETPIPE_SZ, F_SETPIPE_SZ, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_PEEK, O_APPEND, O_CLOEXEC,
    O_NONBLOCK, POLLIN, POLLNVAL, POLLOUT, RWF_NOWAIT, SEEK_CUR, SHUT_WR, SPLICE_F_NONBLOCK,
    S_ISBLK, S_ISFIFO, S_ISREG, S_ISSOCK, close, copy_file_range, fcntl, fp_alarm, fp_alarm_arm,
    fp_alarm_disarm, fp_alarm_free, fp_block_sigpipe, fp_cond_init_monotonic,
    fp_cond_wait_until_ms, fp_discard_sigpipe, fp_install_wake_signal, fp_load_int, fp_load_ll,
    fp_sem_wait_ms, fp_set_sigmask, fp_sigpipe_blocked_in, fp_store_int, fp_store_ll, fstat,
    ioctl, lseek, msghdr, pipe2, poll, pollfd, preadv2, pthread_cond_broadcast,
    pthread_cond_init, pthread_cond_signal, pthread_cond_t, pthread_cond_wait, pthread_kill,
    pthread_mutex_init, pthread_mutex_lock, pthread_mutex_t, pthread_mutex_trylock,
    pthread_mutex_unlock, pthread_self,
    pthread_setname_np, pthread_t, pwritev2, read, readv, recv, recvmsg, sem_destroy, sem_init,
    sem_post, sem_t, sem_wait, sendfile, sendmsg, shutdown, sigset_t, splice, stat, writev,
)
from fastpipe._syscalls cimport (
    EBUSY, EEXIST, EFD_CLOEXEC, EFD_NONBLOCK, ENOENT, EPOLL_CLOEXEC, EPOLL_CTL_ADD,
    EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLONESHOT, EPOLLOUT,
    epoll_create1, epoll_ctl, epoll_event, epoll_wait, eventfd, fp_alarm_arm_interval,
    fp_eventfd_drain, fp_eventfd_poke,
)


# An include is textual: a struct or enum must stand above the first
# declaration that uses it, so the order of these lines matters.
include "core/consts.pxi"
include "core/buffers.pxi"
include "core/pipes.pxi"
include "core/state.pxi"
include "core/poller.pxi"
include "core/kernel.pxi"
include "core/readwrite.pxi"
include "core/prepare.pxi"
include "core/checks.pxi"
include "core/copyjob.pxi"
include "core/poolcore.pxi"
