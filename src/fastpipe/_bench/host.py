"""Preparing the host: scratch space for the workloads' files, and the same
free pages for every method where the host takes free pages back."""

from __future__ import annotations

import functools
import os
import tempfile

#: Whether the rounds that fill a new file may first let every CPU free
#: pages itself (``warm_page_lists``), where that is needed.  Clear it to
#: see what the rounds cost without it.
WARM_PAGES = True

#: More CPUs than this and warming each one costs more than it evens out.
WARM_MAX_CPUS = 16

#: ``VIRTIO_BALLOON_F_REPORTING``: the balloon reports free pages to the host.
_BALLOON_DEVICE_ID = 5
_BALLOON_F_REPORTING = 5


@functools.cache
def free_page_reporting(root: str = "/sys/bus/virtio/devices") -> bool:
    """Whether a virtio balloon here hands free pages back to the host."""
    try:
        devices = os.listdir(root)
    except OSError:
        return False
    for name in devices:
        try:
            with open(os.path.join(root, name, "device"), encoding="ascii") as f:
                if int(f.read(), 16) != _BALLOON_DEVICE_ID:
                    continue
            with open(os.path.join(root, name, "features"), encoding="ascii") as f:
                bits = f.read().strip()  # one character per feature bit, bit 0 first
        except (OSError, ValueError):
            continue
        if bits[_BALLOON_F_REPORTING : _BALLOON_F_REPORTING + 1] == "1":
            return True
    return False


def cpus_to_warm() -> list[int]:
    """The CPUs ``warm_page_lists`` frees pages on; empty where it does nothing."""
    if not WARM_PAGES or not hasattr(os, "sched_getaffinity") or not free_page_reporting():
        return []
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if 2 <= len(cpus) <= WARM_MAX_CPUS else []


def _warm_size(nbytes: int) -> int:
    """The bytes ``warm_page_lists`` frees on each CPU for ``nbytes``-byte
    copies: a margin for what else allocates meanwhile."""
    return nbytes + nbytes // 4


def warm_page_lists(directory: str, nbytes: int) -> None:
    """Let each CPU this process may use allocate and free ``nbytes`` of pages itself.

    Why: where the kernel keeps large per-CPU lists of free pages and
    reports free pages to a hypervisor (free page reporting, as on this
    project's Firecracker machines), a page freed on one CPU stays in that
    CPU's list, still backed by the host, while a page taken from the shared
    free lists was handed back to the host and costs a host fault when it is
    first touched.  A copy into a new file then runs 2-3x slower on a CPU
    other than the one that freed the last round's file, so the method whose
    thread happens to land there loses for reasons that have nothing to do
    with it.  Freeing a file's worth of pages on every CPU before each round
    gives every method, on every CPU, the same pages.  It is untimed.  It
    does nothing without free page reporting (the host takes nothing back),
    on one CPU, on more than ``WARM_MAX_CPUS``, and where ``fallocate``
    fails (a full tmpfs, or a file system without it).
    """
    cpus = cpus_to_warm()
    if nbytes == 0 or not cpus:
        return
    size = _warm_size(nbytes)

    # The calling thread moves to each CPU in turn, rather than a helper
    # thread per CPU: a stop signal then interrupts the warming itself, and
    # the caller's clean-up of ``directory`` cannot race a file still in use.
    home = os.sched_getaffinity(0)  # pid 0: the calling thread only
    try:
        for cpu in cpus:
            os.sched_setaffinity(0, {cpu})
            path = os.path.join(directory, f"warm-pages-{os.getpid()}-{cpu}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # on tmpfs: zeroed pages from this CPU
            except OSError:
                pass  # best effort: the round is still correct, only unwarmed
            finally:
                os.close(fd)
                os.unlink(path)  # the pages go to this CPU's free list
    finally:
        os.sched_setaffinity(0, home)


def scratch_room(size: int) -> int:
    """Bytes of scratch space the bulk workloads need at once for ``size``-byte copies.

    The shared source, one destination (each is removed once verified) and
    ``warm_page_lists``'s file.
    """
    return 2 * size + _warm_size(size)


def scratch_root(need: int = 0) -> str:
    """A tmpfs directory (``/dev/shm``) with room for ``need`` bytes, else the temp dir.

    A container's ``/dev/shm`` is often 64 MiB: too small for the default
    run, which would then stop half-way with ENOSPC.
    """
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= need:
            return shm
    return tempfile.gettempdir()


def new_scratch_dir(size: int) -> str:
    """A new directory for ``size``-byte bulk copies, where ``scratch_root`` finds room.

    The caller removes it (``shutil.rmtree``).
    """
    return tempfile.mkdtemp(prefix="fastpipe-bench-", dir=scratch_root(scratch_room(size)))
