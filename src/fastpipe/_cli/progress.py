"""The progress display of ``fastpipe cp``: tqdm when installed, else one plain line.

tqdm comes with the optional ``cli`` extra (``pip install '.[cli]'`` from a checkout);
the library itself imports nothing outside the standard library, so tqdm is
imported here, only when a display is made.  The fallback is deliberately
small: one line rewritten in place with ``\\r``.

Both count in SI units (1 MB = 10**6 bytes), because that is what tqdm's
``unit_scale`` prints and two conventions in one tool would mislead.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    """What ``fastpipe cp`` needs from a display."""

    def update(self, done: int) -> None:
        """Show that ``done`` bytes (a running total) have been copied."""

    def close(self) -> None:
        """Leave the last state on screen and move to a new line."""


def make_progress(total: int | None, stream: TextIO) -> Progress:
    """A display on ``stream``: tqdm's bar if tqdm is installed, else a plain line.

    Args:
        total: the bytes expected, when known (a regular file source); the
            display shows a percentage and an ETA only then.
        stream: a terminal (the caller checks ``isatty()``).
    """
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgress(total, stream)
    return _TqdmProgress(tqdm, total, stream)


_BAR_WITH_TOTAL = (
    "{percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"
)


class _TqdmProgress:
    def __init__(self, tqdm: Callable[..., Any], total: int | None, stream: TextIO) -> None:
        # tqdm's own smoothing gives the rate and ETA; the "B" after n/total
        # is ours, since unit_scale prints "12.3M/27.3M" without a unit.
        bar_format = None
        if total is not None:
            bar_format = _BAR_WITH_TOTAL
        self._bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            file=stream,
            dynamic_ncols=True,
            leave=True,
            bar_format=bar_format,
        )

    def update(self, done: int) -> None:
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


class PlainProgress:
    """``12.3 MB / 27.3 MB  45%  10.2 MB/s  ETA 0:01``, rewritten in place.

    The rate is taken over the last few seconds rather than since the start,
    so that it drops when a slow source stalls and the ETA follows.
    """

    WINDOW = 3.0

    def __init__(
        self, total: int | None, stream: TextIO, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._total = total
        self._stream = stream
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque([(clock(), 0)])
        self._shown = False

    def update(self, done: int) -> None:
        now = self._clock()
        samples = self._samples
        samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > self.WINDOW:
            samples.popleft()
        then, before = samples[0]
        rate = (done - before) / (now - then) if now > then else 0.0
        self._stream.write("\r" + self.line(done, rate) + "\x1b[K")
        self._stream.flush()
        self._shown = True

    def line(self, done: int, rate: float) -> str:
        """The text shown for ``done`` bytes at ``rate`` bytes per second."""
        total = self._total
        parts = [format_bytes(done)]
        if total is not None:
            parts[0] += f" / {format_bytes(total)}"
            parts.append(f"{100 * done // total if total else 100}%")
        parts.append(f"{format_bytes(rate)}/s")
        if total is not None and done < total:
            parts.append(f"ETA {_clock_time((total - done) / rate)}" if rate > 0 else "ETA -")
        return "  ".join(parts)

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()


def format_bytes(n: float) -> str:
    """``999 B``, ``1.2 kB``, ``12.3 MB``: SI units, three significant figures or so."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.95 or unit == "TB":
            break
    return f"{n:.1f} {unit}"


def _clock_time(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
