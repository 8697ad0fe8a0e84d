"""A griffe extension: the API reference shows what ``help()`` shows.

mkdocstrings reads the package statically: signatures and types come from
the sources and from ``_core.pyi`` (the stub of the compiled core, which has
no Python source).  This extension then gives every documented object the
docstring of the object itself, imported: the compiled core's functions have
theirs only there, and ``fastpipe.relay``/``proxy`` share theirs with
``WorkerPool.relay``/``proxy`` by assignment.  So the reference is the text
that ``help()`` prints, and cannot drift from it.

The reference describes the compiled core: building the docs with the
pure-Python twin in use is an error.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

_MISSING = object()


class RuntimeDocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "fastpipe":
            return
        self._parser = loader.docstring_parser
        self._options = loader.docstring_options
        fastpipe = importlib.import_module("fastpipe")
        if fastpipe.IMPLEMENTATION != "c":
            raise RuntimeError(
                "the API reference documents the compiled core, but fastpipe.IMPLEMENTATION "
                f"is {fastpipe.IMPLEMENTATION!r}: install the package (pip install '.[docs]') "
                "and unset FASTPIPE_NO_EXTENSIONS"
            )
        for name in fastpipe.__all__:
            self._update(pkg[name], getattr(fastpipe, name))

    def _update(self, obj: griffe.Object | griffe.Alias, runtime: Any) -> None:
        if isinstance(obj, griffe.Alias):
            obj = obj.final_target
        if isinstance(obj, (griffe.Function, griffe.Class)):
            doc = _own_doc(runtime)
            if doc:
                obj.docstring = self._docstring(doc, obj)
        if isinstance(obj, griffe.Class):
            for name, member in obj.members.items():
                if member.is_alias:
                    continue
                attr = vars(runtime).get(name, _MISSING)
                if attr is _MISSING:
                    continue
                doc = _own_doc(attr)
                if doc and isinstance(member, (griffe.Function, griffe.Attribute)):
                    member.docstring = self._docstring(doc, member)

    def _docstring(self, text: str, parent: griffe.Object) -> griffe.Docstring:
        return griffe.Docstring(
            text, parent=parent, parser=self._parser, parser_options=self._options
        )


def _own_doc(obj: Any) -> str | None:
    """The object's own docstring, cleaned, without Cython's embedded signature."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    name = getattr(obj, "__name__", None) or getattr(getattr(obj, "fget", None), "__name__", "")
    if name:
        # embedsignature=True puts "name(args) -> ret" as the first line.
        doc = re.sub(rf"\A{re.escape(name)}\(.*\)(?: -> [^\n]*)?\n", "", doc)
    return inspect.cleandoc(doc)
