"""Argument types and signal handling shared by the ``fastpipe`` subcommands.

``main`` imports each subcommand's module only when it runs; what they share
lives here, so that no subcommand has to import ``main`` or another
subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
from collections.abc import Callable, Iterator


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_multiple_of(step: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = positive_int(text)
        if value % step:
            raise argparse.ArgumentTypeError(f"must be a multiple of {step}, got {value}")
        return value

    return parse


def seconds(*, zero_ok: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            least = "at least 0" if zero_ok else "greater than 0"
            raise argparse.ArgumentTypeError(f"must be {least}, got {text!r}")
        return value

    return parse


#: Signals that stop a subcommand as Ctrl-C does, with the same clean-up (a
#: partial ``cp`` destination removed, the bench's scratch files and
#: endpoint processes gone): ``timeout``, ``kill`` and service managers send
#: SIGTERM, and a closed terminal SIGHUP.  One that the process started with
#: ignored (``nohup``) stays ignored.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread as KeyboardInterrupt is
    for SIGINT; a BaseException, so that no ``except Exception`` on the way
    swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Turn STOP_SIGNALS into ``Stopped`` while the block runs."""
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_stopped)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
