"""Paddler: a slot-aware load balancer for llama.cpp fleets."""

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).parent


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Imports the named modules from their .py files, passing over the compiled ones."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        source = _HERE.parent / (fullname.replace(".", "/") + ".py")
        return importlib.util.spec_from_file_location(fullname, source)


def _hot_path() -> str:
    """Whether the hot path runs compiled (packaging/compile_hot_path.py), and if not, why.

    Python imports an extension module in place of the source beside it. Here one runs
    only while _compiled.json, written by the build that made it, vouches for it: that
    its source is unchanged. Otherwise (an edit, a checkout, a half-copied build) every
    compiled module is imported from its source, since compiled modules call each
    other's code directly and cannot be mixed with sources; so an edit always counts."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    compiled = {
        ".".join(extension.relative_to(_HERE.parent).parts).removesuffix(suffix): source
        for extension in _HERE.rglob("*" + suffix)
        if (source := extension.with_name(extension.name.removesuffix(suffix) + ".py")).exists()
    }
    if not compiled:
        return "pure Python"
    try:
        recorded = json.loads((_HERE / "_compiled.json").read_text())["modules"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {}
    why = ""
    for name, source in sorted(compiled.items()):
        if name not in recorded:
            why = f"{source.relative_to(_HERE.parent)} has a compiled copy no build vouches for"
        elif hashlib.sha256(source.read_bytes()).hexdigest() != recorded[name]:
            why = f"{source.relative_to(_HERE.parent)} changed since it was compiled"
        else:
            continue
        break
    else:
        missing = sorted(set(recorded) - set(compiled))
        if not missing:
            return "compiled with mypyc"
        why = f"{missing[0]} has no compiled copy for this Python"
    sys.meta_path.insert(0, _SourcesFirst(frozenset(compiled)))
    return f"pure Python ({why}; make setup compiles it again)"


HOT_PATH = _hot_path()
