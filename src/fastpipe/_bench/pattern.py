"""The bytes every workload moves, the check every receiver makes, and the
program of the endpoint processes that send and sink them.

The bytes are a pseudo-random block repeated with a period that is not a
power of two, so a lost, repeated or reordered chunk shows.  Whoever receives
them (the sink process, or the harness reading the destination file after
the round) compares every byte with the pattern and reports the length and
the offset of the first wrong byte.

The endpoint processes (``endpoints.Endpoint``) run this file as their
program: ``python -I -S pattern.py endpoint ROLE ARGS...``.  In isolated
mode fastpipe is not importable, so this file uses the standard library
only and imports nothing from the rest of the harness.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from collections.abc import Iterator

MiB = 1 << 20


# The pattern's period: 1 MiB plus an odd amount, so that no copy chunk (all
# powers of two) lines up with it.
_PERIOD = MiB + 4093
_SEED = 0xFA57


@functools.cache
def pattern_block() -> bytes:
    """Return one period of the pattern (about 1 MiB of pseudo-random bytes)."""
    import random  # here: only the processes that need it pay for it

    return random.Random(_SEED).randbytes(_PERIOD)


@functools.cache
def _doubled_block() -> memoryview:
    # Two periods back to back: any piece of up to one period is one slice.
    return memoryview(pattern_block() * 2)


def iter_pattern(nbytes: int, chunk: int = MiB) -> Iterator[memoryview]:
    """Yield the first ``nbytes`` of the endless pattern, ``chunk`` at a time.

    Args:
        nbytes: how many bytes in all.
        chunk: the most bytes per piece (at most one period).

    Yields:
        Read-only views into one doubled block: nothing is copied.
    """
    doubled = _doubled_block()
    chunk = min(chunk, _PERIOD)
    pos = 0
    left = nbytes
    while left > 0:
        n = min(chunk, left)
        yield doubled[pos : pos + n]
        pos = (pos + n) % _PERIOD
        left -= n


class PatternCheck:
    """Compare a byte stream, piece by piece, with the pattern.

    Every byte is compared: ``bytearray == memoryview`` is a ``memcmp`` (over
    10 GB/s), stronger than a checksum and cheaper than one, which matters
    because a sink must stay far faster than the copy it helps to measure.
    """

    def __init__(self) -> None:
        self._doubled = _doubled_block()
        self.total = 0
        #: The offset of the first wrong byte, or -1.
        self.first_bad = -1

    def update(self, data: bytearray, n: int | None = None) -> None:
        """Check the next ``n`` bytes of the stream, ``data[:n]`` (default: all of it)."""
        if n is None:
            n = len(data)
        done = 0
        while done < n and self.first_bad < 0:
            pos = (self.total + done) % _PERIOD
            step = min(n - done, _PERIOD)
            expect = self._doubled[pos : pos + step]
            # startswith() over data[done:done + step], with a prefix of that
            # very length, is one memcmp and copies nothing.  Slicing a short
            # read out of the buffer first would be another pass over every
            # byte; memoryview.__eq__ compares item by item, 50 times slower.
            if not data.startswith(expect, done, done + step):
                bad = next(i for i in range(step) if data[done + i] != expect[i])
                self.first_bad = self.total + done + bad
            done += step
        self.total += n

    def problem(self, nbytes: int) -> str | None:
        """None if exactly the first ``nbytes`` of the pattern went by, else what differs."""
        return describe_mismatch(self.total, self.first_bad, nbytes)


def describe_mismatch(total: int, first_bad: int, nbytes: int) -> str | None:
    """None if ``total == nbytes`` and no byte was wrong, else a description."""
    if first_bad >= 0:
        return f"byte {first_bad} differs from the byte sent ({total} bytes received)"
    if total != nbytes:
        return f"{total} bytes arrived, {nbytes} were sent"
    return None


def write_pattern_file(path: str, nbytes: int) -> None:
    """Write the first ``nbytes`` of the pattern to a new file at ``path``."""
    with open(path, "wb") as f:
        for piece in iter_pattern(nbytes):
            f.write(piece)


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode("ascii"))


def _wait_go() -> None:
    if sys.stdin.buffer.readline() != b"go\n":
        raise SystemExit("endpoint: no 'go' from the parent")


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _endpoint_main(argv: list[str]) -> int:
    """Run one endpoint role in this (child) process; see ``Endpoint``."""
    role, args = argv[0], argv[1:]
    _doubled_block()  # before "ready": making the pattern is not part of the copy
    if role == "tcp-sink":
        check = PatternCheck()
        buf = bytearray(MiB)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            _say(f"ready {listener.getsockname()[1]}")
            conn, _ = listener.accept()
        cpu0 = time.process_time()
        with conn:
            while n := conn.recv_into(buf):
                check.update(buf, n)
        _say(f"done {check.total} {check.first_bad} {time.process_time() - cpu0:.6f}")
    elif role == "tcp-send":
        port, nbytes = int(args[0]), int(args[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            _say("ready")
            _wait_go()
            cpu0 = time.process_time()
            for piece in iter_pattern(nbytes):
                sock.sendall(piece)
        _say(f"done {nbytes} {time.process_time() - cpu0:.6f}")
    elif role == "pipe-send":
        fd, nbytes = int(args[0]), int(args[1])
        _say("ready")
        _wait_go()
        cpu0 = time.process_time()
        for piece in iter_pattern(nbytes):
            _write_all(fd, piece)
        os.close(fd)
        _say(f"done {nbytes} {time.process_time() - cpu0:.6f}")
    else:
        raise SystemExit(f"endpoint: unknown role {role!r}")
    return 0


if __name__ == "__main__":
    # The endpoint processes: python -I -S pattern.py endpoint ROLE ARGS...
    if sys.argv[1:2] != ["endpoint"] or len(sys.argv) < 3:
        raise SystemExit("usage: pattern.py endpoint ROLE [ARGS...] (internal to fastpipe bench)")
    sys.exit(_endpoint_main(sys.argv[2:]))
