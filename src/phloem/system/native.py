"""The request path's modules compiled with mypyc (``scripts/build_native.py``, run by
scripts/install), loaded in place of their sources while those are unchanged.

The packages that hold compiled modules call :func:`install` from their ``__init__``, so
the finder is in place before any of those modules is imported: the compiled modules share
one library and call each other directly, so they load all together or not at all.

    from phloem.system.native import install
    native = install()   # True: the compiled modules serve this process

``PHLOEM_NATIVE=0`` keeps every module as Python; so does an edited source (until the next
build), another Python, or no build at all. :func:`why_python` says which, for people
(``phloem up`` and the benchmarks print it): the Python path costs about three times the
CPU per request.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

__all__ = ["ROOT", "digest", "install", "verified_files", "why_python"]

#: Where scripts/build_native.py puts the compiled modules and their manifest.
ROOT = Path(sys.prefix) / "lib" / "phloem-native"
_PACKAGE = Path(__file__).resolve().parent.parent  # src/phloem
_REBUILD = "scripts/build_native.py rebuilds it"

_state: bool | None = None


class _Finder(MetaPathFinder):
    """Finds the compiled modules (and the library they share) by name."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def digest(source: Path) -> str:
    """A source's SHA-256, as the manifest records it."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def verified_files(root: Path | None = None) -> dict[str, Path] | None:
    """Module name -> extension file (the shared library's too) of the build in ``root``
    (default :data:`ROOT`), if it is of these sources by this Python; else ``None``."""
    return _examine(ROOT if root is None else root)[0]


def _examine(root: Path) -> tuple[dict[str, Path] | None, str | None]:
    """The build in ``root``: its files if it is of these sources by this Python, else
    None and why, in words (:func:`why_python`)."""
    try:
        built = json.loads((root / "manifest.json").read_text())
        if built["python"] != sys.version:
            return None, f"built for another Python ({_REBUILD})"
        files = {built["group"]: root / built["group_file"]}
        changed: list[str] = []
        for name, entry in built["modules"].items():
            if digest(_PACKAGE / entry["source"]) != entry["sha256"]:
                changed.append(entry["source"])
            files[name] = root / entry["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"not built in {root} (scripts/build_native.py builds it)"
    if changed:
        more = f" and {len(changed) - 2} more" if len(changed) > 2 else ""
        return None, (f"stale: {', '.join(changed[:2])}{more} changed since the build "
                      f"({_REBUILD})")
    return files, None


def install() -> bool:
    """Put the compiled modules' finder first (once per process); whether they serve."""
    global _state
    if _state is None:
        files = None if os.environ.get("PHLOEM_NATIVE", "1") == "0" else verified_files()
        if files is not None and any(name in sys.modules for name in files):
            files = None  # some already run as Python: the rest must too
        if files is not None:
            sys.meta_path.insert(0, _Finder(files))
        _state = files is not None
    return _state


def why_python(root: Path | None = None) -> str | None:
    """Why the request path runs as Python in this process, in words; None when the
    compiled modules serve it.

        if (reason := why_python()) is not None:
            print(f"request path runs as Python: {reason}")
    """
    if _state and root is None:
        return None
    if os.environ.get("PHLOEM_NATIVE", "1") == "0":
        return "PHLOEM_NATIVE=0"
    reason = _examine(ROOT if root is None else root)[1]
    if reason is None and _state is False:
        return "some of its modules were imported as Python before the build's"
    return reason
