"""The command line, driven as a user would: a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fastpipe._bench import common, host, twins

from conftest import wait_for


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastpipe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help() -> None:
    for args in (["--help"], ["bench", "--help"], ["cp", "--help"], ["forward", "--help"]):
        proc = run(*args)
        assert proc.returncode == 0
        assert "usage: fastpipe" in proc.stdout
    # The top-level help lists every subcommand.
    top = run("--help").stdout
    for command in ("bench", "cp", "forward"):
        assert command in top


#: ``python -m fastpipe`` (through runpy, as -m does), writing the names in
#: sys.modules at exit, after the command has run, to the file $MODULES_OUT.
#: (-X importtime would miss modules imported with importlib.import_module.)
_LIST_MODULES_AT_EXIT = (
    "import atexit, json, os, pathlib, runpy, sys; "
    "out = pathlib.Path(os.environ['MODULES_OUT']); "
    "atexit.register(lambda: out.write_text(json.dumps(sorted(sys.modules)))); "
    "runpy.run_module('fastpipe', run_name='__main__', alter_sys=True)"
)


def imported_modules(tmp_path: Path, *args: str) -> set[str]:
    """The modules loaded by the end of ``python -m fastpipe ARGS``."""
    out = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", _LIST_MODULES_AT_EXIT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, MODULES_OUT=str(out)),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fastpipe") or "--help" not in args
    return set(json.loads(out.read_text()))


def _bench_code(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "fastpipe._cli.bench" or m.startswith("fastpipe._bench")}


SUBCOMMAND_MODULES = {"fastpipe._cli.cp", "fastpipe._cli.forward", "fastpipe._cli.bench"}


@pytest.mark.parametrize("command", ["cp", "forward"])
def test_a_subcommands_help_loads_no_bench_code(tmp_path: Path, command: str) -> None:
    """Each subcommand's module is imported only when it runs: ``fastpipe cp
    --help`` loads neither the benchmark harness nor the other subcommands."""
    modules = imported_modules(tmp_path, command, "--help")
    assert f"fastpipe._cli.{command}" in modules  # the listing is read right
    assert _bench_code(modules) == set()
    assert modules & SUBCOMMAND_MODULES == {f"fastpipe._cli.{command}"}
    assert "tqdm" not in modules


def test_a_copy_loads_no_bench_code(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100_000)
    modules = imported_modules(tmp_path, "cp", str(src), str(tmp_path / "dst"))
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert "fastpipe._cli.cp" in modules
    assert _bench_code(modules) == set()


def test_the_top_level_help_loads_no_subcommand(tmp_path: Path) -> None:
    modules = imported_modules(tmp_path, "--help")
    assert "fastpipe._cli.main" in modules
    assert modules & SUBCOMMAND_MODULES == set()
    assert _bench_code(modules) == set()


def test_bench_help_loads_the_harness_but_not_matplotlib(tmp_path: Path) -> None:
    modules = imported_modules(tmp_path, "bench", "--help")
    assert {"fastpipe._cli.bench", "fastpipe._bench.suite"} <= modules
    assert "matplotlib" not in modules  # only --plot needs it


def test_bad_arguments_exit_2_with_a_message() -> None:
    for args in (["bench", "--size", "0"], ["bench", "--relays", "100"], ["nonsense"]):
        proc = run(*args)
        assert proc.returncode == 2
        assert "error" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_short_bench_prints_the_table_and_writes_json(tmp_path) -> None:
    out = tmp_path / "results.json"
    proc = run("bench", "--size", "1", "--repeat", "1", "--relays", "64", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "fastpipe.relay" in proc.stdout
    assert "copyfileobj" in proc.stdout
    assert "KiB of RSS per relay" in proc.stdout
    assert "KiB of RSS per connection" in proc.stdout
    doc = json.loads(out.read_text())
    assert {r["workload"] for r in doc["results"]} >= {
        "file-to-file",
        "pipe-to-file",
        "tcp-to-tcp",
        "file-to-tcp",
        "pipe-to-tcp",
        "small-relays",
        "tcp-main-spins",
    }
    assert all(r["MiB_per_s"] > 0 for r in doc["results"] if r["method"] != "setup-only")
    assert doc["idle_memory"]["relays"] == 1000
    # Both twins: the other implementation's fastpipe.relay, run in a child
    # process over the same workloads, as a table and in the JSON.
    other = "py" if doc["implementation"] == "c" else "c"
    twin = {r["workload"]: r for r in doc["results"] if r["method"] == "fastpipe-twin"}
    if other == "c" and importlib.util.find_spec("fastpipe._core") is None:
        assert not twin  # the compiled core is not built: nothing to compare with
    else:
        assert set(twin) == {r["workload"] for r in doc["results"] if r["method"] == "fastpipe"}
        assert {r["extra"]["implementation"] for r in twin.values()} == {other}
        assert all(r["MiB_per_s"] > 0 and r["walls"] for r in twin.values())
        assert "both twins" in proc.stdout
        assert ("python twin: ms" if other == "py" else "compiled core: ms") in proc.stdout
    idle = doc["idle_memory"]
    assert idle["buffers_in_use"] == idle["pipes_in_use"] == 0
    assert idle["proxy_buffers_in_use"] == idle["proxy_pipes_in_use"] == 0
    assert 0 < idle["rss_kib_per_relay"] < 64 and 0 < idle["rss_kib_per_proxy"] < 64
    assert idle["proxies_echoed"] == idle["proxies"] == 1000
    assert "parked on idle sockets" in proc.stdout


def _scratch_dirs_in_use(pids: list[int], root: str) -> dict[str, int]:
    """The scratch directories under ``root`` in which these processes hold a
    file open, each with one such pid.

    Other benches on a shared machine (another user's, another test run's)
    make and remove their own ``fastpipe-bench-*`` directories meanwhile:
    a directory is told to be ours by the processes that use it, not by its
    name or by when it appeared.
    """
    found = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            head, _, rest = target.partition(root + os.sep)
            if not head and rest.startswith("fastpipe-bench-"):
                found[rest.split(os.sep)[0]] = pid
    return found


def _marked_processes(mark: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``mark``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if mark.encode() in environ and state != b"Z":
            found.append(int(pid))
    return found


@pytest.mark.parametrize("phase", ["bench", "twin"])
def test_sigterm_stops_the_bench_and_leaves_nothing_behind(phase: str) -> None:
    """SIGTERM (timeout, kill) cleans up as Ctrl-C does: the scratch files,
    which on tmpfs hold memory, the endpoint processes and the other twin's
    child with its own scratch files; then exit 143."""
    if phase == "twin" and twins.other_twin() is None:
        pytest.skip("no other twin to measure")
    size = 8
    root = host.scratch_root(host.scratch_room(size * common.MiB))
    ours: dict[str, int] = {}  # our scratch directories, each with a pid using it

    def at_work() -> bool:
        # Files open in a scratch directory: the run (or the twin's child)
        # is at work, its clean-up in place.
        ours.update(_scratch_dirs_in_use(_marked_processes(mark), root))
        if phase == "twin":
            return any(_is_twin_child(pid) for pid in ours.values())
        return bool(ours)

    mark = f"fastpipe-test-{uuid.uuid4()}"
    env = dict(os.environ, FASTPIPE_TEST_MARK=mark)
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastpipe",
            "bench",
            "--size",
            str(size),
            "--repeat",
            "1",
            "--relays",
            "64",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            wait_for(at_work, 60)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.endswith("fastpipe: stopped by SIGTERM\n"), err
    wait_for(lambda: not _marked_processes(mark))
    assert [name for name in ours if os.path.exists(os.path.join(root, name))] == []


def _is_twin_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"_twin_child" in f.read()
    except OSError:
        return False
