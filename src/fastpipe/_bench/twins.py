"""``fastpipe.relay`` on the other implementation (the compiled core or the
pure-Python twin), run over the same workloads in a child process."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import fastpipe
from fastpipe._bench.common import TIMEOUT, BenchError
from fastpipe._bench.host import new_scratch_dir
from fastpipe._bench.methods import FASTPIPE, FASTPIPE_TWIN
from fastpipe._bench.runner import Result, build_cases, run_workload
from fastpipe._cli.args import stop_signals_raise

TWIN_NAMES = {"c": "compiled core", "py": "python twin"}
_TWIN_CHILD = (
    "import sys; from fastpipe._bench import twins; sys.exit(twins._twin_child(sys.argv[1:]))"
)


def other_twin() -> str | None:
    """The implementation this process does not run: ``"py"``, ``"c"``, or None.

    None when this process runs the pure-Python twin because the compiled
    core is not built: there is no other twin to measure.
    """
    if fastpipe.IMPLEMENTATION == "c":
        return "py"
    return "c" if importlib.util.find_spec("fastpipe._core") is not None else None


def measure_other_twin(size: int, relays: int, repeat: int, implementation: str) -> list[Result]:
    """The ``fastpipe`` method of every workload, run by the other implementation.

    A child process, because the implementation is chosen once per process
    (``fastpipe._impl``, from ``FASTPIPE_NO_EXTENSIONS``): the twin's relays
    then go through the same ``WorkerPool`` and ``Relay`` code as a user's
    would.  The child runs the same cases, verifies every byte the same way
    and sends its results back as JSON; they come back as method
    ``fastpipe-twin``, with ``extra["implementation"]`` saying which twin.

    Raises:
        BenchError: the child failed, or ran the wrong implementation.
    """
    env = dict(os.environ, FASTPIPE_NO_EXTENSIONS="1" if implementation == "py" else "0")
    # The child imports this very package, wherever it was found.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastpipe.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with subprocess.Popen(
        [sys.executable, "-c", _TWIN_CHILD, implementation, str(size), str(relays), str(repeat)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT * 10)
        except BaseException:
            # SIGTERM, Ctrl-C or the timeout here: SIGTERM lets the child
            # remove its scratch files (on tmpfs: memory) and end its
            # endpoints, which subprocess.run's SIGKILL would leave behind.
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
    if proc.returncode != 0:
        raise BenchError(f"the {TWIN_NAMES[implementation]} child failed: {err[-500:]}")
    results = []
    for doc in json.loads(out):
        doc["method"] = FASTPIPE_TWIN
        doc["extra"] = {**doc["extra"], "method": FASTPIPE_TWIN, "implementation": implementation}
        results.append(Result(**doc))
    return results


def _twin_child(argv: list[str]) -> int:
    """``measure_other_twin``'s child: IMPLEMENTATION SIZE RELAYS REPEAT -> JSON on stdout."""
    implementation, size, relays, repeat = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if fastpipe.IMPLEMENTATION != implementation:
        sys.stderr.write(f"expected the {implementation!r} core, got {fastpipe.IMPLEMENTATION!r}\n")
        return 1
    results: list[Result] = []
    # The parent asks with SIGTERM when it is stopped: clean up as on Ctrl-C,
    # from the moment the scratch directory exists.
    with stop_signals_raise():
        directory = new_scratch_dir(size)
        try:
            for cases in build_cases(size, relays, directory, only=(FASTPIPE,)):
                results += run_workload(cases, repeat)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    sys.stdout.write(json.dumps([asdict(r) for r in results]))
    return 0
