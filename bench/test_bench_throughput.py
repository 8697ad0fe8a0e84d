"""Bulk copies: fastpipe.relay next to shutil.copyfileobj, one group per workload.

file -> file on tmpfs, pipe -> file with the producer in another process, and
TCP -> TCP over loopback with the sender and the sink in other processes
(this process accepts from the sender and connects to the sink).  The
baseline runs copyfileobj in the calling thread; fastpipe waits on
``relay(...).result()``.  Sizes: FASTPIPE_BENCH_MB (see conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastpipe import _bench

RunCase = Callable[[_bench.Case], None]


@pytest.mark.benchmark(group="file-to-file")
@pytest.mark.parametrize("method", _bench.FileToFile.methods)
def test_file_to_file(run_case: RunCase, bench_size: int, scratch_dir: str, method: str) -> None:
    run_case(_bench.FileToFile(method, bench_size, scratch_dir))


@pytest.mark.benchmark(group="pipe-to-file")
@pytest.mark.parametrize("method", _bench.PipeToFile.methods)
def test_pipe_to_file(run_case: RunCase, bench_size: int, scratch_dir: str, method: str) -> None:
    run_case(_bench.PipeToFile(method, bench_size, scratch_dir))


@pytest.mark.benchmark(group="tcp-to-tcp")
@pytest.mark.parametrize("method", _bench.TcpToTcp.methods)
def test_tcp_to_tcp(run_case: RunCase, bench_size: int, method: str) -> None:
    run_case(_bench.TcpToTcp(method, bench_size))
