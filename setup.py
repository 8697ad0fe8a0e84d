"""The extension list; all metadata lives in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTPIPE_DEBUG") == "1"

extensions = [
    Extension(
        "fastpipe._core",
        ["src/fastpipe/_core.pyx"],
        include_dirs=["src/fastpipe"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"] + (["-g", "-O0"] if debug else []),
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
