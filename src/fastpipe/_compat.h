/* Feature macros and tiny helpers for _core.pyx.
 *
 * Python.h already defines _GNU_SOURCE (pyconfig.h), which readv/sendmsg/
 * MSG_NOSIGNAL and, later, splice/copy_file_range need.  The counters below
 * are written by a worker without the GIL and read by other threads with the
 * GIL, so they go through the compiler's atomics instead of plain loads. */
#ifndef FASTPIPE_COMPAT_H
#define FASTPIPE_COMPAT_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

static inline void fp_store_ll(long long *p, long long v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline long long fp_load_ll(const long long *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

#endif
