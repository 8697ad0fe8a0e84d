"""How many syscalls a copy makes, counted with strace where it is installed.

These are performance properties, kept by tests because a change that adds a
syscall per chunk passes every content test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import compiled_only

CHUNKS = 256  # pipe-fulls of 64 KiB: 16 MiB

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def relay_under_strace(tmp_path: Path, trace: str, script: str) -> list[str]:
    """Run ``script SRC DST`` (a relay of CHUNKS pipe-fulls) under strace.

    Returns:
        strace's lines for the ``trace`` syscalls, after checking that every
        byte arrived.
    """
    data = os.urandom(1 << 20) * (CHUNKS // 16)
    src = tmp_path / "src"
    dst = tmp_path / "dst"
    src.write_bytes(data)
    log = tmp_path / "strace.log"
    env = dict(os.environ)
    if "ASAN_OPTIONS" in env:
        # Under .ci/asan: LeakSanitizer cannot run under ptrace (it stops the
        # process at exit with a fatal error); the rest of ASan can.
        env["ASAN_OPTIONS"] += ":detect_leaks=0"
    proc = subprocess.run(
        ["strace", "-f", "--seccomp-bpf", "-s", "0", "-e", f"trace={trace}", "-o", str(log),
         sys.executable, "-c", script, str(src), str(dst)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(data)
    assert dst.read_bytes() == data
    return log.read_text().splitlines()


_RELAY_FROM_ONE_WRITE = textwrap.dedent(
    """
    import os, subprocess, sys
    import fastpipe
    r, w = os.pipe()
    # One write() of the whole file into a 64 KiB pipe.  The writer holds the
    # pipe's lock while it fills it and lets go only to sleep on a full
    # pipe: every read that gets bytes gets a full pipe, whoever runs first.
    # (A blocking pipe's write returns only once it has written it all.)
    producer = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys; data = open(sys.argv[1], 'rb').read(); "
         "assert os.write(1, data) == len(data)",
         sys.argv[1]],
        stdout=w,
    )
    os.close(w)
    dst = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    print(fastpipe.relay(r, dst, zerocopy=False).result(timeout=60))
    assert producer.wait() == 0
    """
)


def calls_per_thread(lines: list[str]) -> dict[str, list[tuple[str, str]]]:
    """strace -f lines as (syscall, result) per thread, in the order they began.

    A call that blocks while another thread's line is written comes in two
    parts: "NAME(... <unfinished ...>", then "<... NAME resumed> ...) = R".
    """
    calls: dict[str, list[tuple[str, str]]] = {}
    pending: dict[str, int] = {}
    for line in lines:
        tid, _, rest = line.partition(" ")
        rest = rest.lstrip()
        if m := re.match(r"<\.\.\. (\w+) resumed>.*\) += (-?\d+)", rest):
            if tid in pending:
                name, _ = calls[tid][pending[tid]]
                calls[tid][pending.pop(tid)] = (name, m.group(2))
            continue
        m = re.match(r"(\w+)\(", rest)
        if not m:
            continue  # a signal, an exit
        result = re.search(r"\) += (-?\d+)", rest)
        calls.setdefault(tid, []).append((m.group(1), result.group(1) if result else "?"))
        if rest.endswith("<unfinished ...>"):
            pending[tid] = len(calls[tid]) - 1
    return calls


@needs_strace
@compiled_only
def test_a_read_that_empties_a_full_pipe_is_followed_by_a_read_not_a_poll(tmp_path) -> None:
    """A blocking pipe source read with RWF_NOWAIT: a read that took a whole
    pipe-full means the producer is refilling it now, so the next call is a
    read, not a poll (otherwise one poll per pipe-full: 8,192 extra
    syscalls per 512 MiB).  The rule is checked call by call, so what the
    scheduler does between the two threads does not matter."""
    calls = relay_under_strace(tmp_path, "poll,ppoll,preadv2", _RELAY_FROM_ONE_WRITE)
    (relay,) = [c for c in calls_per_thread(calls).values() if ("preadv2", "65536") in c]
    full = [i for i, call in enumerate(relay) if call == ("preadv2", "65536")]
    # Most reads are full ones (see the producer): the rule is not vacuous.
    assert len(full) >= CHUNKS // 2, f"{len(full)} full reads: not the path under test"
    after = [relay[i + 1][0] for i in full if i + 1 < len(relay)]
    assert after == ["preadv2"] * len(after), f"calls after a full read: {after}"


_RELAY_INTO_CAT = textwrap.dedent(
    """
    import os, subprocess, sys
    import fastpipe
    r, w = os.pipe()
    with open(sys.argv[2], "wb") as out:
        consumer = subprocess.Popen(["cat"], stdin=r, stdout=out)
    os.close(r)
    src = os.open(sys.argv[1], os.O_RDONLY)
    print(fastpipe.relay(src, w, zerocopy=False).result(timeout=60))
    consumer.wait()
    """
)


@needs_strace
@compiled_only
def test_writes_into_a_pipe_are_a_pipe_full_at_most(tmp_path) -> None:
    """file -> pipe on the read/write path: a 512 KiB write into a 64 KiB
    pipe waits at every pipe-full for the reader to drain it (in the kernel,
    or parked), so reads are sized to the sink's capacity: the loop reads
    the next pipe-full while the reader drains this one.  A pool relay
    writes with pwritev2(RWF_NOWAIT), a caller's thread with writev."""
    calls = relay_under_strace(tmp_path, "writev,pwritev2", _RELAY_INTO_CAT)
    # "writev(...) = N", or "<... writev resumed>...) = N" after another
    # thread's line split the call in two.
    results = (re.search(r"\) += (\d+)$", line) for line in calls)
    written = [int(m.group(1)) for m in results if m]
    assert sum(written) == CHUNKS << 16, "not every write was seen: not the path under test"
    assert max(written) <= 64 * 1024, f"a write of {max(written)} bytes into a 64 KiB pipe"
