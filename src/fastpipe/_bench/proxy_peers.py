"""The two peers of the proxy round-trip benchmark, run as separate processes.

Standard library only: ``_bench.proxy`` runs this file with ``python -I -S``
so that a peer costs the relay's process nothing but the bytes it relays.

    echo-server MSGSIZE          listen, say "ready PORT", echo MSGSIZE-byte
                                 messages until end of file, say "done N"
    rr-client PORT TRIPS MSGSIZE connect, say "ready", wait for "go", make
                                 TRIPS round trips checking each answer,
                                 half-close, read to end of file, say "done N"
    rr-latency PORT TRIPS MSGSIZE as rr-client, timing each round trip, and
                                 say "done N MEDIAN_NS MIN_NS P99_NS"
"""

from __future__ import annotations

import os
import socket
import sys
import time


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode("ascii"))


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on end of file before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise SystemExit(f"end of file after {got} of {len(view)} bytes")
        got += n
    return True


def _echo_server(msgsize: int) -> None:
    buf = bytearray(msgsize)
    view = memoryview(buf)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        _say(f"ready {listener.getsockname()[1]}")
        conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    count = 0
    with conn:
        while _recv_exactly(conn, view):
            conn.sendall(view)
            count += 1
        conn.shutdown(socket.SHUT_WR)
    _say(f"done {count}")


def _rr_client(port: int, trips: int, msgsize: int, timed: bool = False) -> None:
    times: list[int] = []
    clock = time.perf_counter_ns
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _say("ready")
        if sys.stdin.buffer.readline() != b"go\n":
            raise SystemExit("rr-client: no 'go' from the parent")
        answer = bytearray(msgsize)
        view = memoryview(answer)
        for i in range(trips):
            message = (i.to_bytes(4, "big") * (msgsize // 4 + 1))[:msgsize]
            t0 = clock()
            sock.sendall(message)
            if not _recv_exactly(sock, view) or answer != message:
                raise SystemExit(f"round trip {i}: wrong answer")
            times.append(clock() - t0)
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1):
            raise SystemExit("bytes after the last answer")
    if not timed:
        _say(f"done {trips}")
        return
    times.sort()
    p99 = times[min(len(times) - 1, len(times) * 99 // 100)]
    _say(f"done {trips} {times[len(times) // 2]} {times[0]} {p99}")


def main(argv: list[str]) -> int:
    role, args = argv[0], [int(a) for a in argv[1:]]
    if role == "echo-server":
        _echo_server(*args)
    elif role in ("rr-client", "rr-latency"):
        port, trips, msgsize = args
        _rr_client(port, trips, msgsize, timed=role == "rr-latency")
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
