"""``fastpipe forward LISTEN TARGET``: a TCP port forwarder, one ``proxy()`` per connection.

Threads, and why:

- The main thread runs an epoll loop over the listener, a wake-up
  socketpair and the sockets still connecting to TARGET.  It accepts every
  pending client per wake-up (until EAGAIN), starts a non-blocking connect
  for each, and hands the pair to ``WorkerPool.proxy()`` when the connect
  completes; ``--connect-timeout`` is a deadline checked by the same loop.
  No thread is started per client: a slow or silent target costs a socket
  and a few dozen bytes while it is waited for, not a thread.
- TARGET's host is resolved once, at start-up: resolving per client would
  need a thread per client again (``getaddrinfo`` blocks), and a forwarder
  sits in front of one service whose address rarely moves.
- The copying runs in the forwarder's own ``WorkerPool``, with the GIL
  released; an idle worker exits after ``IDLE_WORKER_TIMEOUT`` seconds, so
  that after a burst the process goes back to its idle thread count.  Each
  proxy's done-callback (in the pool's completion thread) writes the
  connection's log line and updates the totals; it wakes the main thread
  only when that waits for a connection to end (``--max-connections``
  reached, out of fds, or stopping).
- Signal handlers run in the main thread: SIGINT and SIGTERM only record
  the signal.  The kernel may deliver a signal to any thread, and one that
  lands on a pool thread leaves the main thread asleep in ``epoll_wait``;
  ``signal.set_wakeup_fd`` has the interpreter write a byte to the wake-up
  socket whichever thread it lands on, which wakes the main thread to run
  the handler.

At the limits the listener is taken out of the epoll set, and further
clients wait in the kernel's listen backlog, which is what a user of a
connection limit expects (a client that is accepted and then closed has to
retry by itself; one in the backlog is simply served later):
``--max-connections`` until a connection ends; EMFILE and its kind
(``accept()`` or ``socket()`` out of fds, memory or threads) until a
connection ends or ``_SHORTAGE_RETRY`` seconds pass, logged once per
``_SHORTAGE_LOG_INTERVAL``.  A listener left in a level-triggered epoll set
while ``accept()`` fails would spin.

Shutdown: the first SIGINT/SIGTERM closes the listener (clients still in
the backlog are refused), open connections get ``--grace`` seconds to end
by themselves, and the rest are cancelled: a connect in progress is closed,
a proxy gets ``Relay.cancel()``, which stops it within milliseconds even
when it is blocked.  A second signal cancels at once.  Either way the exit
status is 0: the contract says that SIGINT/SIGTERM stop the forwarder
gracefully with 0, and cancelled connections are reported in their log
lines and in the summary.  The pool is not shut down: by then no relay is
left, and its idle workers (thousands after a burst, on an engine with a
thread per waiting relay) are daemon threads that the process's exit
reclaims at once, where waking each to retire costs a GIL hand-off.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import select
import signal
import socket
import sys
import textwrap
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from fastpipe._cli.args import positive_int, seconds

if TYPE_CHECKING:
    from fastpipe._pool import WorkerPool
    from fastpipe._relay import Relay

PROG = "fastpipe forward"

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_GRACE = 10.0

#: Seconds a pool worker may sit idle before it exits.  Long enough that a
#: steady stream of connections reuses warm workers; short enough that a
#: burst's threads are gone a few seconds after it.
IDLE_WORKER_TIMEOUT = 3.0

#: Out of fds, memory or threads: how long the listener stays out of the
#: epoll set unless a connection ends first.  Clients wait in the backlog.
_SHORTAGE_RETRY = 0.5

#: A shortage that lasts is logged again at most this often.
_SHORTAGE_LOG_INTERVAL = 60.0

#: After cancelling, how long to wait for the last done-callbacks (a relay's
#: cancel() returns after its callbacks ran; this only bounds a surprise).
_CANCEL_WAIT = 5.0

#: errnos of accept() and socket() that mean "out of a resource": back off.
_SHORTAGES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

# How a connection ended, as its log line says it (``end=...``).
END_OK = "ok"
END_IDLE = "idle-timeout"
END_ERROR = "error"
END_CANCELLED = "cancelled"


class Address(NamedTuple):
    """A parsed ``HOST:PORT``; ``host`` is "" for every interface (LISTEN only)."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: ``[::1]:8080``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str, *, listen: bool) -> Address:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``.

    LISTEN may leave HOST empty (``:8080``, every interface) and may use
    port 0 (the kernel picks one); TARGET needs both.

    Raises:
        argparse.ArgumentTypeError: with a message for the usage error.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or not host:
            raise argparse.ArgumentTypeError(f"expected [IPV6]:PORT, got {text!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"put an IPv6 address in brackets, as in [::1]:8080, got {text!r}"
            )
    if any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"bad host in {text!r}")
    if not host and not listen:
        raise argparse.ArgumentTypeError(f"the target needs a host, got {text!r}")
    if not port_text.isdigit() or not port_text.isascii():
        raise argparse.ArgumentTypeError(f"bad port {port_text!r} in {text!r}")
    port = int(port_text)
    lowest = 0 if listen else 1
    if not lowest <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} out of range {lowest}-65535 in {text!r}")
    return Address(host, port)


def _listen_address(text: str) -> Address:
    return parse_address(text, listen=True)


def _target_address(text: str) -> Address:
    return parse_address(text, listen=False)


def add_parser(commands: Any, summary: str) -> None:
    """Add the ``forward`` subcommand to ``commands`` (an argparse subparsers action),
    with ``summary`` as its line in ``fastpipe --help``."""
    forward = commands.add_parser(
        "forward",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            f"""\
            Accept TCP connections on LISTEN and relay each one, both ways, to a new
            connection to TARGET with fastpipe.proxy (pool workers copy with the GIL
            released; end of file is passed on as a half-close).

            LISTEN and TARGET are HOST:PORT; an IPv6 address goes in brackets
            ([::1]:8080). LISTEN may use port 0 (the kernel picks one) and an empty
            HOST (:8080, every interface). The address actually listened on is
            printed on standard error at startup. TARGET's host is resolved once,
            at startup; each connection tries its addresses in turn, the one that
            last worked first.

            Threads: the main thread accepts every waiting client at each wake-up
            and connects to TARGET without blocking, in one epoll loop: a slow or
            silent TARGET costs a socket while it is waited for, not a thread.
            Both sockets then go to the pool whose workers copy; a worker idle for
            {IDLE_WORKER_TIMEOUT:g} s exits, so the thread count goes back down after a burst.

            Standard error gets one line per connection when it ends, with its
            peer, bytes each way (up: client to target, down: target to client),
            duration and how it ended: end=ok, end=idle-timeout, end=error (with
            error="...": a refused, reset or timed-out connect too) or
            end=cancelled (at shutdown).

            Out of file descriptors (or memory, or threads), the forwarder stops
            accepting until a connection ends or {_SHORTAGE_RETRY:g} s pass; waiting clients
            stay in the listen backlog. It says so at most once a minute.

            SIGINT or SIGTERM stops accepting, lets open connections finish for up
            to --grace seconds, cancels the rest, prints a summary and exits with
            status 0. A second signal cancels the open connections at once (still
            status 0).

            Exit status: 0 stopped by a signal; 1 LISTEN unusable (in use, no
            permission, unknown host) or TARGET's host unknown; 2 a usage error.
            """
        ),
    )
    forward.add_argument(
        "listen", metavar="LISTEN", type=_listen_address, help="HOST:PORT to accept on"
    )
    forward.add_argument(
        "target", metavar="TARGET", type=_target_address, help="HOST:PORT to connect to"
    )
    forward.add_argument(
        "--max-connections",
        type=positive_int,
        metavar="N",
        help=(
            "relay at most N connections at once; further clients wait in the listen "
            "backlog until one ends (default: no limit)"
        ),
    )
    forward.add_argument(
        "--idle-timeout",
        type=seconds(zero_ok=False),
        metavar="SECONDS",
        help="close a connection when no byte has moved either way for SECONDS",
    )
    forward.add_argument(
        "--connect-timeout",
        type=seconds(zero_ok=False),
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=(
            "give up connecting to TARGET after SECONDS, all its addresses together "
            "(default: %(default)g)"
        ),
    )
    forward.add_argument(
        "--grace",
        type=seconds(zero_ok=True),
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=(
            "at SIGINT/SIGTERM, how long open connections may go on before they are "
            "cancelled (default: %(default)g)"
        ),
    )
    forward.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help=(
            "log only failures (end=error, and accept() out of fds); the listening line "
            "is kept when LISTEN's port is 0, since nothing else tells the port"
        ),
    )
    forward.set_defaults(run=run)


# -- logging ---------------------------------------------------------------------


class Log:
    """Timestamped lines on a stream, whole lines from any thread.

    The timestamp is ISO 8601 in local time with milliseconds and the UTC
    offset, as ``datetime.now().astimezone().isoformat(timespec="milliseconds")``
    writes it; its text up to the second is made once per second, since
    that call costs more than the rest of a connection's line.

    A write that fails (standard error closed, a reader gone) is dropped: the
    forwarder's job is the connections, and a done-callback must never raise.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        # (second, "YYYY-MM-DDTHH:MM:SS", "+HH:MM"), replaced whole: a
        # thread reads one consistent tuple without the lock.
        self._second: tuple[int, str, str] = (-1, "", "")

    def stamp(self) -> str:
        """Now, as the log writes it: ``2025-06-01T12:00:03.120+02:00``."""
        second, ns = divmod(time.time_ns(), 1_000_000_000)
        cached = self._second
        if cached[0] != second:
            local = time.localtime(second)
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", local), _utc_offset(local))
            self._second = cached
        return f"{cached[1]}.{ns // 1_000_000:03d}{cached[2]}"

    def __call__(self, message: str) -> None:
        line = f"{self.stamp()} {PROG}: {message}\n"
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._stream.write(line)
            self._stream.flush()


def _utc_offset(local: time.struct_time) -> str:
    """``+HH:MM`` (``+HH:MM:SS`` for an offset with seconds), as isoformat()."""
    offset = local.tm_gmtoff or 0
    sign = "-" if offset < 0 else "+"
    hours, rest = divmod(abs(offset), 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{sign}{hours:02d}:{minutes:02d}"
    return f"{text}:{secs:02d}" if secs else text


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _reason(exc: BaseException) -> str:
    """``ConnectionRefusedError: Connection refused``, without the errno number."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- connections -----------------------------------------------------------------


class _Connection:
    """One client, from its accept to its log line.

    While it connects (``relay`` is None) only the main thread touches it;
    once proxied, the relay's done-callback ends it, in whichever thread
    completes the relay.
    """

    __slots__ = (
        "number",
        "client",
        "peer",
        "started",
        "upstream",
        "addresses",
        "tried",
        "relay",
        "ended",
    )

    def __init__(
        self,
        number: int,
        client: socket.socket,
        peer: Any,
        started: float,
        addresses: tuple[tuple[int, Any], ...],
    ) -> None:
        self.number = number
        self.client = client
        self.peer = peer  # as accept() returned it: formatted only for a log line
        self.started = started
        self.upstream: socket.socket | None = None
        self.addresses = addresses  # TARGET's, in the order this one tries them
        self.tried = 0  # how many of them it has tried
        self.relay: Relay[tuple[int, int]] | None = None
        self.ended = False  # claimed under Forwarder._end_lock


class Totals:
    """What the summary line reports; counted under a lock, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.ok = 0
        self.errors = 0
        self.idle_timeouts = 0
        self.cancelled = 0
        self.up = 0
        self.down = 0

    def count(self, end: str, up: int, down: int) -> None:
        with self.lock:
            self.connections += 1
            self.up += up
            self.down += down
            if end == END_OK:
                self.ok += 1
            elif end == END_IDLE:
                self.idle_timeouts += 1
            elif end == END_CANCELLED:
                self.cancelled += 1
            else:
                self.errors += 1


class Forwarder:
    """The event loop and the bookkeeping of open connections.

    Args:
        listener: a bound, listening socket; the forwarder closes it.
        target: where each connection goes, as given (for log lines).
        addresses: TARGET resolved: ``(family, sockaddr)`` pairs to try in order.
        pool: the pool that runs the proxies.
        log: where connection lines go.
        max_connections: at most this many connections at once, or None.
        idle_timeout: passed to ``proxy()``.
        connect_timeout: seconds for connecting to ``target``, every address
            tried together.
        quiet: log only connections that ended in an error.
    """

    def __init__(
        self,
        listener: socket.socket,
        target: Address,
        addresses: list[tuple[int, Any]],
        pool: WorkerPool,
        log: Log,
        *,
        max_connections: int | None = None,
        idle_timeout: float | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        quiet: bool = False,
    ) -> None:
        if not addresses:
            raise ValueError("no address to connect to")
        self.listener: socket.socket | None = listener
        self.target = target
        self.addresses = tuple(addresses)
        self.pool = pool
        self.log = log
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.quiet = quiet
        self.totals = Totals()
        self.signals: list[int] = []  # appended to by the signal handler
        # Every connection from its accept to its end, by number.  The main
        # thread adds; whichever thread ends a connection removes it (a
        # dict's insert and pop are atomic under the GIL).
        self._open: dict[int, _Connection] = {}
        self._end_lock = threading.Lock()
        # The connections waiting for their connect, by number: accepted in
        # that order with one timeout for all, so the first one's deadline
        # is the next to come.  And the same by upstream fd, for epoll.
        self._connecting: dict[int, _Connection] = {}
        self._connecting_fds: dict[int, _Connection] = {}
        self._numbers = 0
        # Set by the main thread when it needs to hear of a connection's end.
        self._wake_on_end = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._probe = select.poll()  # see _connect
        # Relays are completed here, in the loop's thread, not in the pool's
        # completer: their done-callbacks (_relay_done) then run between
        # accepts with no GIL hand-over to another thread and back.
        self._loop_thread = threading.get_ident()
        self._ready_fd = pool._ready_fd()
        self._epoll.register(self._ready_fd, select.EPOLLIN)
        listener.setblocking(False)
        # Linux gives an accepted socket the listener's TCP_NODELAY: one
        # setsockopt here instead of one per client.  Small request/response
        # exchanges must not wait for Nagle.
        with contextlib.suppress(OSError):
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._listen_fd = listener.fileno()
        self._listen_family = int(listener.family)
        self._polling = False  # the listener is in the epoll set
        # Out of fds (or memory, threads): whether the accepts under way
        # ran into it, when to try accept() again, how many connections had
        # ended then (one more ending frees fds), and when it was logged.
        self._short = False
        self._retry_at = 0.0
        self._ended_at_shortage = 0
        self._shortage_logged = -_SHORTAGE_LOG_INTERVAL
        self._next_upstream: socket.socket | None = None
        self._next_family = -1  # _next_upstream's, as a plain int
        self._resume()

    # -- waking the main thread -----------------------------------------

    def wake(self) -> None:
        """Make the main thread's epoll wait return (any thread)."""
        with contextlib.suppress(OSError):  # full: it is awake anyway; closed: over
            self._wake_w.send(b"\0")

    @property
    def wakeup_fd(self) -> int:
        """The fd for ``signal.set_wakeup_fd``: a signal wakes the loop."""
        return self._wake_w.fileno()

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread, woken through the wakeup fd.
        self.signals.append(signum)

    @property
    def open_count(self) -> int:
        return len(self._open)

    # -- the event loop ---------------------------------------------------

    def serve(self) -> None:
        """Accept and start connections until a signal arrives."""
        while not self.signals:
            self._turn(None)

    def _turn(self, until: float | None) -> None:
        """Wait once for events (at most until ``until``) and handle them."""
        now = time.monotonic()
        timeout = -1.0 if until is None else max(0.0, until - now)
        if self.listener is not None and not self._polling:
            # Paused: a connection's end is what lets it go on.  Asked for
            # before the room is checked, so that an end in between is not
            # missed.
            self._wake_on_end = True
            if self._may_accept(now):
                self._accept_all(now)
            if not self._polling and self._retry_at > now:
                left = self._retry_at - now
                timeout = left if timeout < 0 else min(timeout, left)
        if self._connecting:
            first = next(iter(self._connecting.values()))
            left = max(0.0, first.started + self.connect_timeout - now)
            timeout = left if timeout < 0 else min(timeout, left)
        events = self._epoll.poll(timeout)
        now = time.monotonic()
        for fd, mask in events:
            if fd == self._listen_fd:
                if self._polling:
                    self._accept_all(now)
            elif fd == self._ready_fd:
                self.pool._complete_ready()
            elif fd == self._wake_r.fileno():
                self._drain_wake()
            else:
                conn = self._connecting_fds.get(fd)
                if conn is not None:
                    self._connect_ready(conn, mask)
        if self._connecting:
            self._expire_connects(now)

    def _room(self) -> bool:
        return self.max_connections is None or len(self._open) < self.max_connections

    def _may_accept(self, now: float) -> bool:
        """Whether a paused listener may be tried again."""
        if not self._room():
            return False
        return now >= self._retry_at or self.totals.connections != self._ended_at_shortage

    def _resume(self) -> None:
        """Put the listener back in the epoll set."""
        if self.listener is not None and not self._polling:
            self._epoll.register(self._listen_fd, select.EPOLLIN)
            self._polling = True
            self._wake_on_end = False
            self._retry_at = 0.0

    def _pause(self) -> None:
        """Take the listener out of the epoll set: clients wait in the backlog."""
        if self._polling:
            self._epoll.unregister(self._listen_fd)
            self._polling = False
        self._wake_on_end = True

    def _accept_all(self, now: float) -> None:
        """Accept every waiting client, up to the limit, and start its connect.

        Ends with the listener polled when the backlog is empty, and out of
        the epoll set when at the limit or out of a resource.
        """
        listener = self.listener
        assert listener is not None
        # The fd, and a socket object made from plain ints: accept() would
        # spend more on its enum properties than on the syscall.
        accept = listener._accept  # type: ignore[attr-defined]
        family = self._listen_family
        limit = self.max_connections
        open_ = self._open
        self._short = False
        while limit is None or len(open_) < limit:
            # The socket to TARGET is made before the client is accepted:
            # out of fds, the client then stays in the backlog instead of
            # being accepted only to be closed.  When the backlog turns out
            # empty it is kept for the next client.
            upstream = self._next_upstream
            if upstream is None:
                upstream_family = self.addresses[0][0]
                try:
                    upstream = socket.socket(
                        upstream_family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                    )
                except OSError as exc:
                    self._shortage(now, f"cannot accept: socket(): {_reason(exc)}")
                    return
                self._next_upstream = upstream
                self._next_family = upstream_family
            try:
                fd, peer = accept()
            except BlockingIOError:
                self._resume()
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while it waited
                # EMFILE and its kind: the client stays in the backlog.  So
                # does it for an error nobody expects, tried again later
                # rather than in a loop.
                self._shortage(now, f"cannot accept: {_reason(exc)}")
                return
            self._next_upstream = None
            client = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            self._numbers += 1
            conn = _Connection(self._numbers, client, peer, now, self.addresses)
            open_[conn.number] = conn
            self._connect(conn, upstream, self._next_family)
            if self._short:
                return  # paused by _shortage()
        self._pause()  # at --max-connections

    def _shortage(self, now: float, what: str) -> None:
        """Out of fds, memory or threads: pause until an end or a while passes."""
        self._pause()
        self._short = True
        self._retry_at = now + _SHORTAGE_RETRY
        self._ended_at_shortage = self.totals.connections
        if now - self._shortage_logged >= _SHORTAGE_LOG_INTERVAL:
            self._shortage_logged = now
            self.log(
                f"{what}; {len(self._open)} open; accepting again when one ends"
                f" or in {_SHORTAGE_RETRY:g} s (logged at most every"
                f" {_SHORTAGE_LOG_INTERVAL:g} s)"
            )

    # -- connecting -------------------------------------------------------

    def _connect(
        self, conn: _Connection, upstream: socket.socket | None = None, upstream_family: int = -1
    ) -> None:
        """Start connecting to the next address: proxied, waited for, or ended.

        ``upstream``, a new socket of ``upstream_family``, is used if that
        is the family needed.
        """
        error: OSError | None = None
        while conn.tried < len(conn.addresses):
            family, sockaddr = conn.addresses[conn.tried]
            conn.tried += 1
            if upstream is not None and upstream_family != family:
                upstream.close()
                upstream = None
            if upstream is None:
                try:
                    upstream = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                except OSError as exc:
                    if exc.errno in _SHORTAGES:
                        self._shortage(time.monotonic(), f"connect: {_reason(exc)}")
                    error = exc
                    break
            code = upstream.connect_ex(sockaddr)
            if code == errno.EINPROGRESS:
                conn.upstream = upstream
                self._connecting[conn.number] = conn
                # A target on this host has answered within connect() itself
                # (loopback runs the whole handshake in the call): one look
                # without waiting spares the epoll set an add and a delete.
                fd = upstream.fileno()
                probe = self._probe
                probe.register(fd, select.POLLOUT)
                ready = probe.poll(0)
                probe.unregister(fd)
                if ready:
                    self._connected(conn)
                    return
                self._epoll.register(fd, select.EPOLLOUT)
                self._connecting_fds[fd] = conn
                return
            if code == 0:
                conn.upstream = upstream
                self._connecting.pop(conn.number, None)
                self._proxy(conn)
                return
            upstream.close()
            upstream = None
            error = OSError(code, os.strerror(code))
        assert error is not None
        self._connect_failed(conn, error)

    def _connect_ready(self, conn: _Connection, mask: int) -> None:
        """epoll says the connect finished."""
        upstream = conn.upstream
        assert upstream is not None
        fd = upstream.fileno()
        self._epoll.unregister(fd)
        del self._connecting_fds[fd]
        self._connected(conn)

    def _connected(self, conn: _Connection) -> None:
        """The connect finished: proxy the pair, or try the next address."""
        upstream = conn.upstream
        assert upstream is not None
        code = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            del self._connecting[conn.number]
            if conn.tried > 1:
                # Where this one got through, the next ones start.
                good = conn.addresses[conn.tried - 1]
                self.addresses = (good, *(a for a in self.addresses if a != good))
            self._proxy(conn)
            return
        upstream.close()
        conn.upstream = None
        if conn.tried < len(conn.addresses):
            # The next address, with the same deadline: the connection keeps
            # its place in _connecting.
            self._connect(conn)
        else:
            self._connect_failed(conn, OSError(code, os.strerror(code)))

    def _expire_connects(self, now: float) -> None:
        """End the connects whose deadline has passed (the oldest come first)."""
        connecting = self._connecting
        while connecting:
            conn = next(iter(connecting.values()))
            if conn.started + self.connect_timeout > now:
                return
            upstream = conn.upstream
            assert upstream is not None
            fd = upstream.fileno()
            self._epoll.unregister(fd)
            del self._connecting_fds[fd]
            upstream.close()
            conn.upstream = None
            error = TimeoutError(
                errno.ETIMEDOUT, f"no connection within {self.connect_timeout:g} s"
            )
            self._connect_failed(conn, error)

    def _connect_failed(self, conn: _Connection, exc: OSError) -> None:
        self._connecting.pop(conn.number, None)
        conn.client.close()
        self._end(conn, END_ERROR, f"connect to {self.target}: {_reason(exc)}")

    def _proxy(self, conn: _Connection) -> None:
        """The connect succeeded: hand both sockets to the pool."""
        client, upstream = conn.client, conn.upstream
        assert upstream is not None
        # Left non-blocking: a pool copy parks on EAGAIN either way.
        try:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a target that is gone already shows as an error of its relay
        try:
            relay = self.pool.proxy(client, upstream, idle_timeout=self.idle_timeout)
        except RuntimeError as exc:
            # No thread to spare (an engine with a thread per relay), or the
            # pool shut down: the pool closed what it had taken; close the
            # rest, and take a pause as for any shortage.
            client.close()
            upstream.close()
            self._shortage(time.monotonic(), f"proxy: {_reason(exc)}")
            self._end(conn, END_ERROR, f"proxy: {_reason(exc)}")
            return
        conn.relay = relay
        # Runs at once, here, when the relay is done already.  A partial,
        # not a closure over the relay: the relay holds its callbacks, and
        # relay -> callback -> relay would wait for the cyclic collector
        # (conn -> relay is cut when the connection ends).
        relay.add_done_callback(functools.partial(self._relay_done, conn))

    def _relay_done(self, conn: _Connection, relay: Relay[tuple[int, int]]) -> None:
        """A proxy's done-callback: classify how it ended and log it."""
        up, down = relay.bytes_each_way
        message = None
        if relay.cancelled():
            end = END_CANCELLED
        else:
            exc = relay.exception()
            if exc is None:
                end = END_OK
            # The idle_timeout's own TimeoutError, not a TCP ETIMEDOUT.
            elif isinstance(exc, TimeoutError) and "idle_timeout" in str(exc):
                end = END_IDLE
            else:
                end = END_ERROR
                message = _reason(exc)
            del exc
        self._end(conn, end, message, up=up, down=down)

    def _end(
        self,
        conn: _Connection,
        end: str,
        message: str | None,
        *,
        up: int = 0,
        down: int = 0,
    ) -> None:
        """Count and log a connection once, and free its slot (any thread)."""
        with self._end_lock:
            if conn.ended:
                return
            conn.ended = True
        conn.relay = None
        self.totals.count(end, up, down)
        if not self.quiet or end == END_ERROR:
            duration = time.monotonic() - conn.started
            peer = conn.peer
            line = (
                f"conn={conn.number} peer={format_address(str(peer[0]), int(peer[1]))}"
                f" end={end} up={up} down={down} duration={duration:.3f}s"
            )
            if message is not None:
                line += f" error={_quote(message)}"
            self.log(line)
        # Leaves the open set only once counted and logged: the main thread
        # exits as soon as none is left, and a line still being written in a
        # worker would be lost with the process.
        self._open.pop(conn.number, None)
        # A paused listener wants every end (it may go on); stopping, only
        # the last one (the loop waits for none to be left).
        # Ended in the loop's own thread (the common case), it looks again
        # before it waits.
        if (
            self._wake_on_end
            and (self.listener is not None or not self._open)
            and threading.get_ident() != self._loop_thread
        ):
            self.wake()

    # -- shutdown ---------------------------------------------------------

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self._pause()
            self.listener.close()
            self.listener = None
        if self._next_upstream is not None:
            self._next_upstream.close()
            self._next_upstream = None

    def drain(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for the open connections to end.

        Connects in progress go on meanwhile, and are proxied if they get
        through.

        Returns:
            True if none is left; False at the deadline or at a second signal.
        """
        # Counted from the start, not from this call: a second signal that
        # came in while the first one was being logged counts too.
        deadline = time.monotonic() + grace
        self._wake_on_end = True
        while self._open:
            if time.monotonic() >= deadline or len(self.signals) >= 2:
                return False
            self._turn(deadline)
        return True

    def cancel_all(self) -> int:
        """Cancel every open connection; returns how many there were."""
        self._wake_on_end = True
        conns = list(self._open.values())
        for conn in conns:
            if conn.number in self._connecting:
                # Still connecting: only this thread touches it.
                upstream = conn.upstream
                assert upstream is not None
                self._epoll.unregister(upstream.fileno())
                del self._connecting_fds[upstream.fileno()]
                del self._connecting[conn.number]
                upstream.close()
                conn.client.close()
                self._end(conn, END_CANCELLED, None)
        # Every proxy at once: returns once they all stopped and their
        # callbacks logged them (the pool is not used again).
        self.pool.shutdown(wait=False, cancel_relays=True)
        # Only a surprise (a callback still on its way) gets here with some
        # left: wait for them, within bounds.
        deadline = time.monotonic() + _CANCEL_WAIT
        while self._open and time.monotonic() < deadline:
            self._turn(deadline)
        return len(conns)

    def close(self) -> None:
        self.stop_accepting()
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def summary(self) -> str:
        t = self.totals
        return (
            f"stopped: connections={t.connections} ok={t.ok} errors={t.errors}"
            f" idle_timeouts={t.idle_timeouts} cancelled={t.cancelled}"
            f" up={t.up} down={t.down}"
        )


# -- the command -------------------------------------------------------------------


class ListenError(Exception):
    """LISTEN cannot be used, or TARGET's host does not resolve: one line, exit status 1."""


def open_listener(address: Address) -> socket.socket:
    """Bind and listen on ``address`` (host "" means every interface).

    Raises:
        ListenError: the host does not resolve, the address is in use,
            permission denied, or not an address of this machine.
    """
    host, port = address
    try:
        if host:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
        elif socket.has_dualstack_ipv6():
            family, sockaddr = socket.AF_INET6, ("::", port)
        else:
            family, sockaddr = socket.AF_INET, ("0.0.0.0", port)
        # Not socket.create_server(): it rewraps a bind error as a plain
        # OSError with the address in its message.
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # A restart does not wait for TIME_WAIT; a port that is really
            # in use is still refused (Linux semantics of SO_REUSEADDR).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Every interface: IPv4 too; an explicit address: itself only.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(bool(host)))
            sock.bind(sockaddr)
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ListenError(f"cannot listen on {address}: {reason}") from None


def resolve_target(address: Address) -> list[tuple[int, Any]]:
    """TARGET's addresses, as ``(family, sockaddr)`` pairs in the resolver's order.

    Raises:
        ListenError: the host does not resolve.
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ListenError(f"cannot resolve {address}: {reason}") from None
    pairs: list[tuple[int, Any]] = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr) not in pairs:
            pairs.append((family, sockaddr))
    return pairs


#: Pools of forwarders that have stopped, kept until the process exits: a
#: dropped pool's finalizer wakes every idle worker to retire, one GIL
#: hand-off each, which after a burst is seconds of exit time.
_stopped_pools: list[WorkerPool] = []


def run(args: argparse.Namespace) -> int:
    """Run ``fastpipe forward`` from parsed arguments; returns the exit status."""
    err = sys.stderr
    try:
        return forward(
            args.listen,
            args.target,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            connect_timeout=args.connect_timeout,
            grace=args.grace,
            quiet=args.quiet,
            err=err,
        )
    except ListenError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return 1
    except Exception as exc:  # the promise is one line, never a traceback
        # Not expected (epoll failing, out of memory, a bug): still one line.
        err.write(f"{PROG}: error: {_reason(exc)}\n")
        return 1


def forward(
    listen: Address,
    target: Address,
    *,
    max_connections: int | None = None,
    idle_timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    quiet: bool = False,
    err: TextIO,
) -> int:
    """Forward until SIGINT/SIGTERM; returns the exit status (0).

    Must run in the main thread: it installs the signal handlers.

    Raises:
        ListenError: LISTEN cannot be used, or TARGET's host does not resolve.
    """
    from fastpipe import WorkerPool

    log = Log(err)
    addresses = resolve_target(target)
    listener = open_listener(listen)
    pool = WorkerPool(idle_worker_timeout=IDLE_WORKER_TIMEOUT)
    try:
        forwarder = Forwarder(
            listener,
            target,
            addresses,
            pool,
            log,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            connect_timeout=connect_timeout,
            quiet=quiet,
        )
    except BaseException:
        listener.close()
        raise
    handled = [signal.SIGTERM]
    # Python keeps SIGINT ignored when it starts with SIGINT ignored (a
    # background job of a non-interactive shell): Ctrl-C on that terminal
    # is not meant for us, so that choice is respected.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        handled.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, forwarder.on_signal) for signum in handled}
    # A full socket drops the byte: the loop is awake then anyway.
    previous_wakeup = signal.set_wakeup_fd(forwarder.wakeup_fd, warn_on_full_buffer=False)
    try:
        bound = listener.getsockname()
        if not quiet or listen.port == 0:
            log(f"listening on {format_address(bound[0], bound[1])}, forwarding to {target}")
        forwarder.serve()
        forwarder.stop_accepting()
        name = signal.Signals(forwarder.signals[0]).name
        left = forwarder.open_count
        if not quiet:
            log(f"{name}: stopped accepting; {left} open, grace {grace:g} s")
        if left and not forwarder.drain(grace):
            why = "grace period over" if len(forwarder.signals) < 2 else "second signal"
            count = forwarder.open_count
            if count and not quiet:
                log(f"{why}: cancelling {count} open")
            forwarder.cancel_all()
        if not quiet:
            log(forwarder.summary())
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        forwarder.close()
        _stopped_pools.append(pool)
    return 0
