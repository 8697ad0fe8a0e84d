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


_RELAY_FROM_CAT = textwrap.dedent(
    """
    import os, subprocess, sys
    import fastpipe
    r, w = os.pipe()
    # cat writes 128 KiB at a time into a 64 KiB pipe: always ahead of the relay.
    producer = subprocess.Popen(["cat", sys.argv[1]], stdout=w)
    os.close(w)
    dst = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    print(fastpipe.relay(r, dst, zerocopy=False).result(timeout=60))
    producer.wait()
    """
)


@needs_strace
@compiled_only
def test_a_pipe_kept_full_is_read_again_without_a_poll(tmp_path) -> None:
    """A blocking pipe whose producer is ahead: a read that empties the full
    pipe is followed by the next read, not by a poll (before: one poll per
    pipe-full, 8,192 extra syscalls per 512 MiB)."""
    calls = relay_under_strace(tmp_path, "poll,ppoll,preadv2", _RELAY_FROM_CAT)
    reads = sum("preadv2(" in line for line in calls)
    polls = sum("poll(" in line for line in calls)
    assert reads >= CHUNKS // 2, f"{reads} preadv2 calls: not the path under test"
    # A few polls where the relay catches up with cat; not one per pipe-full.
    assert polls <= reads // 8, f"{polls} polls for {reads} reads"


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
    pipe sleeps in the kernel at every pipe-full, so reads are sized to the
    sink's capacity (before: 128 writes of 512 KiB for 64 MiB, 0.73x
    copyfileobj's speed)."""
    calls = relay_under_strace(tmp_path, "writev", _RELAY_INTO_CAT)
    # "writev(...) = N", or "<... writev resumed>...) = N" after another
    # thread's line split the call in two.
    results = (re.search(r"\) += (\d+)$", line) for line in calls)
    written = [int(m.group(1)) for m in results if m]
    assert sum(written) == CHUNKS << 16, "not every write was seen: not the path under test"
    assert max(written) <= 64 * 1024, f"a write of {max(written)} bytes into a 64 KiB pipe"
