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

BUFFER_SIZE = BUF_SIZE
