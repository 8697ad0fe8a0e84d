"""Client processes for the forwarder benchmark, driven by commands on standard input.

Standard library only, run as ``python -I -S clients.py``.  Each command is
one line; each answer is one JSON line on standard output.  A helper holds
its connections between commands, so that ``run.py`` can spread thousands of
connections over a few processes (each within its fd limit) and act on all
of them at once.  All addresses are on 127.0.0.1.

    open N PORT WINDOW DEADLINE   connect N more clients to PORT (at most
                                  WINDOW connects in flight, 0: no limit);
                                  each sends a distinct 16-byte ping and waits
                                  for it to come back.  Waits up to DEADLINE s.
                                  Answer: ok, failed (connect error), closed
                                  (closed before the echo), pending, seconds
                                  (until the last echo of this command), errors
    wait DEADLINE                 go on waiting for the pending ones
    echo DEADLINE                 every connection that echoed sends a new
                                  distinct message and must get it back
    close WHICH                   close "ok" connections, or "all"
    faults N PORT BATCH TIMEOUT   N attempts, BATCH at a time: connect, send,
                                  and wait for the forwarder to close (end of
                                  file or reset) for up to TIMEOUT s
    rtt PORT TRIPS SIZE           TRIPS timed round trips of SIZE bytes on
                                  one connection (after 50 untimed ones)
    verify PORT NBYTES            send NBYTES of a counting pattern through an
                                  echo, compare every byte that comes back
    quit
"""

from __future__ import annotations

import collections
import errno
import json
import os
import resource
import select
import socket
import sys
import time

PING = 16
HOST = "127.0.0.1"


def _answer(**fields: object) -> None:
    os.write(1, (json.dumps(fields) + "\n").encode("ascii"))


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


class Conn:
    __slots__ = ("sock", "state", "message", "got", "t0", "t_done")

    def __init__(self, sock: socket.socket, message: bytes) -> None:
        self.sock = sock
        self.state = "connecting"  # -> waiting -> ok; or failed / closed
        self.message = message
        self.got = b""
        self.t0 = time.monotonic()
        self.t_done = 0.0


class Clients:
    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.counter = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def _message(self) -> bytes:
        self.counter += 1
        return b"%015d\n" % (os.getpid() * 1_000_000 + self.counter % 1_000_000)

    # -- open / wait / echo ------------------------------------------------

    def _connect(self, port: int) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = Conn(sock, self._message())
        err = sock.connect_ex((HOST, port))
        if err not in (0, errno.EINPROGRESS):
            conn.state = "failed"
            self.errors[_errname(err)] += 1
            sock.close()
        return conn

    def _drive(
        self, active: list[Conn], deadline: float, todo: int = 0, port: int = 0, window: int = 0
    ) -> None:
        """Run connects, pings and echoes until every one is settled or the deadline.

        ``todo`` more connections to ``port`` are started as the window allows.
        """
        ep = select.epoll()
        by_fd: dict[int, Conn] = {}
        in_flight = 0

        def watch(conn: Conn) -> None:
            nonlocal in_flight
            if conn.state == "connecting":
                ep.register(conn.sock.fileno(), select.EPOLLOUT)
                in_flight += 1
            elif conn.state == "waiting":
                ep.register(conn.sock.fileno(), select.EPOLLIN)
            else:
                return
            by_fd[conn.sock.fileno()] = conn

        def settle(conn: Conn, state: str) -> None:
            ep.unregister(conn.sock.fileno())
            del by_fd[conn.sock.fileno()]
            conn.state = state
            conn.t_done = time.monotonic()
            if state != "ok":
                conn.sock.close()

        for conn in active:
            watch(conn)
        try:
            while (todo or by_fd) and time.monotonic() < deadline:
                while todo and (window <= 0 or in_flight < window):
                    conn = self._connect(port)
                    self.conns.append(conn)
                    todo -= 1
                    watch(conn)
                timeout = max(0.0, min(0.05 if todo else 1.0, deadline - time.monotonic()))
                for fd, _ in ep.poll(timeout):
                    conn = by_fd.get(fd)
                    if conn is None:
                        continue
                    sock = conn.sock
                    if conn.state == "connecting":
                        in_flight -= 1
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            self.errors[_errname(err)] += 1
                            settle(conn, "failed")
                            continue
                        try:
                            sock.send(conn.message)
                        except OSError as exc:
                            self.errors[_errname(exc.errno or 0)] += 1
                            settle(conn, "closed")
                            continue
                        conn.state = "waiting"
                        ep.modify(fd, select.EPOLLIN)
                        continue
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self.errors[_errname(exc.errno or 0)] += 1
                        settle(conn, "closed")
                        continue
                    if not data:
                        self.errors["EOF"] += 1
                        settle(conn, "closed")
                        continue
                    conn.got += data
                    if len(conn.got) >= len(conn.message):
                        if conn.got != conn.message:
                            self.errors["wrong-bytes"] += 1
                            settle(conn, "closed")
                        else:
                            conn.got = b""
                            settle(conn, "ok")
        finally:
            ep.close()
        for _ in range(todo):  # never started: the deadline came first
            self.errors["not-started"] += 1

    def _status(self, t0: float, **extra: object) -> None:
        counts = collections.Counter(c.state for c in self.conns)
        done = [c.t_done for c in self.conns if c.state == "ok" and c.t_done >= t0]
        _answer(
            ok=counts["ok"],
            failed=counts["failed"],
            closed=counts["closed"],
            pending=counts["connecting"] + counts["waiting"],
            seconds=(max(done) - t0) if done else None,
            errors=dict(self.errors),
            **extra,
        )

    def open(self, n: int, port: int, window: int, deadline: float) -> None:
        t0 = time.monotonic()
        self.errors.clear()
        self._drive([], t0 + deadline, todo=n, port=port, window=window)
        self._status(t0)

    def wait(self, deadline: float) -> None:
        t0 = time.monotonic()
        pending = [c for c in self.conns if c.state in ("connecting", "waiting")]
        self._drive(pending, t0 + deadline)
        self._status(t0)

    def echo(self, deadline: float) -> None:
        t0 = time.monotonic()
        live = [c for c in self.conns if c.state == "ok"]
        for conn in live:
            conn.message = self._message()
            try:
                conn.sock.send(conn.message)
                conn.state = "waiting"
            except OSError as exc:
                self.errors[_errname(exc.errno or 0)] += 1
                conn.state = "closed"
                conn.sock.close()
        self._drive(live, t0 + deadline)
        ok = sum(c.state == "ok" for c in live)
        _answer(
            echoed=ok,
            of=len(live),
            seconds=time.monotonic() - t0,
            errors=dict(self.errors),
        )

    def close(self, which: str) -> None:
        keep, closed = [], 0
        for conn in self.conns:
            if which == "all" or conn.state == "ok":
                if conn.state in ("ok", "connecting", "waiting"):
                    conn.sock.close()
                closed += 1
            else:
                keep.append(conn)
        self.conns = keep
        _answer(closed=closed, left=len(keep))


def faults(n: int, port: int, batch: int, timeout: float) -> None:
    """Attempts whose target is dead: the forwarder must close each client."""
    outcome: collections.Counter[str] = collections.Counter()
    times: list[float] = []
    left = n
    while left:
        k = min(batch, left)
        left -= k
        ep = select.epoll()
        socks: dict[int, tuple[socket.socket, float]] = {}
        for _ in range(k):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            t0 = time.monotonic()
            sock.settimeout(timeout)
            try:
                sock.connect((HOST, port))
                sock.sendall(b"hello\n")
            except OSError as exc:
                outcome["connect-" + _errname(exc.errno or 0)] += 1
                sock.close()
                continue
            sock.setblocking(False)
            ep.register(sock.fileno(), select.EPOLLIN)
            socks[sock.fileno()] = (sock, t0)
        deadline = time.monotonic() + timeout
        while socks and time.monotonic() < deadline:
            for fd, _ in ep.poll(max(0.0, deadline - time.monotonic())):
                sock, t0 = socks[fd]
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                    outcome["reset"] += 1
                else:
                    outcome["closed" if not data else "answered"] += 1
                times.append(time.monotonic() - t0)
                ep.unregister(fd)
                sock.close()
                del socks[fd]
        for sock, _ in socks.values():
            outcome["still-open"] += 1
            sock.close()
        ep.close()
    times.sort()
    _answer(
        attempts=n,
        closed=outcome["closed"] + outcome["reset"],
        outcome=dict(outcome),
        median_s=times[len(times) // 2] if times else None,
        max_s=times[-1] if times else None,
    )


def rtt(port: int, trips: int, size: int) -> None:
    clock = time.perf_counter_ns
    times = []
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answer = bytearray(size)
        view = memoryview(answer)
        for i in range(-50, trips):
            message = ((i & 0xFFFFFFFF).to_bytes(4, "big") * (size // 4 + 1))[:size]
            t0 = clock()
            sock.sendall(message)
            got = 0
            while got < size:
                k = sock.recv_into(view[got:])
                if not k:
                    raise SystemExit(f"round trip {i}: end of file")
                got += k
            t1 = clock()
            if answer != message:
                raise SystemExit(f"round trip {i}: wrong answer")
            if i >= 0:
                times.append(t1 - t0)
    times.sort()
    _answer(
        trips=trips,
        median_ns=times[len(times) // 2],
        min_ns=times[0],
        p99_ns=times[min(len(times) - 1, len(times) * 99 // 100)],
    )


def _pattern(offset: int, n: int, blocks: dict[int, bytes]) -> bytes:
    """The counting pattern's bytes [offset, offset + n): 8-byte block numbers."""
    out = []
    while n:
        index, skip = divmod(offset, 1 << 16)
        block = blocks.get(index)
        if block is None:
            block = blocks[index] = index.to_bytes(8, "big") * (1 << 13)
            if len(blocks) > 64:
                blocks.pop(next(iter(blocks)))
        piece = block[skip : skip + n]
        out.append(piece)
        offset += len(piece)
        n -= len(piece)
    return b"".join(out)


def verify(port: int, nbytes: int) -> None:
    """Send a pattern through the forwarder to an echo server; compare what returns."""
    blocks: dict[int, bytes] = {}
    t0 = time.monotonic()
    sent = received = 0
    first_bad = -1
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.setblocking(False)
        shut = False
        while True:
            want_write = sent < nbytes
            r, w, _ = select.select([sock], [sock] if want_write else [], [], 30)
            if not r and not w:
                break
            if w:
                try:
                    sent += sock.send(_pattern(sent, min(1 << 18, nbytes - sent), blocks))
                except BlockingIOError:
                    pass
            if sent == nbytes and not shut:
                sock.shutdown(socket.SHUT_WR)
                shut = True
            if r:
                try:
                    data = sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                if not data:
                    break
                if first_bad < 0 and data != _pattern(received, len(data), blocks):
                    expect = _pattern(received, len(data), blocks)
                    first_bad = received + next(
                        i for i, (a, b) in enumerate(zip(data, expect, strict=False)) if a != b
                    )
                received += len(data)
    _answer(
        sent=sent,
        received=received,
        first_bad=first_bad,
        ok=sent == nbytes and received == nbytes and first_bad < 0,
        seconds=time.monotonic() - t0,
    )


def main() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    clients = Clients()
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "open":
            clients.open(int(args[0]), int(args[1]), int(args[2]), float(args[3]))
        elif cmd == "wait":
            clients.wait(float(args[0]))
        elif cmd == "echo":
            clients.echo(float(args[0]))
        elif cmd == "close":
            clients.close(args[0])
        elif cmd == "faults":
            faults(int(args[0]), int(args[1]), int(args[2]), float(args[3]))
        elif cmd == "rtt":
            rtt(int(args[0]), int(args[1]), int(args[2]))
        elif cmd == "verify":
            verify(int(args[0]), int(args[1]))
        elif cmd == "quit":
            break
        else:
            _answer(error=f"unknown command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
