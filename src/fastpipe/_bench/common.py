"""What every part of the benchmark harness shares: units, the longest wait,
the error, and what one end of a copy is."""

from __future__ import annotations

import socket
from typing import TypeAlias

MiB = 1 << 20
GiB = 1 << 30


#: The longest wait for a relay, an endpoint or a drain before failing
#: loudly: a hang is a bug to report, not something to wait out.
TIMEOUT = 120.0


#: One end of a copy: an fd, or a socket (relay() closes either kind).
End: TypeAlias = "int | socket.socket"


class BenchError(RuntimeError):
    """A benchmark could not run, or moved the wrong bytes."""
