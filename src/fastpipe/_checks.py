"""The Python side's argument checks, each written once.

The pure-Python twin's ``CopyJob`` and ``PoolCore``, ``relay()`` and
``proxy()`` all check an fd, a ``count`` and an ``idle_timeout`` here.  The
compiled core has its own checks in C, for callers of ``copy_fd`` and
``CopyJob`` that never pass through Python code; they raise the same
exceptions with the same messages (``tests/test_errors.py`` compares the
two).  Each raises ``TypeError`` or ``ValueError`` at once, in the caller's
thread.
"""

from __future__ import annotations

# The largest fd a C int holds; a bigger number is no fd on any system.
MAX_FD = 0x7FFFFFFF
# The largest count the compiled core's signed 64-bit counter holds.
MAX_COUNT = 0x7FFFFFFFFFFFFFFF
# An idle_timeout above this (about 30 years) means "never".  inf or 1e300
# would overflow poll()'s milliseconds, the clock's arithmetic, and
# Condition.wait() in a proxy's watchdog.
NEVER = 1e9


def check_fd(fd: object, name: str) -> int:
    """Return ``fd`` if it is an int in the range of a file descriptor."""
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{name} must be an int file descriptor, not {type(fd).__name__}")
    if fd < 0:
        raise ValueError(f"{name} must be a non-negative file descriptor, got {fd}")
    if fd > MAX_FD:
        raise ValueError(f"{name} is out of range: {fd}")
    return fd


def check_count(count: object) -> int:
    """Return ``count`` as an int, or -1 for None ("to end of file")."""
    if count is None:
        return -1
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int or None, not {type(count).__name__}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    if count > MAX_COUNT:
        # Said at once rather than wrapped into a short (or negative) copy.
        raise ValueError(f"count is out of range (at most 2**63-1): {count}")
    return count


def check_idle_timeout(seconds: object) -> float | None:
    """Return ``seconds`` as a float, or None for "never" (None, or above
    ``NEVER``)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"idle_timeout must be a number or None, not {type(seconds).__name__}")
    if not seconds > 0:
        raise ValueError(f"idle_timeout must be greater than 0, got {seconds}")
    if seconds > NEVER:
        return None
    return float(seconds)
