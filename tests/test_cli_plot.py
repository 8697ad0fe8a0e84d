"""``fastpipe bench --plot``: a PNG from a real (short) run, and the error without matplotlib."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, head
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_plot_of_a_short_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "fastpipe", "bench"]
        + ["--size", "1", "--repeat", "1", "--relays", "64", "--plot", str(png), "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # --json - still owns stdout; the tables moved to stderr as without --plot.
    doc = json.loads(proc.stdout)
    assert {r["workload"] for r in doc["results"]} >= {"file-to-file", "small-relays"}
    assert "copyfileobj" in proc.stderr
    width, height = png_size(png)
    assert width > 800 and height > 400
    assert png.stat().st_size > 20_000  # bars, labels and text, not a blank canvas


def test_plot_without_matplotlib_fails_before_running(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    no_matplotlib = (
        "import sys; sys.modules['matplotlib'] = None; "
        "from fastpipe.__main__ import main; sys.exit(main())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", no_matplotlib, "bench", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("fastpipe bench: error: --plot needs matplotlib")
    assert proc.stdout == ""  # no table: the benchmark never ran
    assert not png.exists()


def test_plot_into_a_missing_directory_fails_before_running(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # without it, that is the error reported first
    png = tmp_path / "no" / "such" / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "fastpipe", "bench", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "is not writable" in proc.stderr
    assert proc.stdout == ""


def _result(workload: str, method: str, mib_s: float, cpu: float, nbytes: int) -> dict[str, Any]:
    wall = nbytes / (1 << 20) / mib_s if mib_s else 0.01
    return {
        "workload": workload,
        "title": workload.replace("-to-", " -> "),
        "method": method,
        "nbytes": nbytes,
        "walls": [wall, wall * 1.2],
        "cpus": [cpu, cpu],
        "extra": {},
        "median_s": wall,
        "best_s": wall,
        "MiB_per_s": mib_s,
        "relay_cpu_s": cpu,
        "cpu_s_per_GiB": cpu * (1 << 30) / nbytes if nbytes else 0.0,
    }


def _synthetic_doc() -> dict[str, Any]:
    mib = 1 << 20
    return {
        "fastpipe": "0",
        "implementation": "c",
        "python": "3",
        "cpus": 2,
        "repeat": 2,
        "results": [
            _result("file-to-file", "fastpipe", 900.0, 0.01, 8 * mib),
            _result("file-to-file", "copyfileobj", 800.0, 0.02, 8 * mib),
            _result("file-to-file", "os.sendfile", 1200.0, 0.005, 8 * mib),
            _result("new-workload", "some-baseline", 100.0, 0.1, mib),
            _result("new-workload", "fastpipe", 300.0, 0.05, mib),
            _result("new-workload", "setup-only", 0.0, 0.01, 0),
        ],
    }


def test_plot_draws_methods_and_workloads_it_does_not_know(tmp_path: Path) -> None:
    """Another baseline or workload added to the benchmark must not break the plot."""
    pytest.importorskip("matplotlib")
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(_synthetic_doc()))
    png = tmp_path / "synthetic.png"
    # In a subprocess: matplotlib keeps its font files open for the life of
    # the process, which the fd-leak check would rightly flag here.
    draw = (
        "import sys; from fastpipe._bench.plot import plot_file; "
        "plot_file(sys.argv[1], sys.argv[2])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", draw, str(saved), str(png)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert png_size(png)[0] > 400


def test_workloads_keep_their_order_with_fastpipe_first_and_no_setup_only() -> None:
    from fastpipe._bench import plot as _plot

    doc = _synthetic_doc()
    before = copy.deepcopy(doc)
    groups = _plot._by_workload(doc["results"])
    assert list(groups) == ["file-to-file", "new-workload"]
    assert [r["method"] for r in groups["file-to-file"]] == [
        "fastpipe",
        "copyfileobj",
        "os.sendfile",
    ]
    assert [r["method"] for r in groups["new-workload"]] == ["fastpipe", "some-baseline"]
    assert doc == before  # the caller's document is not reordered or changed
