"""Config as code: what ``phloemfile.py`` at a project's root declares.

    # phloemfile.py
    import os
    from phloem.config import Function, Trigger, define_config

    config = define_config(
        functions={
            "todos": Function(name="todo api", source="src/app.py", entry="app",
                              env={"OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "")}),
        },
        triggers={"nightly": Trigger(function="todos", cron="0 3 * * *",
                                     function_path="/cleanup")},
        branch=lambda branch: {"functions": {"todos": {"env": {"MODE": branch.name}}}},
    )

Function code reads the injected variables with :func:`parse_env`:

    from phloem.config import parse_env
    env = parse_env(config)            # or parse_env(config, keys=["DATABASE_URL"])
    env.DATABASE_URL

(The file is called ``phloemfile.py``, not ``phloem.py``: that would shadow this package
for code run from the project root.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

INJECTED = ("DATABASE_URL", "DATABASE_URL_UNPOOLED", "PHLOEM_BRANCH", "NEON_BRANCH")


@dataclass(frozen=True)
class Function:
    """One function: ``source`` is its Python file (relative to the project root),
    ``entry`` the ASGI attribute in it (default ``app``). ``custom_domains``: host names
    it is served at too (``phloem domains``), on the default branch only, as neon.ts's
    ``customDomains``; a ``branch=`` callback's ``{"functions": {slug:
    {"custom_domains": [...]}}}`` sets another branch's (``[]``: none)."""

    source: str
    entry: str = "app"
    name: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    runtime: str | None = None
    limits: Mapping[str, float] = field(default_factory=dict)
    custom_domains: Iterable[str] = ()


@dataclass(frozen=True)
class Trigger:
    """A schedule trigger (``@neon/config``'s ``triggers``): POST to ``function`` at
    ``function_path`` when ``cron`` (five fields, UTC, at most once a minute) matches.
    The request carries ``X-Neon-Invocation-Id`` and ``traceparent``; its JSON body is
    ``{version, invocation_id, trigger, data}``. A child branch gets it disabled."""

    function: str
    cron: str
    function_path: str = "/"
    enabled: bool = True

    def declared(self) -> dict[str, Any]:
        """As neon.ts declares it (what the API takes)."""
        return {"function": self.function, "cron": self.cron,
                "functionPath": self.function_path, "enabled": self.enabled}


@dataclass(frozen=True)
class BranchInfo:
    """What a ``branch=`` callback is given (a neon.ts ``branch`` closure gets the same,
    camelCased: ``name``, ``id``, ``exists``, ``parentId``, ``isDefault``,
    ``isProtected``, ``expiresAt``)."""

    name: str
    id: str
    exists: bool = True
    parent_id: str | None = None
    is_default: bool = False
    is_protected: bool = False
    #: ISO 8601 (UTC) when the branch is deleted; None: never.
    expires_at: str | None = None


@dataclass(frozen=True)
class Config:
    functions: Mapping[str, Function]
    branch: Callable[[BranchInfo], Mapping[str, Any]] | None = None
    triggers: Mapping[str, Trigger] = field(default_factory=dict)


def define_config(functions: Mapping[str, Function] | None = None,
                  branch: Callable[[BranchInfo], Mapping[str, Any]] | None = None,
                  triggers: Mapping[str, Trigger] | None = None) -> Config:
    return Config(functions=dict(functions or {}), branch=branch,
                  triggers=dict(triggers or {}))


class EnvError(RuntimeError):
    pass


class Env:
    """Attribute access to validated variables."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> str:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict[str, str]:
        return dict(self._values)


def parse_env(config: Config | None = None, keys: Iterable[str] | None = None,
              environ: Mapping[str, str] | None = None) -> Env:
    """The injected variables (and those of ``keys``), all required and non-empty: a
    missing one raises :class:`EnvError` naming every missing variable (Neon's
    ``parseEnv``). ``config`` is accepted for symmetry; phloem has no optional services
    whose variables it would add."""
    source = os.environ if environ is None else environ
    wanted = list(keys) if keys is not None else list(INJECTED)
    missing = [k for k in wanted if not source.get(k)]
    if missing:
        raise EnvError("missing environment variables: " + ", ".join(missing) +
                       " (phloem injects them into functions; locally use "
                       "'phloem env run -- CMD' or 'phloem env pull')")
    _ = config
    return Env({k: source[k] for k in wanted})
