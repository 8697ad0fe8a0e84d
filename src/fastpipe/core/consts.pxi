# Constants: buffer, pipe and chunk sizes, and the enums that name a copy's
# path (Method), an fd's kind (FdKind) and what a copy step returns (Step).

cdef enum:
    BUF_SIZE = 32768
    # Buffers per readv: up to 512 KiB per syscall.  Moving more per call is
    # what beats a 32 KiB read/write loop; the card keeps 32 KiB buffers.
    MAX_IOV = 16
    # Where a source of unknown size starts; it doubles while reads fill it.
    START_IOV = 2
    # How often a copy blocked in the main thread comes back for signals.
    MAIN_THREAD_TICK_MS = 50
    # The intermediate pipe: 1 MiB needed the fewest calls (256 KiB cost 50%
    # more CPU, 64 KiB twice as much).
    PIPE_SIZE = 1 << 20
    # Idle pipes kept: each counts against pipe-user-pages-soft (64 MiB by
    # default) whether or not it holds bytes.
    PIPE_POOL_MAX = 16
    # Most bytes per copy_file_range/sendfile/direct splice call: large enough
    # that the call count does not matter, small enough that bytes_copied
    # moves and a cancel is seen every few milliseconds.
    KERNEL_CHUNK = 8 << 20
    # A socket source starts on read/write and switches to splice once one
    # read returns this much: small messages are cheaper through buffers,
    # and an idle connection then never holds a pipe.
    SPLICE_MIN_READ = 64 * 1024
    # st.err for a copy of a file onto itself that would read back its own
    # writes: EINVAL, with a message that says why (not an errno).
    ERR_SAME_FILE = -1
    # A pool copy that keeps moving bytes looks at its pool once per this
    # many bytes: to hand the poller to another worker, to ask for a thread
    # for copies that wait in the queue, or to let one of them run.  A copy
    # never holds the poller or a waiting copy back for longer than it takes
    # to move this much (about 0.1-0.5 ms).
    SLICE_BYTES = 1 << 20
    # A pool worker's sendfile or splice into a blocking socket, which no
    # per-call flag makes non-blocking, is interrupted after this long
    # without room in the socket; the copy then parks until it is writable.
    STALL_MS = 20
    # Events taken per epoll_wait.
    POLL_EVENTS = 64
    # The poller checks this many of its fds per look for one closed under
    # a parked copy (see poller.pxi), one look every SWEEP_MS: at the fd
    # limit of 20,000 a closed fd is found within five seconds.
    SWEEP_SLOTS = 4096
    SWEEP_MS = 1000

cdef enum Method:
    M_READWRITE = 0
    M_COPY_FILE_RANGE = 1
    M_SENDFILE = 2
    M_SPLICE = 3

cdef enum FdKind:
    KIND_FILE = 0
    KIND_PIPE = 1
    KIND_SOCKET = 2
    KIND_CHAR = 3

cdef enum Step:
    STEP_DONE = 0
    STEP_ERROR = 1
    # Go back to GIL-held code to run signal handlers, then resume.
    STEP_SIGNALS = 2
    STEP_AGAIN = 3
    # CopyJob.cancel() was called: stop, keeping bytes_copied exact.
    STEP_CANCELLED = 4
    # A kernel path cannot serve this fd pair and has moved nothing: go on
    # with st.method, which the step has set to the next path.
    STEP_FALLBACK = 5
    # Pool copies only.  STEP_PARK: nothing to do until st.park_fd is ready
    # for st.park_events; the worker parks the copy in the poller and moves
    # on.  STEP_YIELD: SLICE_BYTES moved since the copy last looked at its
    # pool, and nothing is pending.
    STEP_PARK = 6
    STEP_YIELD = 7

cdef enum:
    # CopyState.kdst_stall: whether a pool copy's socket sink blocks (and so
    # needs the stall alarm), asked the first time a kernel path writes to it.
    STALL_NO = 0
    STALL_YES = 1
    STALL_ASK = 2

cdef enum JobState:
    # Where a pool copy is; changed only under the pool's lock.
    J_NEW = 0           # not handed to the pool yet
    J_QUEUED = 1        # ready, waiting in the queue for a worker
    J_RUNNING = 2       # a worker runs it
    J_PARKED = 3        # waiting in the poller, held by no thread
    J_DONE = 4
    J_HANDED = 5        # given to a new worker whose thread has not taken it

BUFFER_SIZE = BUF_SIZE
