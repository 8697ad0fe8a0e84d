"""Endpoint processes: the producers and consumers of a workload's bytes.

They run in other processes, started as ``python -I -S pattern.py endpoint
ROLE ...``, so that their CPU time is not counted as the relay's and the
relay process does nothing but relay.  They talk to the parent in lines on
stdin/stdout: ``ready ...`` once set up, ``go`` from the parent when the
timed part starts, ``done ...`` at the end.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Sequence

from fastpipe._bench import pattern
from fastpipe._bench.common import TIMEOUT, BenchError


class Endpoint:
    """A producer or consumer of bytes running in another process.

    Args:
        role: ``tcp-send`` (args: PORT NBYTES), ``tcp-sink`` (no args) or
            ``pipe-send`` (args: FD NBYTES).
        args: the role's arguments.
        pass_fds: fds the child inherits (the write end of a pipe).

    Raises:
        BenchError: the interpreter is unknown.
        OSError: the process could not start.
    """

    def __init__(self, role: str, *args: object, pass_fds: Sequence[int] = ()) -> None:
        if not sys.executable:
            raise BenchError("sys.executable is unknown: cannot start endpoint processes")
        self.role = role
        # -I: no PYTHON* variables and no script directory on sys.path (this
        # file lives inside the package); -S: no site, a faster start.
        cmd = [sys.executable, "-I", "-S", os.path.abspath(pattern.__file__), "endpoint", role]
        self.proc = subprocess.Popen(
            cmd + [str(a) for a in args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=tuple(pass_fds),
        )
        self._reaped = False

    def ready(self) -> list[str]:
        """Wait for the ``ready`` line; return its words after ``ready``.

        Raises:
            BenchError: the process died, or said nothing for TIMEOUT seconds.
        """
        stdout = self.proc.stdout
        assert stdout is not None
        readable, _, _ = select.select([stdout], [], [], TIMEOUT)
        line = stdout.readline() if readable else b""
        words = line.decode("ascii", "replace").split()
        if not words or words[0] != "ready":
            err = self.kill().decode("utf-8", "replace").strip()
            raise BenchError(f"endpoint {self.role}: not ready (said {line!r}): {err}")
        return words[1:]

    def go(self) -> None:
        """Tell the endpoint to start sending."""
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(b"go\n")
        stdin.flush()

    def finish(self) -> list[str]:
        """Wait for the endpoint to exit; return its words after ``done``.

        Raises:
            BenchError: it failed, said nothing, or ran for TIMEOUT seconds more.
        """
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"endpoint {self.role}: still running after {TIMEOUT:g} s") from None
        self._reaped = True
        words = out.decode("ascii", "replace").split()
        if self.proc.returncode != 0 or "done" not in words:
            tail = " / ".join(err.decode("utf-8", "replace").strip().splitlines()[-3:])
            raise BenchError(
                f"endpoint {self.role}: exit status {self.proc.returncode}, said {out!r}: {tail}"
            )
        return words[words.index("done") + 1 :]

    def kill(self) -> bytes:
        """Kill the process if it still runs, and reap it (idempotent).

        Returns:
            What it wrote on stderr, unless that was collected already.
        """
        if self._reaped:
            return b""
        if self.proc.poll() is None:
            self.proc.kill()
        # communicate() closes our ends of its pipes and waits: no zombie.
        _, err = self.proc.communicate()
        self._reaped = True
        return err or b""
