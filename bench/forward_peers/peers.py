"""The forwarders under test, and the servers and clients around them.

Each forwarder listens on a 127.0.0.1 port the harness picks and forwards
to a 127.0.0.1 target port:

* ``fastpipe``: ``PYTHON -m fastpipe forward -q --grace G --connect-timeout T
  LISTEN TARGET``, from whatever fastpipe that interpreter imports (the
  harness's own, or one given with ``--fastpipe-python``).  ``-q`` keeps
  the per-connection log line for failures only (``end=error``), which the
  faults workload counts.
* ``haproxy``: ``haproxy -db -f CONFIG`` with ``mode tcp``, ``nbthread 2``,
  ``timeout connect T``, an hour for client and server timeouts, no logging.
* ``socat``: ``socat TCP-LISTEN:PORT,fork,... TCP:TARGET,nodelay,connect-timeout=T``:
  a ``fork()`` per connection, measured over its process tree.
* ``asyncio``: ``asyncio_forward.py``, the Python baseline.

Every process's output goes to a log file in the run's scratch directory
(never a pipe that could fill up).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import procs

HERE = os.path.dirname(os.path.abspath(__file__))
STARTUP_TIMEOUT = 20.0

FASTPIPE = "fastpipe"
HAPROXY = "haproxy"
SOCAT = "socat"
ASYNCIO = "asyncio"
DIRECT = "direct"

KINDS = (FASTPIPE, HAPROXY, SOCAT, ASYNCIO)


class PeerError(Exception):
    """A process did not start or did not answer as expected."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: str, limit: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-limit:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return cmd if cpu is None else ["taskset", "-c", str(cpu), *cmd]


def wait_listening(proc: subprocess.Popen[bytes], port: int, role: str, log: str) -> None:
    """Wait until ``proc`` listens on ``port``.

    Raises:
        PeerError: it exited, or did not listen within STARTUP_TIMEOUT.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not procs.listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            procs.kill(proc)
            raise PeerError(f"{role}: not listening on {port}: {_tail(log)}")
        time.sleep(0.02)


@dataclass
class Peer:
    """One forwarder to compare: a kind, a label for the tables, and how to run it."""

    name: str
    kind: str
    python: str = sys.executable
    extra_args: tuple[str, ...] = ()
    #: For a fastpipe: what ``python -c "import fastpipe"`` says it is.
    version: str = ""

    @property
    def tree(self) -> bool:
        """Whether its work happens in child processes (measure the whole tree)."""
        return self.kind == SOCAT

    def describe(self) -> str:
        if self.kind == FASTPIPE:
            return f"{self.python} -m fastpipe forward -q ({self.version})"
        if self.kind == HAPROXY:
            return "haproxy, mode tcp, nbthread 2"
        if self.kind == SOCAT:
            return "socat TCP-LISTEN:...,fork TCP:...,nodelay (a process per connection)"
        return "asyncio streams, 2 pump tasks per connection (asyncio_forward.py)"


@dataclass
class Settings:
    """What every forwarder start has in common."""

    workdir: str
    connect_timeout: float = 2.0
    grace: float = 1.0


@dataclass
class Running:
    """A started forwarder: its process, its port and its log file."""

    peer: Peer
    proc: subprocess.Popen[bytes]
    port: int
    log: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pid, self.peer.tree)

    def memory(self) -> dict[str, int]:
        return procs.memory(self.pid, self.peer.tree)

    def log_lines(self, needle: str) -> int:
        try:
            with open(self.log, "rb") as f:
                return sum(needle.encode() in line for line in f)
        except OSError:
            return 0

    def sigterm(self, timeout: float) -> tuple[float | None, int | None]:
        """SIGTERM the forwarder itself; (seconds to exit or None, exit status)."""
        self.proc.send_signal(15)
        seconds = procs.wait_exit(self.proc, timeout)
        status = self.proc.returncode
        self.stop()
        return seconds, status

    def stop(self) -> None:
        procs.kill(self.proc)


_counter = 0


def _log_path(workdir: str, role: str) -> str:
    global _counter
    _counter += 1
    return os.path.join(workdir, f"{_counter:04d}-{role}.log")


def _haproxy_config(
    path: str, port: int, target: int, settings: Settings, maxconn: int | None, ulimit: int | None
) -> None:
    lines = ["global", "    nbthread 2"]
    if maxconn is not None:
        lines.append(f"    maxconn {maxconn}")
    if ulimit is not None:
        lines.append(f"    ulimit-n {ulimit}")
    lines += [
        "defaults",
        "    mode tcp",
        f"    timeout connect {int(settings.connect_timeout * 1000)}ms",
        "    timeout client 1h",
        "    timeout server 1h",
    ]
    if maxconn is not None:
        lines.append(f"    maxconn {maxconn}")
    lines += [
        "frontend in",
        f"    bind 127.0.0.1:{port}",
        "    default_backend out",
        "backend out",
        f"    server target 127.0.0.1:{target}",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def start_forwarder(
    peer: Peer,
    target: int,
    settings: Settings,
    *,
    maxconn: int | None = None,
    nofile: int | None = None,
    cpu: int | None = None,
) -> Running:
    """Start ``peer`` forwarding to 127.0.0.1:``target`` and wait until it listens.

    ``maxconn``: the most connections it must take (haproxy's setting);
    ``nofile``: its fd limit (for haproxy: ``ulimit-n`` and no ``maxconn``,
    the way it is meant to derive one from the other); ``cpu``: pin it.
    """
    port = free_port()
    log = _log_path(settings.workdir, peer.name)
    listen, to = f"127.0.0.1:{port}", f"127.0.0.1:{target}"
    if peer.kind == FASTPIPE:
        cmd = [
            peer.python,
            "-m",
            "fastpipe",
            "forward",
            "-q",
            "--grace",
            f"{settings.grace:g}",
            "--connect-timeout",
            f"{settings.connect_timeout:g}",
            *peer.extra_args,
            listen,
            to,
        ]
    elif peer.kind == HAPROXY:
        config = log[: -len(".log")] + ".cfg"
        if nofile is not None:
            _haproxy_config(config, port, target, settings, None, nofile)
        else:
            _haproxy_config(config, port, target, settings, maxconn, None)
        cmd = ["haproxy", "-db", "-f", config]
    elif peer.kind == SOCAT:
        cmd = [
            "socat",
            f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog={socket.SOMAXCONN},nodelay",
            f"TCP:{to},nodelay,connect-timeout={settings.connect_timeout:g}",
        ]
    elif peer.kind == ASYNCIO:
        script = os.path.join(HERE, "asyncio_forward.py")
        cmd = [sys.executable, "-I", "-S", script, str(port), str(target)]
    else:
        raise ValueError(f"unknown forwarder kind {peer.kind!r}")
    with open(log, "wb") as out:
        proc = procs.spawn(
            _pinned(cmd, cpu), stdout=out, stderr=out, cwd=settings.workdir, nofile=nofile
        )
    wait_listening(proc, port, peer.name, log)
    return Running(peer, proc, port, log)


def start_target(mode: str, workdir: str, cpu: int | None = None) -> tuple[Any, int]:
    """Start ``targets.py MODE``; returns (process, port)."""
    log = _log_path(workdir, f"target-{mode}")
    script = os.path.join(HERE, "targets.py")
    with open(log, "wb") as err:
        proc = procs.spawn(
            _pinned([sys.executable, "-I", "-S", script, mode], cpu),
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=workdir,
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], STARTUP_TIMEOUT)
    words = proc.stdout.readline().split() if ready else []
    if len(words) != 2 or words[0] != b"ready":
        procs.kill(proc)
        raise PeerError(f"target {mode}: said {words!r}: {_tail(log)}")
    return proc, int(words[1])


def start_nginx(workdir: str, workers: int = 1) -> tuple[Any, int]:
    """An nginx serving a 1 KiB file as /index.html, one request per connection."""
    port = free_port()
    root = os.path.join(workdir, "nginx")
    www = os.path.join(root, "www")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "index.html"), "wb") as f:
        f.write(b"x" * 1023 + b"\n")
    # As root, nginx would switch its workers to "nobody", who cannot read
    # the scratch directory; keep them as they are.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"{user}worker_processes {workers};\n"
            "daemon off;\n"
            f"pid {root}/nginx.pid;\n"
            f"error_log {root}/logs/error.log warn;\n"
            "worker_rlimit_nofile 20000;\n"
            "events { worker_connections 8192; }\n"
            "http {\n"
            "    access_log off;\n"
            "    keepalive_timeout 0;\n"
            f"    server {{ listen 127.0.0.1:{port} backlog={socket.SOMAXCONN};"
            f" root {www}; }}\n"
            "}\n"
        )
    log = _log_path(workdir, "nginx")
    with open(log, "wb") as out:
        proc = procs.spawn(
            ["nginx", "-p", root, "-e", f"{root}/logs/error.log", "-c", conf],
            stdout=out,
            stderr=out,
            cwd=workdir,
        )
    wait_listening(proc, port, "nginx", log)
    return proc, port


def start_iperf3_server(workdir: str) -> tuple[Any, int]:
    """A one-off ``iperf3 -s -1`` on 127.0.0.1."""
    port = free_port()
    log = _log_path(workdir, "iperf3-server")
    with open(log, "wb") as out:
        proc = procs.spawn(
            ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=out,
            cwd=workdir,
        )
    wait_listening(proc, port, "iperf3 server", log)
    return proc, port


class Helper:
    """A ``clients.py`` process: one command line in, one JSON line out."""

    def __init__(self, workdir: str, cpu: int | None = None) -> None:
        self.log = _log_path(workdir, "clients")
        script = os.path.join(HERE, "clients.py")
        with open(self.log, "wb") as err:
            self.proc = procs.spawn(
                _pinned([sys.executable, "-I", "-S", script], cpu),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=workdir,
            )

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode("ascii") + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> dict[str, Any]:
        stdout = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else b""
        if not line:
            procs.kill(self.proc)
            why = "no answer in time" if not ready else "it exited"
            raise PeerError(f"client helper: {why}: {_tail(self.log)}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def request(self, command: str, timeout: float) -> dict[str, Any]:
        self.send(command)
        return self.reply(timeout)

    def close(self) -> None:
        procs.kill(self.proc)


class HelperGroup:
    """Several helpers acting at once, so that N connections are spread over processes."""

    def __init__(self, workdir: str, count: int) -> None:
        self.helpers: list[Helper] = []
        try:
            for _ in range(count):
                self.helpers.append(Helper(workdir))
        except BaseException:
            self.close()
            raise

    def all(self, commands: list[str], timeout: float) -> list[dict[str, Any]]:
        for helper, command in zip(self.helpers, commands, strict=True):
            helper.send(command)
        return [helper.reply(timeout) for helper in self.helpers]

    def same(self, command: str, timeout: float) -> list[dict[str, Any]]:
        return self.all([command] * len(self.helpers), timeout)

    def close(self) -> None:
        for helper in self.helpers:
            helper.close()


def which(tool: str) -> str | None:
    return shutil.which(tool)
