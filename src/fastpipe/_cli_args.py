"""Argument types shared by the ``fastpipe`` subcommands.

A module of its own because ``__main__`` cannot be imported by the
subcommand modules: under ``python -m fastpipe`` that would load it a second
time as ``fastpipe.__main__``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
