"""Bulk copies: fastpipe.relay next to its baselines, one group per workload.

One workload per kernel path fastpipe picks: file -> file on tmpfs
(copy_file_range), pipe -> file with the producer in another process (splice
through a pooled pipe), TCP -> TCP over loopback with the sender and the sink
in other processes (splice through a pooled pipe; this process accepts from
the sender and connects to the sink), file -> TCP (sendfile) and pipe -> TCP
(splice straight from the producer's pipe).  fastpipe waits on
``relay(...).result()``; every baseline runs in the calling thread:
shutil.copyfileobj, fastpipe with ``zerocopy=False`` (its read/write path), a
Python ``os.splice`` loop through a 1 MiB pipe, a Python read/write loop with
a 256 KiB buffer, ``shutil.copyfile`` for file -> file and ``socket.sendfile``
for file -> TCP.
``extra_info`` has the relay's CPU s/GiB and, where the endpoints are other
processes, their CPU too (``total_cpu_s``).  Sizes: FASTPIPE_BENCH_MB (see
conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastpipe._bench import workloads
from fastpipe._bench.cases import Case

RunCase = Callable[[Case], None]


@pytest.mark.benchmark(group="file-to-file")
@pytest.mark.parametrize("method", workloads.FileToFile.methods)
def test_file_to_file(run_case: RunCase, bench_size: int, scratch_dir: str, method: str) -> None:
    run_case(workloads.FileToFile(method, bench_size, scratch_dir))


@pytest.mark.benchmark(group="pipe-to-file")
@pytest.mark.parametrize("method", workloads.PipeToFile.methods)
def test_pipe_to_file(run_case: RunCase, bench_size: int, scratch_dir: str, method: str) -> None:
    run_case(workloads.PipeToFile(method, bench_size, scratch_dir))


@pytest.mark.benchmark(group="tcp-to-tcp")
@pytest.mark.parametrize("method", workloads.TcpToTcp.methods)
def test_tcp_to_tcp(run_case: RunCase, bench_size: int, method: str) -> None:
    run_case(workloads.TcpToTcp(method, bench_size))


@pytest.mark.benchmark(group="file-to-tcp")
@pytest.mark.parametrize("method", workloads.FileToTcp.methods)
def test_file_to_tcp(run_case: RunCase, bench_size: int, scratch_dir: str, method: str) -> None:
    run_case(workloads.FileToTcp(method, bench_size, scratch_dir))


@pytest.mark.benchmark(group="pipe-to-tcp")
@pytest.mark.parametrize("method", workloads.PipeToTcp.methods)
def test_pipe_to_tcp(run_case: RunCase, bench_size: int, method: str) -> None:
    run_case(workloads.PipeToTcp(method, bench_size))
