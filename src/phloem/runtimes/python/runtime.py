"""The Python (ASGI) runtime: ``requirements.txt`` into a shared environment, the host
``phloem.runtimes.python.host`` serving ``module:attr``, isolates forked from a zygote.

    rt = PYTHON
    rt.build(ctx)        # envs/python/<key> for requirements.txt, linked as <out>/env
    rt.isolate(ctx)      # python -m phloem.runtimes.python.host --app main:app, PYTHONPATH
                         # = source, env/site, the isolate runtime; a ZygoteStart

In ``phloem dev`` the developer's interpreter runs the function with the developer's
``PYTHONPATH`` and installed packages (nothing is installed).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from phloem.runtimes.base import (
    BuildContext,
    BuildFailed,
    IsolateContext,
    IsolatePlan,
    Log,
    Toolbox,
)
from phloem.runtimes.build import outside_system
from phloem.runtimes.python import environment as pyenv
from phloem.runtimes.python.zygote_spawner import ZygoteSpawner, ZygoteStart
from phloem.supervisor.isolate import Spawner
from phloem.system.validation import check_entry

HOST_MODULE = "phloem.runtimes.python.host"
#: Default entries: the first of these files in the source, serving its ``app``.
DEFAULT_MODULES = ("main", "app")
_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


class PythonRuntime:
    family: str = "python"
    #: The version isolates run: phloem's own (the isolates' interpreter is of the same
    #: major.minor, see ``find_isolate_python``).
    name: str = f"python{_VERSION}"
    known_names: tuple[str, ...] = tuple(dict.fromkeys(
        ("python3.11", "python3.12", "python3.13", "python3.14", f"python{_VERSION}")))
    source_suffixes: tuple[str, ...] = (".py",)
    entry_example: str = "main:app"
    bundles: bool = False
    prebuilt_suffixes: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._runtime_dirs: dict[Path, Path] = {}
        self._lock = threading.Lock()

    # -- entries ----------------------------------------------------------------------
    def check_entry(self, entry: str) -> str:
        return check_entry(entry)

    def default_entry(self, source: Path) -> str | None:
        for module in DEFAULT_MODULES:
            if (source / f"{module}.py").is_file():
                return f"{module}:app"
        return None

    def entry_for_source(self, source: str, attr: str | None) -> str:
        module = ".".join(Path(source).with_suffix("").parts)
        return f"{module}:{attr or 'app'}"

    # -- builds -----------------------------------------------------------------------
    def runtime_dir(self, toolbox: Toolbox) -> Path | None:
        """uvicorn and phloem's host, copied for isolates (built once per content);
        ``None`` in ``phloem dev``, whose interpreter has them."""
        if toolbox.developer:
            return None
        base = toolbox.tools_dir(self.family)
        with self._lock:
            if base not in self._runtime_dirs:
                self._runtime_dirs[base] = pyenv.ensure_runtime(base)
            return self._runtime_dirs[base]

    def prepare(self, toolbox: Toolbox, log: Log) -> None:
        self.runtime_dir(toolbox)

    def build(self, ctx: BuildContext) -> None:
        tb = ctx.toolbox
        if tb.developer:
            return  # the developer's interpreter has what the app needs
        requirements = _read_requirements(ctx.source)
        pip = pyenv.Pip(tb.python, tb.build_python()) if tb.runner.sandboxed else None
        # One build per environment at a time: the others then find it made.
        with tb.locks(f"python-env-{pyenv.requirements_key(requirements)}"):
            env_dir = pyenv.ensure_function_env(
                tb.envs_dir(self.family), requirements, ctx.log, source=ctx.source,
                runner=tb.runner, pip=pip)
        if env_dir is not None:
            (ctx.out / "env").symlink_to(env_dir)

    # -- isolates ---------------------------------------------------------------------
    def isolate(self, ctx: IsolateContext) -> IsolatePlan:
        tb = ctx.toolbox
        env_link = ctx.out / "env"
        env_dir = env_link.resolve() if env_link.exists() else None
        runtime_dir = self.runtime_dir(tb)
        path = [str(ctx.source)]
        if env_dir is not None:
            path.append(str(env_dir / "site"))
        if runtime_dir is not None:
            path.append(str(runtime_dir))
        else:  # phloem dev: the developer's own PYTHONPATH after the project
            path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {"PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}
        if not tb.developer:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        ro = [str(p) for p in (runtime_dir, env_dir) if p is not None]
        ro += outside_system({Path(tb.python).resolve().parent})
        start = None
        if runtime_dir is not None:
            start = ZygoteStart(interpreter=tb.python, runtime_dir=str(runtime_dir),
                                entry=ctx.entry, path=tuple(path))
        return IsolatePlan(
            command=[tb.python, "-m", HOST_MODULE, "--app", ctx.entry],
            check=[tb.python, "-m", HOST_MODULE, "--check", "--app", ctx.entry],
            env=env, ro=ro, start=start)

    def spawner(self, toolbox: Toolbox, fallback: Spawner) -> Spawner | None:
        runtime_dir = self.runtime_dir(toolbox)
        if runtime_dir is None:
            return None
        return ZygoteSpawner(fallback, warm=[(toolbox.python, runtime_dir)])


def _read_requirements(source: Path) -> str:
    path = source / "requirements.txt"
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BuildFailed("requirements.txt: must be UTF-8 text") from None


PYTHON = PythonRuntime()
