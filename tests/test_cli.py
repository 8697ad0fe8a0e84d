"""The command line, driven as a user would: a subprocess."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys


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
    assert "KiB of RSS" in proc.stdout
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
    assert doc["idle_memory"]["buffers_in_use"] == 0
    assert 0 < doc["idle_memory"]["rss_kib_per_relay"] < 64
