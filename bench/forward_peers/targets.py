"""The servers a forwarder under test forwards to, each in its own process.

Standard library only: ``run.py`` starts it as ``python -I -S targets.py MODE``
so that it shares nothing with the harness.  It binds 127.0.0.1 port 0, says
``ready PORT`` on standard output, and serves until it is killed.

    echo       an epoll echo server for thousands of connections: every byte
               read is written back; end of file from the client closes the
               connection once its pending bytes are written
    reset      accepts and at once closes with SO_LINGER 0: the client gets RST
    blackhole  a listener that never accepts and whose accept queue is full,
               so that the kernel drops further SYNs: a connect to it hangs
               until the connecting side gives up
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import struct
import sys

CHUNK = 1 << 16


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode("ascii"))


def _listener(backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def _accept_all(listener: socket.socket) -> list[socket.socket]:
    """Every connection waiting in the accept queue, without blocking."""
    accepted = []
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                continue
            raise
        accepted.append(conn)


def echo() -> None:
    listener = _listener(socket.SOMAXCONN)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    # fd -> bytes read but not yet written back; while any are pending the
    # fd waits for EPOLLOUT instead of reading more (back pressure).
    pending: dict[int, memoryview] = {}
    ended: set[int] = set()  # end of file seen, close once pending is written

    def close(fd: int) -> None:
        ep.unregister(fd)
        conns.pop(fd).close()
        pending.pop(fd, None)
        ended.discard(fd)

    _say(f"ready {listener.getsockname()[1]}")
    lfd = listener.fileno()
    while True:
        for fd, _ in ep.poll():
            if fd == lfd:
                for conn in _accept_all(listener):
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[conn.fileno()] = conn
                    ep.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns.get(fd)
            if conn is None:
                continue
            try:
                if fd in pending:
                    view = pending[fd]
                    sent = conn.send(view)
                    if sent < len(view):
                        pending[fd] = view[sent:]
                        continue
                    del pending[fd]
                    if fd in ended:
                        close(fd)
                    else:
                        ep.modify(fd, select.EPOLLIN)
                    continue
                data = conn.recv(CHUNK)
                if not data:
                    close(fd)
                    continue
                try:
                    sent = conn.send(data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    pending[fd] = memoryview(data)[sent:]
                    ep.modify(fd, select.EPOLLOUT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                close(fd)


def reset() -> None:
    listener = _listener(socket.SOMAXCONN)
    linger = struct.pack("ii", 1, 0)
    _say(f"ready {listener.getsockname()[1]}")
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        conn.close()


def blackhole() -> None:
    listener = _listener(0)
    port = listener.getsockname()[1]
    # Fill the accept queue (backlog 0 admits one or two): later SYNs are
    # dropped while it stays full, since nothing ever accepts.
    fillers = []
    for _ in range(4):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        fillers.append(sock)
    _say(f"ready {port}")
    while True:
        select.select([], [], [])


def main(argv: list[str]) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    modes = {"echo": echo, "reset": reset, "blackhole": blackhole}
    if len(argv) != 1 or argv[0] not in modes:
        raise SystemExit(f"usage: targets.py {{{'|'.join(modes)}}}")
    modes[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
