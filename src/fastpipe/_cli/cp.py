"""``fastpipe cp SRC DST``: copy a file, a pipe or standard input with ``fastpipe.relay``.

The copy runs in a pool worker with the GIL released; the main thread only
waits in ``Relay.result(timeout)`` and, on a terminal, redraws the progress
display from ``Relay.bytes_copied`` between waits.

Choices, also stated in ``--help``:

- The source is opened first, the destination only once that succeeded, so a
  missing or unreadable source never truncates the destination.
- ``DST`` naming an existing directory means ``DST/basename(SRC)``, as with cp.
- Nothing but the bytes is copied.  A new file gets the source's permission
  bits, less the umask (what cp does without ``-p``); owner, times and
  extended attributes are not copied.
- When the copy fails or is interrupted, a regular destination file that this
  run created or truncated is removed (as rsync does without ``--partial``):
  a partial copy looks like a whole one.  ``--keep-partial`` keeps it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import sys
import textwrap
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from fastpipe._cli.progress import Progress
    from fastpipe._relay import Relay

#: How often the progress display is redrawn, in seconds.
POLL_INTERVAL = 0.1

#: Errors that can only come from writing: they are reported against DST.
_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE, errno.EROFS, errno.ECONNRESET}
)

#: The exit status of a process killed by SIGPIPE, which is how ``cat`` ends
#: when the reader of its standard output goes away (``... | head``).
_EXIT_SIGPIPE = 128 + 13


class CpError(Exception):
    """A failure to report as one line: ``fastpipe cp: error: <message>``."""


def add_parser(commands: Any, summary: str) -> None:
    """Add the ``cp`` subcommand to ``commands`` (an argparse subparsers action),
    with ``summary`` as its line in ``fastpipe --help``."""
    cp = commands.add_parser(
        "cp",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Copy SRC to DST with fastpipe.relay: a pool worker copies with the GIL released.

            SRC and DST may be regular files, named pipes or devices, and '-' stands for
            standard input or output. If DST is an existing directory, the copy goes to
            DST/<basename of SRC>. SRC is opened before DST is created or truncated.

            Only the bytes are copied. A new file gets SRC's permission bits less the
            umask (as cp does without -p); owner, times and extended attributes are not
            copied.

            On a terminal, standard error shows the bytes copied and the rate, plus the
            percentage and an ETA when SRC is a regular file (a tqdm bar when tqdm, the
            'cli' extra, is installed). Nothing is shown when standard error is not a
            terminal, when DST is '-' and standard output is a terminal, or with -q.

            If the copy fails or is interrupted, a regular DST file that this run created
            or truncated is removed, since a partial copy looks like a whole one;
            --keep-partial keeps it.

            Exit status: 0 copied; 1 an error (one line on standard error); 2 a usage
            error; 130 interrupted (Ctrl-C); 143 and 129 stopped by SIGTERM and SIGHUP,
            which count as interruptions; 141 the reader of standard output went away.
            """
        ),
    )
    cp.add_argument("src", metavar="SRC", help="the file to copy, or '-' for standard input")
    cp.add_argument(
        "dst",
        metavar="DST",
        help="the file or directory to copy into, or '-' for standard output",
    )
    cp.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress display, even on a terminal",
    )
    cp.add_argument(
        "--keep-partial",
        action="store_true",
        help="keep what was copied when the copy fails or is interrupted",
    )
    cp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fastpipe cp`` from parsed arguments; returns the exit status.

    Raises:
        KeyboardInterrupt: on Ctrl-C, after removing the partial destination;
            the caller turns it into exit status 130.
        Stopped: the same for SIGTERM and SIGHUP (``_cli.args``).
    """
    err = sys.stderr
    try:
        return copy(args.src, args.dst, quiet=args.quiet, keep_partial=args.keep_partial, err=err)
    except CpError as exc:
        err.write(f"fastpipe cp: error: {exc}\n")
        return 1


def copy(src: str, dst: str, *, quiet: bool, keep_partial: bool, err: TextIO) -> int:
    """Copy ``src`` to ``dst`` (either may be ``-``); returns the exit status.

    Raises:
        CpError: a file could not be opened, or the copy failed.
        KeyboardInterrupt: Ctrl-C; the partial destination is gone already.
    """
    import fastpipe

    src_fd, src_st = _open_source(src)
    dst_fd = -1
    partial: tuple[str, int, int] | None = None
    try:
        dst_path = _destination_path(src, dst)
        _refuse_same_file(src, src_st, dst_path)
        dst_fd, partial = _open_destination(dst_path, src_st)
        total = _bytes_left(src_fd, src_st)
        relay = fastpipe.relay(src_fd, dst_fd)
    except BaseException:
        _close(src_fd)
        _close(dst_fd)
        # Interrupted before the relay started: DST may be created or
        # truncated already.
        _forget(partial, keep_partial)
        raise
    # From here on the relay owns both fds and closes them when it ends.
    try:
        display = None
        if not quiet and err.isatty() and not (dst == "-" and _is_terminal(1)):
            from fastpipe._cli.progress import make_progress

            display = make_progress(total, err)
        _wait(relay, display)
    except OSError as exc:
        _forget(partial, keep_partial)
        if exc.errno == errno.EPIPE and dst == "-":
            return _EXIT_SIGPIPE
        where = dst_path if exc.errno in _WRITE_ERRNOS else f"{src} -> {dst_path}"
        raise CpError(f"{_show(where)}: {_reason(exc)}") from None
    except BaseException:
        # Ctrl-C: the worker may still be writing (a running relay cannot be
        # cancelled), which is harmless: unlinking a file that is open
        # for writing is allowed, and the process exits right after.
        _forget(partial, keep_partial)
        raise
    return 0


def _wait(relay: Relay[int], display: Progress | None) -> int:
    """Wait for ``relay``, redrawing ``display`` (if any) every ``POLL_INTERVAL``."""
    if display is None:
        return int(relay.result())
    try:
        while True:
            try:
                copied = int(relay.result(timeout=POLL_INTERVAL))
            except TimeoutError:
                if relay.done():
                    raise  # the relay's own TimeoutError, not the wait's
                display.update(relay.bytes_copied)
            else:
                display.update(copied)
                return copied
    finally:
        display.close()


def _open_source(src: str) -> tuple[int, os.stat_result]:
    """Open SRC (``-``: a duplicate of stdin) and refuse a directory."""
    try:
        # A named pipe blocks here until a writer opens it, as with cp;
        # Ctrl-C still works (PEP 475 runs the handler).
        fd = os.dup(0) if src == "-" else os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CpError(f"{_show(src)}: {_reason(exc)}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        _close(fd)
        raise CpError(f"{_show(src)}: {_reason(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        _close(fd)
        raise CpError(f"{_show(src)}: {os.strerror(errno.EISDIR)}")
    return fd, st


def _destination_path(src: str, dst: str) -> str:
    """DST, or DST/basename(SRC) when DST is an existing directory."""
    if dst == "-":
        return dst
    if os.path.isdir(dst):
        if src == "-":
            raise CpError(f"{_show(dst)}: {os.strerror(errno.EISDIR)} (name the file to create)")
        return os.path.join(dst, os.path.basename(src))
    if dst.endswith("/"):
        # open() would say "Is a directory" about a path that is none.
        raise CpError(f"{_show(dst)}: {os.strerror(errno.ENOTDIR)}")
    return dst


def _refuse_same_file(src: str, src_st: os.stat_result, dst_path: str) -> None:
    """Truncating the destination would destroy the source (also via a hard link)."""
    if not stat.S_ISREG(src_st.st_mode):
        return
    try:
        dst_st = os.fstat(1) if dst_path == "-" else os.stat(dst_path)
    except OSError:
        return  # no such file yet; any other problem shows when it is opened
    if (dst_st.st_dev, dst_st.st_ino) == (src_st.st_dev, src_st.st_ino):
        raise CpError(f"{_show(src)} and {_show(dst_path)} are the same file")


def _open_destination(
    dst_path: str, src_st: os.stat_result
) -> tuple[int, tuple[str, int, int] | None]:
    """Open DST for writing (``-``: a duplicate of stdout).

    Returns:
        The fd, and for a regular file this run may leave half-written, its
        path, st_dev and st_ino (so that only that very file is removed).
    """
    if dst_path == "-":
        try:
            return os.dup(1), None
        except OSError as exc:
            raise CpError(f"-: {_reason(exc)}") from None
    mode = stat.S_IMODE(src_st.st_mode) & 0o777 if stat.S_ISREG(src_st.st_mode) else 0o666
    try:
        # O_TRUNC rather than a temporary file and a rename: like cp, the
        # destination keeps its inode, owner, mode and hard links, and a
        # named pipe or device works as a destination.  A FIFO blocks here
        # until a reader opens it.
        fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise CpError(f"{_show(dst_path)}: {_reason(exc)}") from None
    st = os.fstat(fd)
    partial = (dst_path, st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None
    return fd, partial


def _bytes_left(fd: int, st: os.stat_result) -> int | None:
    """The bytes the copy will move, when known: a regular file, from its offset on."""
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        # Not 0 for `fastpipe cp - out < file` when the shell has read some.
        offset = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return None
    return max(0, st.st_size - offset)


def _forget(partial: tuple[str, int, int] | None, keep_partial: bool) -> None:
    """Remove the partial destination, if it is still the file this run wrote."""
    if partial is None or keep_partial:
        return
    path, dev, ino = partial
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _show(path: str) -> str:
    """A path as printed: quoted only when it would break the one-line message."""
    return path if path.isprintable() else repr(path)
