"""A project on disk: its ``phloemfile.py``, its link to a platform branch, and the plan
that turns the declared functions into deployments.

    project = load_project(Path("."))
    plan = make_plan(client, project, branch="main")
    for item in plan: print(item.slug, item.action, item.reasons)
    results = apply_plan(client, project, plan, branch="main", progress=print)
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phloem.config import BranchInfo, Config, Function
from phloem.project import neon
from phloem.project.client import Client, ClientError
from phloem.project.neon import find_neon_config
from phloem.project.packing import pack_directory
from phloem.runtimes.base import Runtime
from phloem.runtimes.registry import (
    answers_to,
    runtime_for_source,
    satisfies,
    source_suffixes,
)
from phloem.system.limits import check_limits
from phloem.system.validation import InvalidInput, check_env, check_name, check_slug

CONFIG_FILE = "phloemfile.py"
LINK_FILE = Path(".phloem") / "link.json"


class ConfigError(ValueError):
    """Names the file, the key and the rule."""


@dataclass(frozen=True)
class DesiredFunction:
    slug: str
    name: str
    entry: str
    #: As the config asks for it: an exact version, or a family (``python``: whichever
    #: version the platform runs).
    runtime: str
    env: dict[str, str]
    limits: dict[str, Any]


def _runtime(where: str, source: str, path: Path, requested: Any) -> tuple[Runtime, str]:
    """The runtime of a function whose code is ``path`` and the name to deploy it with
    (``requested``, else the runtime's family)."""
    rt = runtime_for_source(path)
    if rt is None:
        raise ConfigError(f"{where}.source: {source!r} is not a source file of any runtime "
                          f"({source_suffixes()})")
    if requested is not None and (not isinstance(requested, str)
                                  or not answers_to(rt, requested)):
        raise ConfigError(f"{where}.runtime: unknown runtime {requested!r} "
                          f"(known: {', '.join(rt.known_names)})")
    return rt, requested or rt.family


def _entry(where: str, rt: Runtime, source: str, attr: str | None) -> str:
    entry = rt.entry_for_source(source, attr)
    try:
        return rt.check_entry(entry)
    except InvalidInput as exc:
        raise ConfigError(f"{where}.entry: {exc.message}") from None


@dataclass
class Project:
    """A project root and how to turn its config into the functions a branch should run.

    ``config_file`` is ``phloemfile.py`` (Python) or ``neon.ts`` (Node, Neon's shape)."""

    root: Path
    config_file: str
    resolver: Callable[[BranchInfo], dict[str, DesiredFunction]]

    def desired(self, branch: BranchInfo) -> dict[str, DesiredFunction]:
        return self.resolver(branch)


def _python_desired(root: Path, config: Config, branch: BranchInfo) -> dict[str, DesiredFunction]:
    overrides: Mapping[str, Any] = {}
    if config.branch is not None:
        try:
            overrides = config.branch(branch) or {}
        except Exception as exc:
            raise ConfigError(f"{CONFIG_FILE}: branch: the callback raised {exc!r}") \
                from None
    per_fn = overrides.get("functions", {}) if isinstance(overrides, Mapping) else {}
    out: dict[str, DesiredFunction] = {}
    for slug, fn in config.functions.items():
        extra = per_fn.get(slug, {}) if isinstance(per_fn, Mapping) else {}
        out[slug] = _resolve(root, slug, fn, extra)
    for slug in per_fn if isinstance(per_fn, Mapping) else ():
        if slug not in config.functions:
            raise ConfigError(f"{CONFIG_FILE}: branch: functions.{slug}: no such "
                              "function is defined")
    return out


def _resolve(root: Path, slug: str, fn: Function, extra: Mapping[str, Any]) -> DesiredFunction:
    where = f"{CONFIG_FILE}: functions.{slug}"
    try:
        check_slug(slug)
    except InvalidInput as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    unknown = set(extra) - {"name", "env", "runtime", "limits", "entry"}
    if unknown:
        raise ConfigError(f"{where}: branch override has unknown keys {sorted(unknown)}")
    source = root / fn.source
    if not source.is_file():
        raise ConfigError(f"{where}.source: file {fn.source!r} does not exist")
    rt, runtime = _runtime(where, fn.source, source, extra.get("runtime", fn.runtime))
    entry = _entry(where, rt, source.relative_to(root).as_posix(),
                   extra.get("entry", fn.entry))
    env = {**dict(fn.env), **dict(extra.get("env", {}))}
    try:
        check_env(env)
        limits = check_limits({**dict(fn.limits), **dict(extra.get("limits", {}))})
        name = extra.get("name", fn.name) or slug
        check_name(name)
    except InvalidInput as exc:
        raise ConfigError(f"{where}.{exc.field}: {exc.message}") from None
    return DesiredFunction(slug=slug, name=name, entry=entry, runtime=runtime, env=env,
                           limits=limits)


def find_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if ((d / CONFIG_FILE).is_file() or (d / LINK_FILE).is_file()
                or find_neon_config(d) is not None):
            return d
    return None


def load_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (``export``, quotes and comments allowed)."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def load_project(root: Path, env_file: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> Project:
    """Read the project at ``root``: ``phloemfile.py`` if there is one, else ``neon.ts``
    (after loading ``env_file`` into the environment; both configs may read it)."""
    path = root / CONFIG_FILE
    neon_path = find_neon_config(root)
    if not path.is_file() and neon_path is None:
        raise ConfigError(f"{path}: not found, nor a neon.ts (create one with 'phloem init')")
    if env_file is not None:
        if not env_file.is_file():
            raise ConfigError(f"--env {env_file}: file not found")
        for key, value in load_dotenv(env_file).items():
            os.environ.setdefault(key, value)
    if not path.is_file():
        assert neon_path is not None
        return Project(root=root, config_file=neon_path.name,
                       resolver=lambda branch: _neon_desired(root, neon_path, branch,
                                                             progress))
    sys.path.insert(0, str(root))
    try:
        namespace = runpy.run_path(str(path), run_name="phloemfile")
    except Exception as exc:
        raise ConfigError(f"{CONFIG_FILE}: evaluating it raised {exc!r}") from None
    finally:
        sys.path.remove(str(root))
    config = namespace.get("config")
    if not isinstance(config, Config):
        raise ConfigError(f"{CONFIG_FILE}: must set config = define_config(...) (from "
                          "phloem.config)")
    for slug, fn in config.functions.items():
        if not isinstance(fn, Function):
            raise ConfigError(f"{CONFIG_FILE}: functions.{slug}: must be a Function(...)")
    return Project(root=root, config_file=CONFIG_FILE,
                   resolver=lambda branch: _python_desired(root, config, branch))


# -- neon.ts ---------------------------------------------------------------------
NEON_FUNCTION_KEYS = {"name", "source", "env", "limits", "runtime", "bundler",
                      "externalPackages", "dev", "customDomains"}
NEON_TUNING_KEYS = {"name", "env", "limits", "runtime", "customDomains"}


def _neon_desired(root: Path, config_path: Path, branch: BranchInfo,
                  progress: Callable[[str], None] | None) -> dict[str, DesiredFunction]:
    name = config_path.name
    target = {"name": branch.name, "id": branch.id, "exists": True,
              "isDefault": branch.name == "main"}
    try:
        raw = neon.evaluate(config_path, target, progress)
    except neon.NeonConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    unsupported = raw.get("unsupported") or []
    if unsupported:
        what = ", ".join(f"{label} ({key})" for key, label in unsupported)
        raise ConfigError(
            f"{name}: enables services phloem does not provide: {what}. Remove them from "
            f"{name}: parseEnv(config) would demand their variables, which phloem cannot "
            "inject.")
    tuning = raw.get("tuning") or {}
    per_fn: dict[str, Any] = tuning.get("functions") or {}
    functions: dict[str, Any] = raw.get("functions") or {}
    out: dict[str, DesiredFunction] = {}
    for slug, spec in functions.items():
        out[slug] = _resolve_node(root, name, slug, spec, per_fn.get(slug) or {})
    for slug in per_fn:
        if slug not in functions:
            raise ConfigError(f"{name}: branch: functions.{slug}: no such function is "
                              "declared")
    return out


def _resolve_node(root: Path, config_name: str, slug: str, spec: Mapping[str, Any],
                  extra: Mapping[str, Any]) -> DesiredFunction:
    where = f"{config_name}: functions.{slug}"
    try:
        check_slug(slug)
    except InvalidInput as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    unknown = sorted(set(spec) - NEON_FUNCTION_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: "
                          f"{', '.join(sorted(NEON_FUNCTION_KEYS))})")
    unknown = sorted(set(extra) - NEON_TUNING_KEYS)
    if unknown:
        raise ConfigError(f"{config_name}: branch: functions.{slug}.{unknown[0]}: unknown "
                          f"key (known: {', '.join(sorted(NEON_TUNING_KEYS))})")
    source = spec.get("source")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}.source: must be a non-empty string (the entry file)")
    path = (root / source).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ConfigError(f"{where}.source: {source!r} is outside the project")
    if not path.is_file():
        raise ConfigError(f"{where}.source: file {source!r} does not exist")
    rt, runtime = _runtime(where, source, path,
                           extra.get("runtime", spec.get("runtime")) or None)
    entry = _entry(where, rt, path.relative_to(root.resolve()).as_posix(), None)
    env = {**dict(spec.get("env") or {}), **dict(extra.get("env") or {})}
    try:
        check_env(env)
        limits = check_limits({**dict(spec.get("limits") or {}),
                               **dict(extra.get("limits") or {})})
        name = extra.get("name", spec.get("name")) or slug
        if not isinstance(name, str):
            raise InvalidInput("name", "must be a string")
        check_name(name)
    except InvalidInput as exc:
        raise ConfigError(f"{where}.{exc.field}: {exc.message}") from None
    return DesiredFunction(slug=slug, name=name, entry=entry, runtime=runtime, env=env,
                           limits=limits)


# -- links ---------------------------------------------------------------------
def read_link(root: Path) -> dict[str, str]:
    try:
        data: dict[str, str] = json.loads((root / LINK_FILE).read_text())
        return data
    except (OSError, ValueError):
        return {}


def write_link(root: Path, api_url: str, branch: str) -> Path:
    path = root / LINK_FILE
    path.parent.mkdir(exist_ok=True)
    (path.parent / ".gitignore").write_text("*\n")
    path.write_text(json.dumps({"api_url": api_url, "branch": branch}, indent=2) + "\n")
    return path


# -- plan and apply ------------------------------------------------------------
@dataclass
class PlanItem:
    slug: str
    action: str  # create | update | delete | unchanged
    reasons: list[str] = field(default_factory=list)
    desired: DesiredFunction | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"slug": self.slug, "action": self.action, "reasons": self.reasons}


def make_plan(client: Client, project: Project, branch: str,
              artifact_sha: str) -> list[PlanItem]:
    info = client.get_branch(branch)
    desired = project.desired(BranchInfo(name=info["name"], id=info["id"]))
    live = {f["slug"]: f for f in client.list_functions(branch)}
    plan: list[PlanItem] = []
    for slug, want in sorted(desired.items()):
        fn = live.get(slug)
        active = None
        if fn is not None and fn["deployment_id"]:
            active = client.get_deployment(fn["deployment_id"])
        if active is None:
            plan.append(PlanItem(slug, "create", ["not deployed"], want))
            continue
        reasons = []
        if active["artifact_sha256"] != artifact_sha:
            reasons.append("source changed")
        if active["entry"] != want.entry:
            reasons.append(f"entry {active['entry']} -> {want.entry}")
        if not satisfies(active["runtime"], want.runtime):
            reasons.append(f"runtime {active['runtime']} -> {want.runtime}")
        if fn is not None and fn["name"] != want.name:
            reasons.append(f"name {fn['name']!r} -> {want.name!r}")
        if (active.get("limits") or {}) != want.limits:
            reasons.append("limits changed")
        keys = set(active["env_keys"])
        added, removed = sorted(set(want.env) - keys), sorted(keys - set(want.env))
        if added:
            reasons.append(f"env added {', '.join(added)}")
        if removed:
            reasons.append(f"env removed {', '.join(removed)}")
        if not added and not removed and client.env_digest(want.env) != active["env_digest"]:
            reasons.append("env values changed")
        plan.append(PlanItem(slug, "update" if reasons else "unchanged", reasons, want))
    for slug in sorted(set(live) - set(desired)):
        plan.append(PlanItem(slug, "delete", [f"not in {project.config_file}"]))
    return plan


@dataclass
class ApplyResult:
    slug: str
    action: str
    ok: bool
    detail: str


def apply_plan(client: Client, project: Project, plan: list[PlanItem], branch: str,
               artifact: tuple[bytes, str], progress: Callable[[str], None]) -> list[ApplyResult]:
    """Make the plan so, functions in parallel; failures are reported, others applied."""
    data, sha = artifact
    work = [i for i in plan if i.action != "unchanged"]
    if any(i.action in ("create", "update") for i in work):
        progress(f"uploading {len(data) / 1024:.1f} KiB ({sha[:12]})")
        client.upload(data, sha)

    def run(item: PlanItem) -> ApplyResult:
        try:
            if item.action == "delete":
                client.delete_function(branch, item.slug)
                return ApplyResult(item.slug, "delete", True, "deleted")
            want = item.desired
            assert want is not None
            dep = client.deploy_artifact(
                branch, item.slug, sha, want.entry, env=want.env, name=want.name,
                runtime=want.runtime, limits=want.limits, replace_env=True,
                progress=lambda line: progress(f"{item.slug}: {line}"))
        except ClientError as exc:
            return ApplyResult(item.slug, item.action, False, str(exc))
        if dep["status"] != "ready":
            return ApplyResult(item.slug, item.action, False, str(dep["error"]))
        return ApplyResult(item.slug, item.action, True, dep["id"])

    if not work:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(work))) as pool:
        return list(pool.map(run, work))


def pack_project(project: Project) -> tuple[bytes, str]:
    # The config is not code: editing it changes the plan through env/name/..., not by
    # changing every function's source hash.
    # A Node function may import its neon.ts (parseEnv(config)), so that one is packed.
    return pack_directory(project.root, ignore=[f"/{CONFIG_FILE}"])
