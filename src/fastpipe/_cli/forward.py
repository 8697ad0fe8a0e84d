"""``fastpipe forward LISTEN TARGET``: a TCP port forwarder, one ``proxy()`` per connection.

Threads, and why:

- The main thread runs the accept loop: ``poll`` on the listener and on a
  wake-up socketpair.  Signal handlers run in the main thread, so SIGINT and
  SIGTERM only set a flag; a finished connection writes a byte to the
  wake-up socket, so that ``--max-connections`` can start accepting again.
  The kernel may deliver a signal to any thread, and one that lands on a
  pool thread leaves the main thread asleep in ``poll``:
  ``signal.set_wakeup_fd`` has the interpreter write a byte to the wake-up
  socket whichever thread it lands on, which wakes the main thread to run
  the handler.  While at the limit the listener is not polled at all:
  further clients wait in the kernel's listen backlog, which is what a user
  of a connection limit expects (a client that is accepted and then closed
  has to retry by itself; one in the backlog is simply served later).
- Each accepted client gets a short-lived thread (``fastpipe-connect-N``)
  that resolves and connects to TARGET with ``--connect-timeout``: a slow or
  unreachable target never holds up the accept loop, and a blocking connect
  with a timeout is simpler and more robust than non-blocking connects
  juggled in the poll loop.  The thread hands both sockets to
  ``WorkerPool.proxy()`` and exits.
- The copying itself runs in the forwarder's own ``WorkerPool`` (two
  workers per connection, the GIL released); each relay's done-callback
  writes the connection's log line and updates the totals.

Shutdown: the first SIGINT/SIGTERM closes the listener (clients still in
the backlog are refused), open connections get ``--grace`` seconds to end
by themselves, and the rest are cancelled (``Relay.cancel()``, which stops a
relay within milliseconds even when it is blocked).  A second signal
cancels at once.  Either way the exit status is 0: the contract says that
SIGINT/SIGTERM stop the forwarder gracefully with 0, and cancelled
connections are reported in their log lines and in the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import select
import signal
import socket
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from fastpipe._cli.args import positive_int, seconds

if TYPE_CHECKING:
    from fastpipe._pool import WorkerPool
    from fastpipe._relay import Relay

PROG = "fastpipe forward"

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_GRACE = 10.0

#: How long the accept loop stops accepting after running out of fds
#: (EMFILE/ENFILE): the pending client stays in the backlog, and polling a
#: listener that stays readable would spin.
_ACCEPT_BACKOFF = 0.1

#: After cancelling, how long to wait for the last done-callbacks (a relay's
#: cancel() returns after its callbacks ran; this only bounds a surprise).
_CANCEL_WAIT = 5.0

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
            """\
            Accept TCP connections on LISTEN and relay each one, both ways, to a new
            connection to TARGET with fastpipe.proxy (pool workers copy with the GIL
            released; end of file is passed on as a half-close).

            LISTEN and TARGET are HOST:PORT; an IPv6 address goes in brackets
            ([::1]:8080). LISTEN may use port 0 (the kernel picks one) and an empty
            HOST (:8080, every interface). The address actually listened on is
            printed on standard error at startup.

            Standard error gets one line per connection when it ends, with its
            peer, bytes each way (up: client to target, down: target to client),
            duration and how it ended: end=ok, end=idle-timeout, end=error (with
            error="...") or end=cancelled (at shutdown).

            SIGINT or SIGTERM stops accepting, lets open connections finish for up
            to --grace seconds, cancels the rest, prints a summary and exits with
            status 0. A second signal cancels the open connections at once (still
            status 0).

            Exit status: 0 stopped by a signal; 1 LISTEN unusable (in use, no
            permission, unknown host); 2 a usage error.
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
        help="give up connecting to TARGET after SECONDS (default: %(default)g)",
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
            "log only failures (end=error); the listening line is kept when LISTEN's "
            "port is 0, since nothing else tells the port"
        ),
    )
    forward.set_defaults(run=run)


# -- logging ---------------------------------------------------------------------


class Log:
    """Timestamped lines on a stream, whole lines from any thread.

    A write that fails (standard error closed, a reader gone) is dropped: the
    forwarder's job is the connections, and a done-callback must never raise.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
        line = f"{stamp} {PROG}: {message}\n"
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._stream.write(line)
            self._stream.flush()


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _reason(exc: BaseException) -> str:
    """``ConnectionRefusedError: Connection refused``, without the errno number."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- connections -----------------------------------------------------------------

_CONNECTING = "connecting"
_PROXYING = "proxying"
_DONE = "done"


@dataclass(eq=False)
class _Connection:
    """One client, from its accept to its log line.

    ``state`` and ``relay`` change under the forwarder's lock only, so that
    a cancel at shutdown and the connect thread agree on who closes what:
    a connection cancelled while it connects has its client closed by the
    canceller, and its connect thread closes the target socket when it
    finds the state changed.
    """

    number: int
    peer: str
    client: socket.socket
    started: float = field(default_factory=time.monotonic)
    state: str = _CONNECTING
    relay: Relay[tuple[int, int]] | None = None


@dataclass
class Totals:
    """What the summary line reports."""

    connections: int = 0
    ok: int = 0
    errors: int = 0
    idle_timeouts: int = 0
    cancelled: int = 0
    up: int = 0
    down: int = 0

    def count(self, end: str, up: int, down: int) -> None:
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
    """The accept loop and the bookkeeping of open connections.

    Args:
        listener: a bound, listening socket; the forwarder closes it.
        target: where each connection goes.
        pool: the pool that runs the proxies.
        log: where connection lines go.
        max_connections: at most this many connections at once, or None.
        idle_timeout: passed to ``proxy()``.
        connect_timeout: seconds for resolving plus connecting to ``target``.
        quiet: log only connections that ended in an error.
    """

    def __init__(
        self,
        listener: socket.socket,
        target: Address,
        pool: WorkerPool,
        log: Log,
        *,
        max_connections: int | None = None,
        idle_timeout: float | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        quiet: bool = False,
    ) -> None:
        self.listener: socket.socket | None = listener
        self.target = target
        self.pool = pool
        self.log = log
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.quiet = quiet
        self.totals = Totals()
        self.signals: list[int] = []  # appended to by the signal handler
        self._lock = threading.Lock()
        self._open: dict[int, _Connection] = {}
        self._numbers = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- waking the main thread -----------------------------------------

    def wake(self) -> None:
        """Make the main thread's poll return (any thread)."""
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
        with self._lock:
            return len(self._open)

    # -- the accept loop --------------------------------------------------

    def serve(self) -> None:
        """Accept and start connections until a signal arrives."""
        listener = self.listener
        assert listener is not None
        listener.setblocking(False)
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        polled = False
        paused_until = 0.0
        while not self.signals:
            now = time.monotonic()
            room = self.max_connections is None or self.open_count < self.max_connections
            want = room and now >= paused_until
            if want != polled:
                if want:
                    poller.register(listener, select.POLLIN)
                else:
                    poller.unregister(listener)
                polled = want
            timeout = None if want or not room else max(0.0, paused_until - now) * 1000
            events = poller.poll(timeout)
            self._drain_wake()
            if self.signals:
                break
            if polled and any(fd == listener.fileno() for fd, _ in events):
                if not self._accept(listener):
                    paused_until = time.monotonic() + _ACCEPT_BACKOFF

    def _accept(self, listener: socket.socket) -> bool:
        """Accept the clients waiting, up to the limit; False to back off."""
        while self.max_connections is None or self.open_count < self.max_connections:
            try:
                client, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while it waited
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the client stays in the
                # backlog and is accepted when there is room again.
                self.log(f"accept failed: {_reason(exc)}; retrying")
                return False
            self._start(client, peer)
        return True

    def _start(self, client: socket.socket, peer: Any) -> None:
        with self._lock:
            self._numbers += 1
            conn = _Connection(self._numbers, format_address(str(peer[0]), int(peer[1])), client)
            self._open[conn.number] = conn
        threading.Thread(
            target=self._connect,
            args=(conn,),
            name=f"fastpipe-connect-{conn.number}",
            daemon=True,  # a connect to a silent target must not delay exit
        ).start()

    def _open_target(self) -> socket.socket:
        """Resolve and connect to the target within ``connect_timeout``.

        Raises:
            OSError: no address worked (the last error), or the timeout.
        """
        deadline = time.monotonic() + self.connect_timeout
        host, port = self.target
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.settimeout(None)
            return sock
        if error is None or isinstance(error, TimeoutError):
            raise TimeoutError(errno.ETIMEDOUT, f"no connection within {self.connect_timeout:g} s")
        raise error

    def _connect(self, conn: _Connection) -> None:
        """A connect thread: connect to the target, then hand both sockets to a proxy."""
        try:
            upstream = self._open_target()
        except OSError as exc:
            self._end(conn, END_ERROR, f"connect to {self.target}: {_reason(exc)}", close=True)
            return
        client = conn.client
        try:
            for sock in (client, upstream):
                sock.setblocking(True)
                # Small request/response exchanges must not wait for Nagle.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a client that is gone already shows as an error of its relay
        with self._lock:
            if conn.state != _CONNECTING:
                upstream.close()  # cancelled at shutdown: the client is closed
                return
            try:
                relay = self.pool.proxy(client, upstream, idle_timeout=self.idle_timeout)
            except RuntimeError:  # the pool is shut down: we are exiting
                upstream.close()
                relay = None
            else:
                conn.state = _PROXYING
                conn.relay = relay
        if relay is None:
            self._end(conn, END_CANCELLED, None, close=True)
            return
        # Outside the lock: the callback takes it, and runs at once when
        # the relay is already done.
        relay.add_done_callback(lambda _: self._relay_done(conn, relay))

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
        close: bool = False,
    ) -> None:
        """Count and log a connection once, and free its slot."""
        with self._lock:
            if conn.state == _DONE:
                return
            conn.state = _DONE
            del self._open[conn.number]
            self.totals.count(end, up, down)
        if close:
            conn.client.close()
        if not self.quiet or end == END_ERROR:
            duration = time.monotonic() - conn.started
            line = (
                f"conn={conn.number} peer={conn.peer} end={end} up={up} down={down}"
                f" duration={duration:.3f}s"
            )
            if message is not None:
                line += f" error={_quote(message)}"
            self.log(line)
        self.wake()

    # -- shutdown ---------------------------------------------------------

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def drain(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for the open connections to end.

        Returns:
            True if none is left; False at the deadline or at a second signal.
        """
        # Counted from the start, not from this call: a second signal that
        # came in while the first one was being logged counts too.
        deadline = time.monotonic() + grace
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while self.open_count:
            left = deadline - time.monotonic()
            if left <= 0 or len(self.signals) >= 2:
                return False
            poller.poll(left * 1000)
            self._drain_wake()
        return True

    def cancel_all(self) -> int:
        """Cancel every open connection; returns how many there were."""
        with self._lock:
            conns = list(self._open.values())
        for conn in conns:
            with self._lock:
                relay = conn.relay if conn.state == _PROXYING else None
                connecting = conn.state == _CONNECTING
            if relay is not None:
                # Returns once the copy stopped and the callback logged it.
                relay.cancel()
            elif connecting:
                self._end(conn, END_CANCELLED, None, close=True)
        deadline = time.monotonic() + _CANCEL_WAIT
        while self.open_count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(conns)

    def close(self) -> None:
        self.stop_accepting()
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
    """LISTEN cannot be used: one line, exit status 1."""


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
        # Not expected (poll failing, out of memory, a bug): still one line.
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
        ListenError: LISTEN cannot be used.
    """
    from fastpipe import WorkerPool

    log = Log(err)
    listener = open_listener(listen)
    pool = WorkerPool()
    forwarder = Forwarder(
        listener,
        target,
        pool,
        log,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        connect_timeout=connect_timeout,
        quiet=quiet,
    )
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
        pool.shutdown(wait=False, cancel_relays=True)
    return 0
