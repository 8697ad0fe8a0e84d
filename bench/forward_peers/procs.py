"""Processes for the benchmark: started in their own process group, always reaped.

Every process the harness starts goes through ``spawn()``: it runs in a
new session (so that ``kill_all()`` reaches what it forks too: socat's
per-connection children, nginx's workers), gets the hard fd limit as its
soft one (or the limit asked for), and gets SIGKILL when the harness dies
(``PR_SET_PDEATHSIG``, for the case where even ``kill_all()`` cannot run;
a process's own forked children do not inherit that).  ``kill_all()`` runs
at exit, on Ctrl-C and on SIGTERM/SIGHUP (``install_signal_handlers()``).

The readings come from ``/proc``: CPU from ``stat`` (utime + stime, plus
cutime + cstime for the children a process has reaped, which is where
socat's per-connection work ends up), threads, VmRSS and VmHWM from
``status``, fds from ``fd/``.  ``tree=True`` sums over the process and its
descendants (memory as PSS then, see ``memory()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
_TICK = os.sysconf("SC_CLK_TCK")

_started: list[subprocess.Popen[bytes]] = []


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: unwind and clean up, as for Ctrl-C."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)


def _child_setup(nofile: int | None) -> Any:
    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = hard if nofile is None else min(nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard if nofile is None else limit))

    return setup


def spawn(
    cmd: Sequence[str],
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    cwd: str | None = None,
    nofile: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session; ``nofile`` caps its fds (soft and hard)."""
    proc = subprocess.Popen(
        list(cmd),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        start_new_session=True,
        preexec_fn=_child_setup(nofile),
    )
    _started.append(proc)
    return proc


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s whole process group and reap ``proc``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    if proc in _started:
        _started.remove(proc)


def kill_all() -> None:
    """Kill every process group still started by ``spawn()``, newest first."""
    while _started:
        kill(_started[-1])


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> float | None:
    """Seconds until ``proc`` exits (reaped), or None if it did not within ``timeout``."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t0


# -- /proc readings ---------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        # After "pid (comm) ": state is field 0, ppid 1, utime 11, stime 12,
        # cutime 13, cstime 14.
        return f.read().rsplit(b")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def _pids(pid: int, tree: bool) -> list[int]:
    return descendants(pid) if tree else [pid]


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """User + system CPU seconds so far, reaped children's included."""
    total = 0
    for p in _pids(pid, tree):
        with contextlib.suppress(OSError):
            fields = _stat_fields(p)
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / _TICK


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def memory(pid: int, tree: bool = False) -> dict[str, int]:
    """``threads``, ``rss_kib``, ``hwm_kib`` (peak RSS) and ``fds``, summed over the tree.

    For a tree, ``rss_kib`` is the sum of PSS (each shared page divided among
    the processes that share it): forked children share most of their pages
    with their parent, and a sum of their VmRSS would count those again and
    again.  ``hwm_kib`` has no such measure for a tree and is 0 then.
    """
    out = {"threads": 0, "rss_kib": 0, "hwm_kib": 0, "fds": 0, "processes": 0}
    for p in _pids(pid, tree):
        try:
            status = _status(p)
            fds = len(os.listdir(f"/proc/{p}/fd"))
            pss = _pss_kib(p) if tree else 0
        except OSError:
            continue
        out["processes"] += 1
        out["threads"] += int(status.get("Threads", "0"))
        out["fds"] += fds
        if tree:
            out["rss_kib"] += pss
        else:
            out["rss_kib"] += int(status.get("VmRSS", "0 kB").split()[0])
            out["hwm_kib"] += int(status.get("VmHWM", "0 kB").split()[0])
    return out


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    # Local address "0100007F:PORT" in hex; state 0A is LISTEN.  Not a probe
    # connection: it would be a client of the forwarder under test.
    want = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split(None, 4)
            if fields[3] == "0A" and fields[1].endswith(want):
                return True
    return False
