"""The extension list; all metadata lives in pyproject.toml.

Build switches (environment variables):
    FASTPIPE_DEBUG=1            -g -O0, for gdb.
    FASTPIPE_SANITIZE=address   AddressSanitizer (+ LeakSanitizer) in the core;
                                the interpreter is not instrumented, so the
                                ASan runtime must be LD_PRELOADed: see .ci/asan.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTPIPE_DEBUG") == "1"
sanitize = os.environ.get("FASTPIPE_SANITIZE", "")
if sanitize not in ("", "address"):
    raise SystemExit(f"FASTPIPE_SANITIZE={sanitize!r}: only 'address' is supported")

compile_args = ["-O2", "-Wall", "-Wno-unused-function"]
link_args: list[str] = []
if debug:
    compile_args += ["-g", "-O0"]
if sanitize:
    # -O1 keeps the reports' stacks close to the source; the frame pointer
    # lets ASan's fast unwinder walk the core's frames on every malloc.
    flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
    compile_args += [*flags, "-g", "-O1"]
    link_args += flags

extensions = [
    Extension(
        "fastpipe._core",
        # It includes src/fastpipe/core/*.pxi: cythonize follows the includes
        # and rebuilds when one of them changes.
        ["src/fastpipe/_core.pyx"],
        include_dirs=["src/fastpipe"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        # timer_create (the idle_timeout alarm) lives in librt before glibc
        # 2.34; later glibcs keep an empty librt for old link lines.
        libraries=["rt"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
