"""The benchmark harness: one implementation of every workload, shared by
``fastpipe bench`` and the pytest-benchmark files in ``bench/``.

Standard library only: it ships in the wheel, and fastpipe has no run-time
dependencies.
"""
