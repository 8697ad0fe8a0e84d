"""WorkerPool: persistent workers, growth to the peak, reuse, queueing, shutdown."""

from __future__ import annotations

import contextlib
import gc
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import fastpipe
from fastpipe import WorkerPool

from conftest import HeldWriter, exit_code_in_child, held_relay, wait_for


def idle_relay(pool: WorkerPool) -> tuple[fastpipe.Relay, int]:
    """A relay parked on an idle pipe; write to and close the fd to finish it."""
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    return pool.relay(r, devnull), w


def worker_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("fastpipe-worker-")}


def finish(writers: list[int], payload: bytes = b"x" * 1000) -> None:
    for w in writers:
        os.write(w, payload)
        os.close(w)


def test_stats_has_the_contract_keys() -> None:
    with WorkerPool() as pool:
        assert set(pool.stats()) == {"workers", "idle", "busy", "queued", "peak", "parked"}
        assert pool.stats() == {
            "workers": 0,
            "idle": 0,
            "busy": 0,
            "queued": 0,
            "peak": 0,
            "parked": 0,
        }


def test_sequential_relays_start_no_new_threads() -> None:
    with WorkerPool() as pool:
        relay, w = idle_relay(pool)
        finish([w])
        relay.result(timeout=10)
        threads = worker_threads()
        for _ in range(50):
            relay, w = idle_relay(pool)
            finish([w])
            assert relay.result(timeout=10) == 1000
        assert worker_threads() == threads
        assert pool.stats()["workers"] == 1
        assert pool.stats()["peak"] == 1


@contextlib.contextmanager
def held_wave(pool: WorkerPool, n: int) -> Iterator[list[HeldWriter]]:
    """n relays, each holding its worker in a flush until the block ends;
    then released whatever happens (shutdown() would wait for them), and
    checked to end with 0."""
    wave = [held_relay(pool) for _ in range(n)]
    try:
        yield [held for _, held in wave]
    finally:
        for _, held in wave:
            held.release()
    assert [r.result(timeout=30) for r, _ in wave] == [0] * n


@pytest.mark.parametrize("n", [1, 5, 16])
def test_n_running_relays_grow_to_n_workers_and_are_reused(n: int) -> None:
    with WorkerPool() as pool:
        before = worker_threads()
        with held_wave(pool, n):
            wait_for(lambda: pool.stats()["busy"] == n)
            assert pool.stats() == {
                "workers": n,
                "idle": 0,
                "busy": n,
                "queued": 0,
                "peak": n,
                "parked": 0,
            }
            first = worker_threads() - before
            assert len(first) == n
        wait_for(lambda: pool.stats()["idle"] == n)

        with held_wave(pool, n):
            wait_for(lambda: pool.stats()["busy"] == n)
            assert pool.stats()["workers"] == n
            assert worker_threads() - before == first  # the same threads again
        assert pool.stats()["peak"] == n


def test_threads_slow_to_start_are_not_asked_for_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a busy machine a new thread may take a while to run.  Workers that
    block meanwhile (each relay here holds its worker in a flush) see the
    copies still queued, but the threads asked for already will take them:
    the pool still ends with one worker per running relay, and none idle."""
    n = 12
    with WorkerPool() as pool:
        start_thread = pool._start_thread

        def slow_start(target, args, kind):  # type: ignore[no-untyped-def]
            def late(*a):  # type: ignore[no-untyped-def]
                time.sleep(0.3)  # a machine slow to run a new thread
                return target(*a)

            return start_thread(late, args, kind)

        monkeypatch.setattr(pool, "_start_thread", slow_start)
        with held_wave(pool, n) as held:
            wait_for(lambda: all(h.flushing.is_set() for h in held), timeout=60)
            stats = pool.stats()
        assert (stats["workers"], stats["busy"], stats["idle"]) == (n, n, 0), stats


@pytest.mark.parametrize("n", [1, 16, 200])
def test_n_parked_relays_hold_no_worker(n: int) -> None:
    """Relays waiting on idle pipes are parked: one worker polls for all of
    them, and each resumes in a worker when its bytes come."""
    with WorkerPool() as pool:
        wave = [idle_relay(pool) for _ in range(n)]
        try:
            # Every worker comes back idle (one that has just parked a copy
            # is neither busy nor idle for a moment): the threads are the
            # few that ran the relays' first steps, however many relays.
            wait_for(
                lambda: (
                    pool.stats()["parked"] == n and pool.stats()["idle"] == pool.stats()["workers"]
                )
            )
            stats = pool.stats()
            assert stats["busy"] == 0 and stats["queued"] == 0, stats
            assert 1 <= stats["workers"] <= min(n, 16), stats
            assert all(r.running() for r, _ in wave)
        finally:
            finish([w for _, w in wave])
        assert [r.result(timeout=10) for r, _ in wave] == [1000] * n
        assert pool.stats()["parked"] == 0


def test_worker_threads_are_named_daemons() -> None:
    with WorkerPool() as pool:
        before = worker_threads()
        relay, w = idle_relay(pool)
        try:
            wait_for(lambda: pool.stats()["workers"] == 1)
            (thread,) = worker_threads() - before
            assert thread.daemon
        finally:
            finish([w])
        relay.result(timeout=10)


def test_max_workers_queues_in_order() -> None:
    out_r, out_w = os.pipe()
    with WorkerPool(max_workers=1) as pool:
        holder, held = held_relay(pool)
        wait_for(held.flushing.is_set)
        relays = []
        for i in range(4):
            r, w = os.pipe()
            os.write(w, bytes([i]) * 1000)
            os.close(w)
            # Each into its own dup of one pipe: the order of the bytes there
            # is the order in which the one worker ran them.
            relays.append(pool.relay(r, os.dup(out_w)))
        assert pool.stats()["queued"] == 4
        assert pool.stats()["workers"] == 1
        held.release()
        assert holder.result(timeout=10) == 0
        assert [r.result(timeout=10) for r in relays] == [1000] * 4
        assert pool.stats()["peak"] == 1
    os.close(out_w)
    assert os.read(out_r, 8000) == b"".join(bytes([i]) * 1000 for i in range(4))
    os.close(out_r)


def test_copies_take_turns_at_the_thread_bound() -> None:
    """A copy that never waits (``/dev/zero`` into ``/dev/null``) gives the
    one worker up at each slice to a copy queued behind it, and goes on."""
    zero = os.open("/dev/zero", os.O_RDONLY)
    null = os.open(os.devnull, os.O_WRONLY)
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(w, b"its turn")
    os.close(w)
    with WorkerPool(max_workers=1) as pool:
        endless = pool.relay(zero, null)
        try:
            wait_for(lambda: endless.bytes_copied > 0)
            queued = pool.relay(r, out_w)
            assert queued.result(timeout=60) == 8
            assert os.read(out_r, 100) == b"its turn"
            assert not endless.done()
            moved = endless.bytes_copied
            wait_for(lambda: endless.bytes_copied > moved)  # still running
        finally:
            assert endless.cancel()
        assert pool.stats()["peak"] == 1
    os.close(out_r)


def test_a_burst_of_ready_relays_gets_a_few_threads_not_one_each() -> None:
    """Copies that are only ready to run share a few threads (two per CPU,
    at least four): more would only take turns on the same cores."""
    cap = max(4, 2 * len(os.sched_getaffinity(0)))
    n = 8 * cap
    pipes = []
    with WorkerPool() as pool:
        relays = []
        for i in range(n):
            r, w = os.pipe()
            out_r, out_w = os.pipe()
            os.write(w, bytes([i]) * 1000)
            os.close(w)
            pipes.append(out_r)
            relays.append(pool.relay(r, out_w))
        assert [relay.result(timeout=60) for relay in relays] == [1000] * n
        assert pool.stats()["workers"] <= cap, pool.stats()
    for i, out_r in enumerate(pipes):
        assert os.read(out_r, 2000) == bytes([i]) * 1000
        os.close(out_r)


def test_max_workers_bounds_threads_not_relays() -> None:
    """With one worker, a hundred relays all start, park, and each runs when
    its bytes come, in any order."""
    with WorkerPool(max_workers=1) as pool:
        wave = [idle_relay(pool) for _ in range(100)]
        wait_for(lambda: pool.stats()["parked"] == 100)
        assert pool.stats()["workers"] == 1
        for i in reversed(range(100)):
            finish([wave[i][1]], payload=b"y" * i)
            assert wave[i][0].result(timeout=10) == i
        assert pool.stats()["peak"] == 1


def _is_gone(fd: int, was: os.stat_result) -> bool:
    """Whether ``fd`` no longer names the file it named (``was``): closed, or
    closed and its number already reused by another thread's new fd."""
    try:
        now = os.fstat(fd)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino)


@pytest.mark.parametrize("how", ["cancel", "shutdown"])
def test_queued_relay_can_be_cancelled_and_its_ends_are_closed(how: str) -> None:
    """Closed before the future completes (docs/design.md, close=True), as for a
    relay that ran: a done-callback already finds both ends closed."""
    pool = WorkerPool(max_workers=1)
    _, held = held_relay(pool)
    wait_for(held.flushing.is_set)
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        pipe = os.fstat(r)
        queued = pool.relay(r, a)
        seen: list[tuple[bool, int]] = []
        queued.add_done_callback(lambda _f: seen.append((_is_gone(r, pipe), a.fileno())))
        wait_for(lambda: pool.stats()["queued"] == 1)
        if how == "cancel":
            assert queued.cancel()
        else:
            # The holder's flush is Python code, which no cancel interrupts:
            # it is let go while shutdown waits for its worker.
            threading.Timer(0.1, held.release).start()
            pool.shutdown(wait=True, cancel_relays=True)
        assert queued.cancelled()
        wait_for(lambda: bool(seen))
        assert seen == [(True, -1)], "a done-callback saw an end still open"
    finally:
        held.release()
        pool.shutdown(cancel_relays=True)  # the queued relay closes r and a
        with contextlib.suppress(OSError):
            os.close(w)
        b.close()


def test_idle_worker_timeout_lets_workers_exit() -> None:
    with WorkerPool(idle_worker_timeout=0.2) as pool:
        wave = [held_relay(pool) for _ in range(3)]
        wait_for(lambda: pool.stats()["workers"] == 3)
        for r, held in wave:
            held.release()
            r.result(timeout=10)
        wait_for(lambda: pool.stats()["workers"] == 0)
        assert pool.stats()["idle"] == 0
        # And the pool still works afterwards.
        relay, w = idle_relay(pool)
        finish([w])
        assert relay.result(timeout=10) == 1000


def test_shutdown_is_idempotent_and_refuses_new_relays() -> None:
    pool = WorkerPool()
    relay, w = idle_relay(pool)
    finish([w])
    relay.result(timeout=10)
    # This pool's threads only: the default pool's workers never exit.
    threads = {t for t in pool._threads if t.name.startswith("fastpipe-worker-")}
    assert threads
    pool.shutdown()
    pool.shutdown()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert pool.stats()["workers"] == 0
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        with pytest.raises(RuntimeError):
            pool.relay(r, w)
        with pytest.raises(RuntimeError):
            pool.proxy(a, b)
        # Refused before anything was taken over: every end is still open.
        os.fstat(r)
        os.fstat(w)
        assert a.fileno() >= 0 and b.fileno() >= 0
        a.sendall(b"open")
        assert b.recv(10) == b"open"
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_shutdown_waits_for_running_relays() -> None:
    """Parked relays too: they have started, and the worker that polls for
    them stays until they end."""
    pool = WorkerPool()
    relay, w = idle_relay(pool)
    wait_for(lambda: pool.stats()["parked"] == 1)
    assert relay.running()
    threading.Timer(0.2, finish, ([w],)).start()
    pool.shutdown(wait=True)
    assert relay.done()
    assert relay.result() == 1000


def test_shutdown_cancel_relays_cancels_queued_running_and_parked_ones() -> None:
    pool = WorkerPool(max_workers=1)
    parked, w = idle_relay(pool)
    os.write(w, b"y" * 10)
    wait_for(lambda: parked.bytes_copied == 10 and pool.stats()["parked"] == 1)
    running, held = held_relay(pool)
    wait_for(held.flushing.is_set)
    queued, w2 = idle_relay(pool)
    assert pool.stats()["queued"] == 1
    releaser = threading.Timer(0.2, held.release)
    releaser.start()
    start = time.monotonic()
    pool.shutdown(wait=True, cancel_relays=True)
    # It returns, where waiting for the parked relay would never end; how
    # fast is a latency, for bench/ (a busy machine stretches it).
    assert time.monotonic() - start < 30
    releaser.join()
    assert queued.cancelled() and running.cancelled() and parked.cancelled()
    assert parked.bytes_copied == 10
    assert pool.stats()["workers"] == 0
    os.close(w)
    os.close(w2)


def test_context_manager_shuts_down() -> None:
    with WorkerPool() as pool:
        relay, w = idle_relay(pool)
        finish([w])
    assert relay.result() == 1000
    with pytest.raises(RuntimeError):
        pool.relay(0, 1)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"max_workers": 0}, ValueError),
        ({"max_workers": 1.5}, TypeError),
        ({"idle_worker_timeout": 0}, ValueError),
        ({"idle_worker_timeout": "1"}, TypeError),
    ],
)
def test_pool_rejects_bad_arguments(kwargs, exc) -> None:
    with pytest.raises(exc):
        WorkerPool(**kwargs)


def test_default_pool_is_shared() -> None:
    assert fastpipe.default_pool() is fastpipe.default_pool()


def test_done_callbacks_run() -> None:
    with WorkerPool() as pool:
        done = threading.Event()
        relay, w = idle_relay(pool)
        relay.add_done_callback(lambda f: done.set())
        finish([w])
        assert done.wait(10)
        assert relay.result() == 1000


def test_bytes_copied_is_live_while_running() -> None:
    with WorkerPool() as pool:
        relay, w = idle_relay(pool)
        assert relay.bytes_copied == 0
        os.write(w, b"a" * 5000)
        wait_for(lambda: relay.bytes_copied == 5000)
        assert not relay.done()
        assert relay.method == "readwrite"
        os.write(w, b"b" * 10)
        os.close(w)
        assert relay.result(timeout=10) == 5010
        assert relay.bytes_copied == 5010


def test_pool_keeps_working_in_a_forked_child() -> None:
    pool = fastpipe.default_pool()
    relay, w = idle_relay(pool)  # a worker busy in the parent at fork time
    wait_for(lambda: relay.running())

    def child() -> bool:
        r, w2 = os.pipe()
        out_r, out_w = os.pipe()
        # The pipe is empty at first, so the relay needs a worker here.
        child_relay = fastpipe.relay(r, out_w)
        os.write(w2, b"from the child")
        os.close(w2)
        ok = child_relay.result(timeout=10) == 14 and os.read(out_r, 100) == b"from the child"
        stats = fastpipe.default_pool().stats()
        # The parent's busy worker does not exist here.
        return ok and stats["busy"] == 0 and stats["workers"] == 1

    code = exit_code_in_child(child)
    finish([w])
    assert relay.result(timeout=10) == 1000
    assert code == 0


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_reaches_the_main_thread_waiting_in_result() -> None:
    import signal

    with WorkerPool() as pool:
        relay, w = idle_relay(pool)
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                relay.result()
            # It arrives (result() waits in slices of 50 ms), where a wait
            # without them would last until the relay ends; how soon is a
            # latency, which a busy machine stretches.
            assert time.monotonic() - start < 10
        finally:
            timer.cancel()
            finish([w])
        assert relay.result(timeout=10) == 1000


def test_interpreter_exit_does_not_hang_on_blocked_relays() -> None:
    import subprocess
    import sys

    code = (
        "import os, fastpipe\n"
        "r, w = os.pipe()\n"
        "relays = [fastpipe.relay(r, os.open(os.devnull, os.O_WRONLY), close=False)"
        " for _ in range(3)]\n"
        "pool = fastpipe.WorkerPool()\n"
        "relays.append(pool.relay(os.dup(r), os.open(os.devnull, os.O_WRONLY)))\n"
        "print('exiting', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "exiting\n"
    assert proc.stderr == ""


def test_interpreter_exit_leaves_parked_threads_parked() -> None:
    """Exit does not wake the pool's idle threads to retire them: the OS
    reclaims them anyway, and threads ending while the process exits race
    with whatever runs at exit (LeakSanitizer's check crashed on it)."""
    import subprocess
    import sys

    # The atexit hook is registered before any pool exists, so it runs after
    # every hook fastpipe registers: the pool's threads have had their chance
    # to leave by then, and still exist (/proc/self/task) if they stayed.
    code = (
        "import atexit, os, threading, time\n"
        "def check():\n"
        "    time.sleep(0.3)\n"
        "    left = [t for t in tids if not os.path.exists(f'/proc/self/task/{t}')]\n"
        "    print('gone', len(left), 'of', len(tids), flush=True)\n"
        "atexit.register(check)\n"
        "import fastpipe\n"
        "pools = [fastpipe.default_pool(), fastpipe.WorkerPool()]\n"
        "for pool in pools:\n"
        "    r, w = os.pipe()\n"
        "    relay = pool.relay(r, os.open(os.devnull, os.O_WRONLY))\n"
        "    os.close(w)\n"
        "    relay.result(timeout=10)\n"
        "tids = [t.native_id for t in threading.enumerate() if t.name.startswith('fastpipe-')]\n"
        "assert len(tids) == 4, tids  # a worker and the completer, per pool\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "gone 0 of 4\n"


@pytest.fixture
def no_collector():
    """The cyclic GC off, keeping what it finds: ``collect()`` then counts
    exactly the objects that only a collection would have freed."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _finished_relay(pool: WorkerPool, payload: bytes) -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, d:
        a.sendall(payload)
        a.shutdown(socket.SHUT_WR)
        relay = pool.relay(b, c)
        assert relay.result(timeout=10) == len(payload)
        assert d.recv(len(payload) + 1, socket.MSG_WAITALL) == payload
        assert relay.bytes_copied == len(payload) and relay.method is not None


def _finished_proxy(pool: WorkerPool) -> None:
    a, a2 = socket.socketpair()
    b, b2 = socket.socketpair()
    with a, b:
        relay = pool.proxy(a2, b2)
        a.sendall(b"ping")
        assert b.recv(4, socket.MSG_WAITALL) == b"ping"
        a.shutdown(socket.SHUT_WR)
        b.shutdown(socket.SHUT_WR)
        assert relay.result(timeout=10) == (4, 0)


def _failed_relay(pool: WorkerPool) -> None:
    r, w = os.pipe()
    os.write(w, b"lost")
    os.close(w)
    bad = os.open(os.devnull, os.O_RDONLY)  # not writable: EBADF from write
    relay = pool.relay(r, bad)
    with pytest.raises(OSError):
        relay.result(timeout=10)
    del relay


@pytest.mark.parametrize("kind", ["relay", "proxy", "failed"])
def test_a_finished_relay_leaves_no_reference_cycle(no_collector, kind: str) -> None:
    """Every relay is freed by reference counting alone once it is done.

    Its future, task, job and ends used to form cycles (about 19 objects a
    relay), so a busy pool's garbage waited for the cyclic collector, whose
    passes were a quarter of the small relays' time.
    """
    with WorkerPool() as pool:
        for _ in range(20):
            if kind == "relay":
                _finished_relay(pool, os.urandom(20000))
            elif kind == "proxy":
                _finished_proxy(pool)
            else:
                _failed_relay(pool)
        left = gc.collect()
        assert left == 0, sorted({type(o).__name__ for o in gc.garbage})


def test_every_way_a_relay_ends_takes_it_off_the_pools_live_set() -> None:
    """shutdown(cancel_relays=True) finds relays in a set that each relay
    leaves when its future is settled: one left behind would be a leak."""
    with WorkerPool(max_workers=2) as pool:
        _finished_relay(pool, b"done")
        _failed_relay(pool)
        _finished_proxy(pool)
        parked, w_parked = idle_relay(pool)
        wait_for(lambda: pool.stats()["parked"] == 1)
        holders = [held_relay(pool) for _ in range(2)]
        wait_for(lambda: all(held.flushing.is_set() for _, held in holders))
        queued, w_queued = idle_relay(pool)  # behind the two running ones
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        queued_proxy = pool.proxy((r1, w2), (r2, w1))
        assert pool.stats()["queued"] == 3
        assert len(pool._live) == 5
        assert queued.cancel() and queued_proxy.cancel() and parked.cancel()
        for relay, held in holders:
            held.release()
            assert relay.result(timeout=10) == 0
        wait_for(lambda: not pool._live)
        for w in (w_parked, w_queued):
            os.close(w)
    # And shutdown's own cancel, of a running, a parked and a queued relay.
    pool = WorkerPool(max_workers=1)
    parked, w_parked = idle_relay(pool)
    wait_for(lambda: pool.stats()["parked"] == 1)
    running, held = held_relay(pool)
    wait_for(held.flushing.is_set)
    queued, w_queued = idle_relay(pool)
    assert pool.stats()["queued"] == 1
    releaser = threading.Timer(0.1, held.release)
    releaser.start()
    pool.shutdown(cancel_relays=True)
    releaser.join()
    assert running.cancelled() and queued.cancelled() and parked.cancelled()
    assert not pool._live
    for w in (w_parked, w_queued):
        os.close(w)


def test_relay_set_result_wakes_every_kind_of_waiter() -> None:
    """A Relay makes its Condition only when a thread waits: a thread in
    result(), wait(), as_completed() and a callback all see the result,
    and a second settle raises as Future's does."""
    from concurrent.futures import FIRST_COMPLETED, InvalidStateError, as_completed
    from concurrent.futures import wait as futures_wait

    relay = fastpipe.Relay()
    seen: dict[str, object] = {}
    started = threading.Barrier(4)

    def in_result() -> None:
        started.wait()
        seen["result"] = relay.result(timeout=10)

    def in_wait() -> None:
        started.wait()
        done, _ = futures_wait([relay], timeout=10, return_when=FIRST_COMPLETED)
        seen["wait"] = relay in done

    def in_as_completed() -> None:
        started.wait()
        seen["as_completed"] = [f.result() for f in as_completed([relay], timeout=10)]

    relay.add_done_callback(lambda f: seen.setdefault("callback", f.result()))
    threads = [threading.Thread(target=t) for t in (in_result, in_wait, in_as_completed)]
    for t in threads:
        t.start()
    started.wait()
    wait_for(lambda: len(relay._condition._waiters) >= 1)  # someone really waits
    relay.set_result(42)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert seen == {"result": 42, "wait": True, "as_completed": [42], "callback": 42}
    assert relay.done() and relay.result() == 42
    with pytest.raises(InvalidStateError):
        relay.set_result(43)
    assert relay.result() == 42


def test_a_relay_nobody_waits_on_holds_no_condition_or_lists() -> None:
    """A parked relay is mostly its future: the Condition and the waiters
    and callbacks lists are made only when something needs them."""
    from concurrent.futures import wait as futures_wait

    with WorkerPool() as pool:
        relay, w = idle_relay(pool)
        wait_for(lambda: pool.stats()["parked"] == 1)
        assert (relay._cond, relay._waiter_list, relay._callbacks) == (None, None, None)
        assert relay.__dict__ == {}  # slots only
        assert "pending" in repr(relay) and relay._cond is None
        finish([w])
        wait_for(relay.done)
        assert relay.result() == 1000 and relay.exception() is None
        assert relay._cond is None
        # concurrent.futures.wait() makes the Condition and the waiters list
        # (a thread in result() on a pool relay helps the pool instead).
        waited, w = idle_relay(pool)
        waiter = threading.Thread(target=futures_wait, args=([waited], 10))
        waiter.start()
        try:
            wait_for(lambda: waited._waiter_list)
            assert waited._cond is not None and waited._callbacks is None
        finally:
            finish([w])
        waiter.join(10)
        assert not waiter.is_alive() and waited.result() == 1000


def _race_settling_with_waiters(outcome: str) -> list[object]:
    """Start four waiters on a fresh Relay and settle it as they start."""
    from concurrent.futures import CancelledError, as_completed
    from concurrent.futures import wait as futures_wait

    relay: fastpipe.Relay[int] = fastpipe.Relay()
    seen: list[object] = []
    go = threading.Barrier(5)

    def in_result() -> None:
        go.wait()
        try:
            seen.append(relay.result(timeout=10))
        except (CancelledError, OSError) as exc:
            seen.append(type(exc))

    def in_exception() -> None:
        go.wait()
        try:
            seen.append(type(relay.exception(timeout=10)))
        except CancelledError:
            seen.append(CancelledError)

    def in_wait() -> None:
        go.wait()
        seen.append(relay in futures_wait([relay], timeout=10).done)

    def in_as_completed() -> None:
        go.wait()
        seen.append([f is relay for f in as_completed([relay], timeout=10)])

    threads = [
        threading.Thread(target=t) for t in (in_result, in_exception, in_wait, in_as_completed)
    ]
    for t in threads:
        t.start()
    go.wait()
    relay.add_done_callback(lambda f: seen.append("callback"))
    if outcome == "cancelled":
        assert relay.cancel()
    elif outcome == "error":
        relay.set_exception(BrokenPipeError())
    else:
        relay.set_result(7)
    for t in threads:
        t.join(15)
        assert not t.is_alive()
    return seen


def test_relay_settling_races_its_waiters_without_losing_a_wakeup() -> None:
    """Settled from one thread the moment others start to wait, through
    every path (result, exception, wait, as_completed, a callback, cancel):
    each waiter sees the outcome; a lost wake-up hangs one until its 10 s."""
    from concurrent.futures import CancelledError

    expected: dict[str, list[object]] = {
        "cancelled": [CancelledError, CancelledError],
        "error": [BrokenPipeError, BrokenPipeError],
        "result": [7, type(None)],
    }
    for i in range(150):
        outcome = ("cancelled", "error", "result")[i % 3]
        seen = _race_settling_with_waiters(outcome)
        want = [True, [True], "callback", *expected[outcome]]
        assert sorted(map(repr, seen)) == sorted(map(repr, want)), (i, seen)


def test_a_cancelled_relay_runs_its_callbacks_before_wait_returns() -> None:
    """As Future.cancel() then set_running_or_notify_cancel(): done-callbacks
    run before concurrent.futures.wait() sees the relay done."""
    from concurrent.futures import wait as futures_wait

    relay: fastpipe.Relay[int] = fastpipe.Relay()
    ran: list[bool] = []
    relay.add_done_callback(lambda f: (time.sleep(0.05), ran.append(f.cancelled())))
    returned: list[bool] = []

    def waiter() -> None:
        futures_wait([relay], timeout=10)
        returned.append(bool(ran))

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: relay._waiter_list)
    assert relay.cancel()
    thread.join(10)
    assert returned == [True] and ran == [True]
    assert relay.cancel() and relay.cancelled()  # a second cancel: still True


def test_relays_work_in_a_child_forked_while_their_lock_was_held() -> None:
    """Every Relay's state lock is one module lock: a fork while another
    thread holds it must not leave the child's relays stuck."""
    from fastpipe import _relay

    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with _relay._state_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)

    def child() -> bool:
        relay: fastpipe.Relay[int] = fastpipe.Relay()
        threading.Timer(0.05, relay.set_result, (5,)).start()
        return relay.result(timeout=5) == 5

    try:
        code = exit_code_in_child(child)
    finally:
        release.set()
        holder.join(10)
    assert code == 0


# -- a caller's event loop completes the relays (WorkerPool._ready_fd) ------------


def test_a_loop_completes_the_relays_in_its_own_thread() -> None:
    """With _ready_fd(), an ended relay turns the fd readable, and
    _complete_ready() settles it and runs its callbacks in the calling thread."""
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    pool = WorkerPool()
    try:
        ready = pool._ready_fd()
        # The completer thread takes whatever it finds when it wakes, and it
        # wakes to start the first worker.  A first relay has it do that;
        # asleep again, with that worker idle, nothing wakes it.
        warm_up = pool.relay(os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY))
        assert warm_up.result(timeout=30) == 0
        wait_for(lambda: pool._core.completer_asleep() and pool.stats()["idle"] == 1)
        pool._complete_ready()
        assert select.select([ready], [], [], 0)[0] == []
        # Its bytes there first: the idle worker runs it to the end at once.
        os.write(w, b"through the loop")
        os.close(w)
        relay = pool.relay(r, out_w)
        ran_in: list[int] = []
        relay.add_done_callback(lambda _: ran_in.append(threading.get_ident()))
        assert select.select([ready], [], [], 30)[0] == [ready]
        pool._complete_ready()
        assert relay.done() and relay.result() == 16
        assert ran_in == [threading.get_ident()]
        assert os.read(out_r, 100) == b"through the loop"
        # Taken: the fd is no longer readable until another relay ends.
        assert select.select([ready], [], [], 0)[0] == []
    finally:
        pool.shutdown(cancel_relays=True)
        os.close(out_r)


def test_result_in_the_loops_thread_takes_what_it_waits_for() -> None:
    """A relay that has ended but that no loop turn has completed yet:
    result() in any thread takes it from the done list, rather than waiting
    for a completion only the loop would do."""
    r, w = os.pipe()
    pool = WorkerPool()
    try:
        ready = pool._ready_fd()
        relay = pool.relay(r, os.open(os.devnull, os.O_WRONLY))
        os.write(w, b"1234")
        os.close(w)
        assert select.select([ready], [], [], 30)[0] == [ready]  # ended, not completed
        assert relay.result(timeout=10) == 4
    finally:
        pool.shutdown(cancel_relays=True)


def test_cancel_of_a_parked_relay_needs_no_loop_turn() -> None:
    """cancel() ends a parked relay in the calling thread, and waits for its
    completion: with a loop completing the pool's relays, it completes it
    itself instead of waiting for a loop turn that may never come."""
    r, w = os.pipe()
    pool = WorkerPool()
    try:
        pool._ready_fd()
        relay = pool.relay(r, os.open(os.devnull, os.O_WRONLY))
        wait_for(lambda: pool.stats()["parked"] == 1)
        answer: list[bool] = []
        canceller = threading.Thread(target=lambda: answer.append(relay.cancel()))
        canceller.start()
        canceller.join(30)
        stuck = canceller.is_alive()
        pool._complete_ready()  # lets a stuck cancel() go, to fail cleanly
        canceller.join(30)
        assert not stuck
        assert answer == [True] and relay.cancelled()
    finally:
        os.close(w)
        pool.shutdown(cancel_relays=True)
