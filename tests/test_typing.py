"""A user's script type-checks under ``mypy --strict``: Relay is generic.

``relay()`` returns ``Relay[int]`` and ``proxy()`` ``Relay[tuple[int, int]]``,
so their results need no cast.  Skipped where mypy is not installed; CI's
lint stage installs it and runs this file.
"""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastpipe

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed"
)

USER_SCRIPT = """
import asyncio
import socket

import fastpipe


def copy_file(src: str, dst: str) -> int:
    return fastpipe.relay(open(src, "rb"), open(dst, "wb")).result()


def forward(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    return fastpipe.proxy(a, b).result()


async def copy_async(src: int, dst: int) -> int:
    return await fastpipe.relay(src, dst)


def in_a_pool(src: int, dst: int) -> int:
    with fastpipe.WorkerPool(max_workers=4) as pool:
        relay: fastpipe.Relay[int] = pool.relay(src, dst, count=10)
        up, down = pool.proxy(src, dst).result()
        return relay.result() + up + down + fastpipe.copy_fd(src, dst)


def stats() -> int:
    return fastpipe.buffer_stats()["in_use"] + fastpipe.BUFFER_SIZE


asyncio.run(copy_async(0, 1))
"""


def run_mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_script.py"
    script.write_text(source)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    env = dict(os.environ)
    # mypy finds an installed fastpipe in site-packages; a checkout used in
    # place (PYTHONPATH=src) is found through MYPYPATH.
    package_root = str(Path(fastpipe.__file__).resolve().parent.parent)
    site_dirs = {
        str(Path(p).resolve()) for p in [*site.getsitepackages(), sysconfig.get_path("purelib")]
    }
    if package_root not in site_dirs:
        env["MYPYPATH"] = package_root
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp_path / "cache"),
            str(script),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_users_script_passes_mypy_strict(tmp_path: Path) -> None:
    done = run_mypy(tmp_path, USER_SCRIPT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_results_are_typed_not_any(tmp_path: Path) -> None:
    """A wrong annotation is caught: result() is int, not Any."""
    done = run_mypy(
        tmp_path,
        "import fastpipe\n"
        "n: str = fastpipe.relay(0, 1).result()\n"
        "pair: tuple[str, str] = fastpipe.proxy(0, 1).result()\n",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'expression has type "int", variable has type "str"' in done.stdout
    assert 'expression has type "tuple[int, int]"' in done.stdout
