"""The platform's cgroup tree, the same shape in every hierarchy used:

    <the platform process's own cgroup>/
        phloem-<hash of the data dir>/     the platform parent (removed at stop)
            fn-<function id>/              per function (removed with its last isolate)
                <isolate id>/              per isolate: the limits (removed when it exits)

v1 keeps one such tree per controller hierarchy (memory, pids, cpu); v2 one tree with
the controllers enabled down to the isolates. Subclasses say which files hold a limit.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from phloem.supervisor.cgroups.hierarchy import is_orphan, remove_tree
from phloem.supervisor.cgroups.slot import CgroupSlot
from phloem.system.limits import FunctionLimits

OLD_MIN_AGE_S = 60.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class CgroupError(RuntimeError):
    """A cgroup could not be made or limited; the message names the file."""


def function_dir_name(function_id: str | None) -> str:
    name = function_id or "none"
    if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise CgroupError(f"function id {name!r} cannot name a cgroup")
    return name if name.startswith("fn-") else f"fn-{name}"


def write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


class CgroupLimiter:
    name = "cgroup"
    #: Where the memory controller reports OOM kills, and under which key.
    oom_file = ""
    oom_key = "oom_kill"
    #: Limit files written only where the kernel has them, errors ignored (swap).
    optional_files = frozenset({"memory.memsw.limit_in_bytes", "memory.swap.max"})

    def __init__(self, parents: dict[str, Path], *, own: dict[str, Path] | None = None,
                 defaults: FunctionLimits | None = None) -> None:
        #: Controller -> the platform parent in its hierarchy; "memory" is always there.
        self.parents = parents
        #: Controller -> the cgroup the parent was made in (the platform's own).
        self.own = own or {c: p.parent for c, p in parents.items()}
        self.defaults = defaults or FunctionLimits()
        self._lock = threading.Lock()
        # Unique directories, the memory hierarchy's first (v2: one for all controllers).
        self._trees = list(dict.fromkeys([parents["memory"], *parents.values()]))

    # -- per hierarchy specifics -------------------------------------------------------
    def _limit_files(self, limit_bytes: int, limits: FunctionLimits
                     ) -> dict[str, dict[str, str]]:
        """Controller -> limit file name -> value, in the order they are written."""
        raise NotImplementedError

    def _made_inner(self, directory: Path) -> None:
        """Called for a new parent or function directory (v2 enables controllers)."""

    # -- isolates ----------------------------------------------------------------------
    def prepare(self, isolate_id: str, limit_bytes: int, *, function_id: str | None = None,
                limits: FunctionLimits | None = None) -> CgroupSlot:
        """Make the isolate's groups below its function's and set their limits."""
        if not _SAFE_NAME.fullmatch(isolate_id):
            raise CgroupError(f"isolate id {isolate_id!r} cannot name a cgroup")
        fn = function_dir_name(function_id)
        files = self._limit_files(limit_bytes, limits or self.defaults)
        dirs: list[Path] = []
        of: dict[Path, Path] = {}  # tree -> the isolate's directory in it
        with self._lock:  # against a concurrent removal of the function's directory
            for tree in self._trees:
                if not tree.is_dir():
                    tree.mkdir()
                    self._made_inner(tree)
                fn_dir = tree / fn
                if not fn_dir.is_dir():
                    fn_dir.mkdir()
                    self._made_inner(fn_dir)
                d = fn_dir / isolate_id
                d.mkdir(exist_ok=True)
                dirs.append(d)
                of[tree] = d
        slot = CgroupSlot(dirs, limit_bytes, self.oom_file, self.oom_key,
                          on_removed=lambda: self._remove_function(fn))
        try:
            for controller, parent in self.parents.items():
                d = of[parent]
                for name, value in files.get(controller, {}).items():
                    if name not in self.optional_files:
                        write(d / name, value)
                    elif (d / name).exists():
                        with contextlib.suppress(CgroupError):
                            write(d / name, value)
        except BaseException:
            slot.remove()
            raise
        return slot

    def _remove_function(self, fn: str) -> None:
        """The function's directories go with its last isolate (rmdir fails while any
        isolate group is left below them)."""
        with self._lock:
            for tree in self._trees:
                with contextlib.suppress(OSError):
                    (tree / fn).rmdir()

    # -- the platform's lifetime -------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"backend": self.name,
                "parent": str(self.parents["memory"]),
                "hierarchies": {c: str(p) for c, p in sorted(self.parents.items())}}

    def sweep(self, record: Path | None = None, old_roots: list[Path] | None = None
              ) -> list[Path]:
        """At start: remove what a killed platform left under the parent (every process
        there is an orphaned isolate: the data dir's lock says no other platform uses
        it), under the parents recorded in ``record`` by that run, and, for orphaned
        isolates only, under ``old_roots`` (shared by all platforms of old versions, so
        a process there is killed only if orphaned, a group removed only if older than
        ``OLD_MIN_AGE_S``; the old root itself stays: a running old version needs it).
        Then record this run's parents. Returns the groups that could not be removed."""
        left: list[Path] = []
        previous: list[Path] = []
        if record is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                previous = [Path(p) for p in json.loads(record.read_text())]
        for parent in dict.fromkeys([*self.parents.values(), *previous]):
            if parent.name.startswith("phloem-"):  # never anything the record did not make
                left += remove_tree(parent)
        for old in old_roots or []:
            if old.is_dir():
                for child in sorted(old.iterdir()):
                    # A young group may be an old-version platform's isolate about to join.
                    if child.is_dir() and time.time() - child.stat().st_mtime > OLD_MIN_AGE_S:
                        left += remove_tree(child, kill=is_orphan)
        if record is not None:
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps([str(p) for p in self.parents.values()]))
            tmp.replace(record)
        return left

    def close(self, record: Path | None = None) -> list[Path]:
        """At stop, after the isolates: remove the platform parent (killing what is
        still in it). Returns the groups that could not be removed."""
        left: list[Path] = []
        with self._lock:
            for tree in self._trees:
                left += remove_tree(tree)
        if record is not None and not left:
            record.unlink(missing_ok=True)
        return left
