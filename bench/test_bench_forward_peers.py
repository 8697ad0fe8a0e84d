"""A smoke run of ``bench/forward_peers/run.py``: each workload once, with tiny sizes.

The harness runs as a user runs it, as a subprocess (``--smoke``, fewer
connections and fault attempts still), against the forwarders and tools
installed here: a workload whose tools are missing is skipped (churn needs
nginx and ab or wrk, bulk needs iperf3); haproxy and socat join every
workload where they are installed.  It checks that the run succeeded, that
every forwarder has its figures in each of the workload's tables with no
failed round, and that the fastpipe figures that say "it works" hold
(every connection echoes, no wrong byte, one log line per dead attempt).
The figures themselves are not judged here: the smoke sizes say nothing
about speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RUN = Path(__file__).resolve().parent / "forward_peers" / "run.py"

#: Tools each workload cannot run without (any one of each group).
NEEDS: dict[str, list[tuple[str, ...]]] = {
    "churn": [("nginx",), ("ab", "wrk")],
    "bulk": [("iperf3",)],
}

#: Tables each workload fills.
TABLES = {
    "churn": ["churn"],
    "idle": ["idle", "bring-up", "after-close"],
    "shutdown": ["shutdown"],
    "bulk": ["bulk"],
    "latency": ["latency"],
    "faults": ["faults", "emfile"],
}

#: fastpipe figures that must hold even at smoke sizes: (table, metric, value).
MUST = {
    "idle": [("idle", "echo_failed", 0), ("after-close", "burst2_echo_failed", 0)],
    "shutdown": [("shutdown", "status_open", 0), ("shutdown", "status_closed", 0)],
    "bulk": [("bulk", "verify_bad", 0)],
    "faults": [
        ("faults", "refused_closed_pct", 100),
        ("faults", "refused_error_lines", 1),
        ("faults", "reset_closed_pct", 100),
        ("faults", "silent_closed_pct", 100),
    ],
}


def _metric(table: dict[str, Any], key: str) -> dict[str, Any]:
    return next(m for m in table["metrics"] if m["key"] == key)


@pytest.mark.parametrize("workload", list(TABLES))
def test_forward_peers_smoke(workload: str, tmp_path: Path) -> None:
    lacking = [
        "/".join(group)
        for group in NEEDS.get(workload, [])
        if not any(shutil.which(tool) for tool in group)
    ]
    if lacking:
        pytest.skip(f"needs {' and '.join(lacking)} (bench/forward_peers/setup.sh)")
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(RUN), "--smoke", "-w", workload, "--json", str(out)]
    cmd += ["--conns", "20", "--fault-attempts", "3", "--fault-batch", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert not figures["meta"]["skipped"], figures["meta"]["skipped"]
    peers = list(figures["meta"]["peers"])
    assert "fastpipe" in peers, figures["meta"]["missing"]
    for key in TABLES[workload]:
        table = figures["tables"][key]
        assert set(peers) <= set(table["columns"]), (key, table["columns"])
        for metric in table["metrics"]:
            assert not metric["failed_rounds"], (key, metric["key"], table["notes"])
        for peer in peers:
            got = [m["key"] for m in table["metrics"] if m["median"].get(peer) is not None]
            assert got, f"{key}: no figure for {peer}: {table['notes']}"
    for key, metric_key, value in MUST.get(workload, []):
        metric = _metric(figures["tables"][key], metric_key)
        assert metric["median"]["fastpipe"] == value, (key, metric_key, metric["median"])
