"""The copy loop needs no GIL, and signals still reach a copy in the main thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import fastpipe

from conftest import compiled_only, wait_for, wait_until_blocked

# The contract: a signal handler, or KeyboardInterrupt, reaches a copy_fd in
# the main thread within about 100 ms, even while it is blocked.  That is a
# latency, which a busy machine stretches (bench/test_bench_latency.py
# measures it); what a test can check on any machine is that it arrives at
# all, where a copy blocked in the kernel would otherwise wait for ever.
ARRIVES_WITHIN = 10.0


def spin_until(predicate, seconds: float) -> bool:
    """Run pure Python (holding the GIL) until predicate() or time runs out."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        if n % 1000 == 0 and predicate():
            return True
    return predicate()


@compiled_only
def test_relay_makes_progress_while_the_main_thread_never_releases_the_gil() -> None:
    size = 256 * 1024 * 1024
    producer = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.stdout.buffer.write(bytes({size}))"],
        stdout=subprocess.PIPE,
    )
    devnull = os.open(os.devnull, os.O_WRONLY)
    old = sys.getswitchinterval()
    try:
        relay = fastpipe.relay(producer.stdout, devnull)
        # Let the worker pick the job up (hand-off needs the GIL once).
        deadline = time.monotonic() + 20
        while relay.bytes_copied == 0:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # With a 30 s switch interval this thread keeps the GIL for the whole
        # spin: only a loop that never asks for the GIL can finish meanwhile.
        sys.setswitchinterval(30)
        finished = spin_until(lambda: relay.bytes_copied == size, 20)
    finally:
        sys.setswitchinterval(old)
    assert finished, f"copied {relay.bytes_copied} of {size} while the main thread held the GIL"
    assert relay.result(timeout=20) == size
    producer.wait(10)


def test_main_thread_keeps_running_while_copy_fd_blocks() -> None:
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(fastpipe.copy_fd(r, devnull)))
    t.start()
    try:
        wait_until_blocked(t)  # in poll on the idle pipe
        # The blocked copy holds no GIL: this loop runs at full speed, which
        # we see as many switch intervals' worth of iterations done (ten
        # thousand in 0.3 s is a few per cent of one core's speed).
        n = 0
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            n += 1
        assert t.is_alive()
        assert n > 10_000
    finally:
        os.write(w, b"done")
        os.close(w)
        t.join(10)
    assert result == [4]
    os.close(r)
    os.close(devnull)


class Interrupted(Exception):
    pass


def test_signal_handler_interrupts_copy_fd_blocked_in_main_thread() -> None:
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.monotonic()
        with pytest.raises(Interrupted):
            fastpipe.copy_fd(r, devnull)
        assert time.monotonic() - start < ARRIVES_WITHIN
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for fd in (r, w, devnull):
            os.close(fd)


def test_signal_handler_that_returns_lets_the_copy_go_on() -> None:
    """PEP 475: the handler runs, the copy retries and finishes intact.

    The feeder waits for handler calls, not for time: three while the copy
    waits for its first byte, and more between the two writes."""
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    calls: list[int] = []
    data = os.urandom(200_000)
    got = bytearray()
    reader = threading.Thread(
        target=lambda: [got.extend(c) for c in iter(lambda: os.read(out_r, 65536), b"")]
    )
    reader.start()

    def feed() -> None:
        wait_for(lambda: len(calls) >= 3)
        os.write(w, data[:1000])
        seen = len(calls)
        wait_for(lambda: len(calls) > seen)
        os.write(w, data[1000:])
        os.close(w)

    feeder = threading.Thread(target=feed)
    old = signal.signal(signal.SIGALRM, lambda s, f: calls.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        feeder.start()
        assert fastpipe.copy_fd(r, out_w) == len(data)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        feeder.join()
    os.close(out_w)
    reader.join(10)
    os.close(r)
    os.close(out_r)
    assert len(calls) >= 3
    assert bytes(got) == data


@pytest.mark.usefixtures("sigint_raises")
def test_keyboard_interrupt_reaches_copy_fd_in_main_thread() -> None:
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            fastpipe.copy_fd(r, devnull)
        assert time.monotonic() - start < ARRIVES_WITHIN
    finally:
        timer.cancel()
        for fd in (r, w, devnull):
            os.close(fd)


def test_idle_timeout_fails_with_timeout_error() -> None:
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    # The bytes are there before the relay starts: a timeout that fired
    # before this thread wrote them would copy none.  The clock starts
    # before the relay, so the timeout cannot fire sooner than 0.2 s from
    # here, however this thread is scheduled.
    os.write(w, b"abc")
    start = time.monotonic()
    relay = fastpipe.relay(r, devnull, idle_timeout=0.2)
    exc = relay.exception(timeout=30)
    assert isinstance(exc, TimeoutError)
    # Not early (the core rounds the deadline to whole milliseconds), and
    # not for ever: the upper bound only says it fired.
    assert 0.19 < time.monotonic() - start < 30
    assert relay.bytes_copied == 3
    os.close(w)


def _bytes_every_tenth_of_a_second(idle_timeout: float) -> tuple[fastpipe.Relay[int], float]:
    """15 bytes, one every 0.1 s, through a relay with ``idle_timeout``;
    returns it, ended, and the widest gap this thread left between writes
    (from the relay's start)."""
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    relay = fastpipe.relay(r, devnull, idle_timeout=idle_timeout)
    last = time.monotonic()
    widest = 0.0
    try:
        for _ in range(15):
            time.sleep(0.1)  # the gap between bytes, which is what is tested
            os.write(w, b"x")
            now = time.monotonic()
            widest, last = max(widest, now - last), now
    except BrokenPipeError:  # ended early: a fair run has it judged below
        widest = max(widest, time.monotonic() - last)
    finally:
        os.close(w)
    relay.exception(timeout=30)
    return relay, widest


def test_idle_timeout_is_reset_by_each_byte() -> None:
    """A byte every 0.1 s for 1.5 s keeps a 1 s idle_timeout off; a timeout
    that counted from the start would fire at 1 s.

    Only a run in which this thread never left half the timeout between two
    writes judges the relay: a machine that stalls the writer for 1 s would
    make even a correct timeout fire.  Such a run is tried again.
    """
    for _ in range(5):
        relay, widest = _bytes_every_tenth_of_a_second(1.0)
        if widest < 0.5:
            break
    else:
        pytest.fail("in 5 runs, this thread was held up for 0.5 s or more in each")
    assert relay.result(timeout=0) == 15
