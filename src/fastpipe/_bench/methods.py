"""The methods a workload is run by: their names (also the pytest ids), their
titles in the tables, and how each extra baseline copies."""

from __future__ import annotations

# Method names, also the pytest parametrize ids.
FASTPIPE = "fastpipe"
COPYFILEOBJ = "copyfileobj"
COPYFILEOBJ_POOL = "copyfileobj-pool"
SETUP_ONLY = "setup-only"
FASTPIPE_IDLE = "fastpipe-idle-main"
# More baselines: fastpipe on its read/write path, and the standard library's
# kernel paths, so that each of fastpipe's paths is seen beside its own.
FASTPIPE_RW = "fastpipe-readwrite"
SPLICE_LOOP = "splice-loop"
READWRITE_LOOP = "readwrite-256k"
COPYFILE = "shutil-copyfile"
SOCKET_SENDFILE = "socket-sendfile"
#: fastpipe.relay on the other implementation (the compiled core or the
#: pure-Python twin), measured in a child process: see ``twins``.
FASTPIPE_TWIN = "fastpipe-twin"

METHOD_TITLES = {
    FASTPIPE: "fastpipe.relay",
    COPYFILEOBJ: "copyfileobj",
    COPYFILEOBJ_POOL: "copyfileobj+pool",
    FASTPIPE_RW: "fastpipe zerocopy=False",
    SPLICE_LOOP: "os.splice loop",
    READWRITE_LOOP: "read/write 256 KiB",
    COPYFILE: "shutil.copyfile",
    SOCKET_SENDFILE: "socket.sendfile",
    FASTPIPE_TWIN: "fastpipe (other twin)",
}

#: How each extra baseline copies (shared by the workloads that run it).
BASELINE_HOW = {
    FASTPIPE_RW: "fastpipe.relay(src, dst, zerocopy=False).result(): the read/write path",
    SPLICE_LOOP: (
        "a Python loop: os.splice(src -> pipe) then os.splice(pipe -> dst), through one "
        "1 MiB pipe, in the calling thread"
    ),
    READWRITE_LOOP: "a Python loop of os.readv into one 256 KiB bytearray and os.write",
    COPYFILE: "shutil.copyfile(src_path, dst_path) (os.sendfile on Linux)",
    SOCKET_SENDFILE: "socket.sendfile(open(src_fd, 'rb')) in the calling thread (os.sendfile)",
}
