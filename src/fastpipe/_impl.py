"""Pick the compiled core, or its pure-Python twin.

The twin is used when the extension is missing (an unsupported platform, a
source checkout that was never built) or when FASTPIPE_NO_EXTENSIONS=1, the
same switch yarl and msgpack offer, so the test suite can run on both.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

IMPLEMENTATION: str
"""Which core is in use: ``"c"`` for the compiled one, ``"py"`` for the twin.

The pure-Python twin is chosen when the extension is missing, or when the
environment has ``FASTPIPE_NO_EXTENSIONS=1``.
"""

if TYPE_CHECKING:  # both twins have these names; _core.pyi types them
    from fastpipe._core import (
        BUFFER_SIZE,
        CopyJob,
        PoolCore,
        _set_pipe_size,
        _set_splice_min_read,
        _set_sweep_interval,
        buffer_stats,
        copy_fd,
        fd_ready,
        pipe_stats,
        trim_buffers,
        trim_pipes,
    )
else:

    def _load():
        if os.environ.get("FASTPIPE_NO_EXTENSIONS", "") not in ("", "0"):
            from fastpipe import _core_py

            return _core_py, "py"
        try:
            from fastpipe import _core
        except ImportError:
            from fastpipe import _core_py

            return _core_py, "py"
        return _core, "c"

    _module, IMPLEMENTATION = _load()
    BUFFER_SIZE = _module.BUFFER_SIZE
    CopyJob = _module.CopyJob
    PoolCore = _module.PoolCore
    buffer_stats = _module.buffer_stats
    copy_fd = _module.copy_fd
    fd_ready = _module.fd_ready
    trim_buffers = _module.trim_buffers
    pipe_stats = _module.pipe_stats
    trim_pipes = _module.trim_pipes
    _set_pipe_size = _module._set_pipe_size
    _set_splice_min_read = _module._set_splice_min_read
    _set_sweep_interval = _module._set_sweep_interval

__all__ = [
    "BUFFER_SIZE",
    "IMPLEMENTATION",
    "CopyJob",
    "PoolCore",
    "buffer_stats",
    "copy_fd",
    "fd_ready",
    "pipe_stats",
    "trim_buffers",
    "trim_pipes",
]
