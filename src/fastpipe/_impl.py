"""Pick the compiled core, or its pure-Python twin.

The twin is used when the extension is missing (an unsupported platform, a
source checkout that was never built) or when FASTPIPE_NO_EXTENSIONS=1, the
same switch yarl and msgpack offer, so the test suite can run on both.
"""

from __future__ import annotations

import os

IMPLEMENTATION: str

if os.environ.get("FASTPIPE_NO_EXTENSIONS", "") not in ("", "0"):
    from fastpipe._core_py import (
        BUFFER_SIZE,
        CopyJob,
        PoolCore,
        buffer_stats,
        copy_fd,
        fd_ready,
        trim_buffers,
    )

    IMPLEMENTATION = "py"
else:
    try:
        from fastpipe._core import (  # type: ignore[no-redef]
            BUFFER_SIZE,
            CopyJob,
        PoolCore,
            buffer_stats,
            copy_fd,
            fd_ready,
            trim_buffers,
        )

        IMPLEMENTATION = "c"
    except ImportError:
        from fastpipe._core_py import (  # type: ignore[no-redef]  # noqa: I001
            BUFFER_SIZE,
            CopyJob,
        PoolCore,
            buffer_stats,
            copy_fd,
            fd_ready,
            trim_buffers,
        )

        IMPLEMENTATION = "py"

__all__ = [
    "BUFFER_SIZE",
    "IMPLEMENTATION",
    "CopyJob",
    "PoolCore",
    "buffer_stats",
    "copy_fd",
    "fd_ready",
    "trim_buffers",
]
