"""A project on disk: its ``phloemfile.py``, its link to a platform branch, and the plan
that turns the declared functions into deployments.

    project = load_project(Path("."))
    pp = plan_project(client, project, "main", artifact_sha, owner)
    for item in pp.items: print(item.slug, item.action, item.reasons)
    results = apply_plan(client, project, pp.items, "main", artifact, print, owner=owner)
    client.set_branch_lifetime("main", pp.branch_changes())   # ttl / protected, if any
"""

from __future__ import annotations

import json
import os
import runpy
import secrets
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phloem.config import BranchInfo, Config, Function, Trigger
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
    #: ``dev.port`` of a neon.ts function: the port ``phloem dev`` serves it on, exactly.
    dev_port: int | None = None
    #: False (neon.ts ``bundler: "none"``): the entry is deployed as it is, not bundled.
    bundle: bool = True


@dataclass(frozen=True)
class BranchSettings:
    """What a config's ``branch`` closure asks of the branch itself (neon.ts ``ttl``,
    ``protected``); None: not asked, left as it is."""

    ttl_s: int | None = None
    protected: bool | None = None


@dataclass(frozen=True)
class Resolved:
    """A config evaluated for one branch."""

    functions: dict[str, DesiredFunction]
    branch: BranchSettings = field(default_factory=BranchSettings)
    #: neon.ts top-level ``triggers`` as declared (plain JSON), for the triggers code.
    triggers: dict[str, Any] | None = None
    #: The branch services a neon.ts declares (service -> config; ``{}``: none, so those
    #: the branch has go); None: the config cannot declare them (phloemfile.py).
    services: dict[str, dict[str, Any]] | None = None


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
    resolver: Callable[[BranchInfo], Resolved]
    #: Schedule triggers as neon.ts declares them (name -> {function, cron,
    #: functionPath?, enabled?}); a neon.ts's are known once :meth:`desired` ran.
    triggers: dict[str, Any] = field(default_factory=dict)

    def desired(self, branch: BranchInfo) -> dict[str, DesiredFunction]:
        return self.resolver(branch).functions

    def resolve(self, branch: BranchInfo) -> Resolved:
        return self.resolver(branch)


def branch_info(info: Mapping[str, Any], exists: bool = True) -> BranchInfo:
    """The ``BranchInfo`` of a branch as the API describes it (``GET /branches/{ref}``)."""
    expires = info.get("expires_at")
    return BranchInfo(name=info["name"], id=info["id"], exists=exists,
                      parent_id=info.get("parent_id"),
                      is_default=info["name"] == "main",
                      is_protected=bool(info.get("protected")),
                      expires_at=str(expires) if expires else None)


def _check_trigger_functions(config_name: str, triggers: Mapping[str, Any],
                             functions: Mapping[str, Any]) -> dict[str, Any]:
    """Each trigger names a function the project declares (the rest is the API's)."""
    for name, spec in triggers.items():
        fn = spec.get("function") if isinstance(spec, Mapping) else None
        if fn not in functions:
            raise ConfigError(f"{config_name}: triggers.{name}.function: {fn!r} is not a "
                              f"function of this project ({', '.join(functions) or 'none'})")
    return dict(triggers)


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


#: Read from the project root, when present, before its config is evaluated (as Neon's
#: CLI does); later files win over earlier ones, and the environment over all of them.
PROJECT_DOTENV_FILES = (".env", ".env.local")


def parse_dotenv(text: str) -> dict[str, str]:
    """KEY=VALUE lines (``export``, quotes and comments allowed)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = value.replace('\\"', '"').replace("\\\\", "\\")
        out[key.strip()] = value
    return out


def load_dotenv(path: Path) -> dict[str, str]:
    """The variables of an optional dotenv file (``{}`` if there is none)."""
    if not path.is_file():
        return {}
    return parse_dotenv(path.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a dotenv file the user named (``--env``): any readable file,
    a pipe too (``--env <(echo K=V)``, read once); raises ``ConfigError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:  # not is_file(): a FIFO is not a file
            text = f.read()
    except IsADirectoryError:
        raise ConfigError(f"--env {path}: is a directory, not a dotenv file") from None
    except FileNotFoundError:
        raise ConfigError(f"--env {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--env {path}: cannot read it: {exc}") from None
    return parse_dotenv(text)


def project_env(root: Path, env_file: Path | None = None) -> dict[str, str]:
    """What a config sees besides the process environment: the project's ``.env``, then
    its ``.env.local``, then ``env_file`` (each overriding the one before)."""
    values: dict[str, str] = {}
    for name in PROJECT_DOTENV_FILES:
        values.update(load_dotenv(root / name))
    if env_file is not None:
        values.update(read_env_file(env_file))
    return values


def load_project(root: Path, env_file: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> Project:
    """Read the project at ``root``: ``phloemfile.py`` if there is one, else ``neon.ts``,
    after loading into the environment the project's ``.env`` and ``.env.local`` and
    ``env_file`` (see :func:`project_env`; a variable already set is kept)."""
    path = root / CONFIG_FILE
    neon_path = find_neon_config(root)
    if not path.is_file() and neon_path is None:
        raise ConfigError(f"{path}: not found, nor a neon.ts (create one with 'phloem init')")
    for key, value in project_env(root, env_file).items():
        os.environ.setdefault(key, value)
    if not path.is_file():
        assert neon_path is not None
        project = Project(root=root, config_file=neon_path.name,
                          resolver=lambda branch: _neon_resolve(root, neon_path, branch,
                                                                progress, project))
        return project
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
    for name, trig in config.triggers.items():
        if not isinstance(trig, Trigger):
            raise ConfigError(f"{CONFIG_FILE}: triggers.{name}: must be a Trigger(...)")
    triggers = _check_trigger_functions(
        CONFIG_FILE, {n: t.declared() for n, t in config.triggers.items()},
        config.functions)
    return Project(root=root, config_file=CONFIG_FILE,
                   resolver=lambda branch: Resolved(_python_desired(root, config, branch)),
                   triggers=triggers)


# -- neon.ts ---------------------------------------------------------------------
NEON_FUNCTION_KEYS = {"name", "source", "env", "limits", "runtime", "bundler",
                      "externalPackages", "dev"}
NEON_TUNING_KEYS = {"name", "env", "limits", "runtime"}
#: What a neon.ts ``branch`` closure may return besides ``functions``, and why the keys
#: Neon has that phloem does not honour are refused.
NEON_BRANCH_KEYS = {"ttl", "protected"}
NEON_BRANCH_REFUSED = {
    "postgres": "compute settings size Neon's autoscaling computes; a phloem branch is one "
                "PostgreSQL server without compute sizes",
    "auth": "Neon Auth is a service phloem does not provide",
    "dataApi": "the Data API is a service phloem does not provide",
}
NEON_BUNDLERS = ("esbuild", "none")
TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _neon_resolve(root: Path, config_path: Path, branch: BranchInfo,
                  progress: Callable[[str], None] | None,
                  project: Project | None = None) -> Resolved:
    name = config_path.name
    target = {"name": branch.name, "id": branch.id, "exists": branch.exists,
              "parentId": branch.parent_id, "isDefault": branch.is_default,
              "isProtected": branch.is_protected, "expiresAt": branch.expires_at}
    try:
        raw = neon.evaluate(config_path, target, progress)
    except neon.NeonConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    unsupported = raw.get("unsupported") or []
    if unsupported:
        what = ", ".join(f"{label} ({key})" for key, label in unsupported)
        raise ConfigError(
            f"{name}: enables a service phloem does not provide: {what}. Remove it from "
            f"{name}: parseEnv(config) would demand their variables, which phloem cannot "
            "inject.")
    refused = raw.get("refused") or []
    if refused:
        raise ConfigError(f"{name}: " + "; ".join(f"{key}: {why}" for key, why in refused))
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
    triggers = _check_trigger_functions(name, raw.get("triggers") or {}, functions)
    if project is not None:
        project.triggers = triggers
    services: dict[str, dict[str, Any]] = raw.get("services") or {}
    return Resolved(out, _branch_settings(name, branch, tuning), triggers or None, services)


def _branch_settings(config_name: str, branch: BranchInfo,
                     tuning: Mapping[str, Any]) -> BranchSettings:
    where = f"{config_name}: branch"
    for key in sorted(set(tuning) - NEON_BRANCH_KEYS - {"functions"}):
        why = NEON_BRANCH_REFUSED.get(key, f"unknown key (known: functions, "
                                           f"{', '.join(sorted(NEON_BRANCH_KEYS))})")
        raise ConfigError(f"{where}: {key}: {why}")
    protected = tuning.get("protected")
    if protected is not None and not isinstance(protected, bool):
        raise ConfigError(f"{where}: protected: must be true or false (got {protected!r})")
    ttl = tuning.get("ttl")
    ttl_s = None if ttl is None else parse_ttl(f"{where}: ttl", ttl)
    if ttl_s is not None and branch.is_default:
        raise ConfigError(f"{where}: ttl: the default branch ({branch.name}) cannot expire")
    if ttl_s is not None and (protected or (protected is None and branch.is_protected)):
        raise ConfigError(f"{where}: ttl: a protected branch cannot expire "
                          f"({branch.name} is protected)")
    return BranchSettings(ttl_s=ttl_s, protected=protected)


def parse_ttl(where: str, ttl: Any) -> int:
    """A branch's time to live in seconds: ``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``,
    ``"2w"``, or a number of seconds."""
    if isinstance(ttl, bool):
        raise ConfigError(f"{where}: must be a duration such as \"7d\" (got {ttl!r})")
    if isinstance(ttl, int | float):
        seconds = int(ttl)
    elif isinstance(ttl, str) and len(ttl) > 1 and ttl[:-1].strip().isdigit() \
            and ttl[-1] in TTL_UNITS:
        seconds = int(ttl[:-1].strip()) * TTL_UNITS[ttl[-1]]
    else:
        raise ConfigError(f"{where}: must be a duration such as \"7d\", \"12h\", \"30m\" or "
                          f"\"90s\" (got {ttl!r})")
    if seconds < 1:
        raise ConfigError(f"{where}: must be at least 1 second (got {ttl!r})")
    return seconds


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
    bundler = spec.get("bundler", "esbuild")
    if bundler not in NEON_BUNDLERS:
        raise ConfigError(f"{where}.bundler: must be \"esbuild\" (phloem bundles the source) "
                          f"or \"none\" (the entry is deployed as it is); got {bundler!r}")
    if bundler == "none" and not entry.endswith(rt.prebuilt_suffixes):
        raise ConfigError(f"{where}.source: with bundler \"none\" the entry runs as it is, "
                          f"so it must be JavaScript ({', '.join(rt.prebuilt_suffixes)}); "
                          f"got {source!r}")
    external = spec.get("externalPackages")
    if external is not None and external != []:
        raise ConfigError(
            f"{where}.externalPackages: not supported yet: phloem bundles every package "
            "into the function (native addons are found and kept outside by themselves); "
            "remove the key")
    return DesiredFunction(slug=slug, name=name, entry=entry, runtime=runtime, env=env,
                           limits=limits, dev_port=_dev_port(where, spec.get("dev")),
                           bundle=bundler != "none")


def _dev_port(where: str, dev: Any) -> int | None:
    """``dev: { port }`` of a neon.ts function (what ``@neon/config`` declares)."""
    if dev is None:
        return None
    if not isinstance(dev, Mapping):
        raise ConfigError(f"{where}.dev: must be an object, e.g. dev: {{ port: 8790 }}")
    unknown = sorted(set(dev) - {"port"})
    if unknown:
        raise ConfigError(f"{where}.dev.{unknown[0]}: unknown key (known: port)")
    port = dev.get("port")
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}.dev.port: must be an integer from 1 to 65535 "
                          f"(got {port!r})")
    return port


# -- links ---------------------------------------------------------------------
def read_link(root: Path) -> dict[str, str]:
    try:
        data: dict[str, str] = json.loads((root / LINK_FILE).read_text())
        return data
    except (OSError, ValueError):
        return {}


def write_link(root: Path, api_url: str, branch: str) -> Path:
    """Link the project to ``branch``; its ``project_id`` (made on the first link) stays."""
    old = read_link(root)
    return _write_link_data(root, {**old, "api_url": api_url, "branch": branch,
                                   "project_id": old.get("project_id") or _new_project_id()})


def project_id(root: Path) -> str:
    """The id this project's deploys record as the owner of the functions they create
    (``project_id`` in the link file); made and written now if the link has none."""
    link = read_link(root)
    found = link.get("project_id")
    if isinstance(found, str) and found:
        return found
    made = _new_project_id()
    _write_link_data(root, {**link, "project_id": made})
    return made


def _new_project_id() -> str:
    return "prj-" + secrets.token_hex(6)


def _write_link_data(root: Path, data: dict[str, str]) -> Path:
    path = root / LINK_FILE
    path.parent.mkdir(exist_ok=True)
    (path.parent / ".gitignore").write_text("*\n")
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# -- plan and apply ------------------------------------------------------------
@dataclass
class PlanItem:
    slug: str
    #: create | update | delete | unchanged | keep (on the branch, not this project's:
    #: left alone)
    action: str
    reasons: list[str] = field(default_factory=list)
    desired: DesiredFunction | None = None
    #: The live function's owner (a project id; None: no project).
    owner: str | None = None
    #: An update of a function another project created: it becomes this project's.
    takeover: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"slug": self.slug, "action": self.action, "reasons": self.reasons,
                "owner": self.owner, "takeover": self.takeover}

    @property
    def destructive(self) -> bool:
        """Removes or replaces what someone else may rely on: asked before applying."""
        return self.action == "delete" or self.takeover


@dataclass
class ProjectPlan:
    """A plan and what the config asked of the branch itself."""

    items: list[PlanItem]
    branch: BranchInfo
    settings: BranchSettings
    triggers: dict[str, Any] | None = None
    #: What the branch's services should be (``Resolved.services``).
    services: dict[str, dict[str, Any]] | None = None

    def branch_changes(self) -> dict[str, Any]:
        """The ``PATCH /branches/{ref}`` body that makes the branch as asked ({}:
        nothing to change). A ttl is always sent: it counts from the branch's creation,
        so sending it again changes nothing."""
        body: dict[str, Any] = {}
        if self.settings.ttl_s is not None:
            body["ttl_s"] = self.settings.ttl_s
        wanted = self.settings.protected
        if wanted is not None and wanted != self.branch.is_protected:
            body["protected"] = wanted
        return body


def service_changes(current: Mapping[str, Any],
                    wanted: Mapping[str, Any] | None) -> dict[str, str]:
    """service -> ``add`` / ``change`` / ``remove`` between what a branch has and what its
    config declares (``wanted`` None: the config cannot declare services; no change)."""
    if wanted is None:
        return {}
    out = {name: "add" if name not in current else "change"
           for name, config in wanted.items() if current.get(name) != config}
    out.update({name: "remove" for name in current if name not in wanted})
    return dict(sorted(out.items()))


def plan_project(client: Client, project: Project, branch: str, artifact_sha: str,
                 owner: str | None = None, new_branch: bool = False) -> ProjectPlan:
    """``owner``: this project's id. Live functions the config does not declare are
    deleted only when this project created them (their owner is ``owner``); the others
    are kept. ``new_branch``: the branch was just made for this deploy (a neon.ts
    closure sees ``exists`` false, as on Neon)."""
    info = branch_info(client.get_branch(branch), exists=not new_branch)
    resolved = project.resolve(info)
    return ProjectPlan(_plan_items(client, project, branch, resolved.functions, owner,
                                   artifact_sha), info, resolved.branch, resolved.triggers,
                       resolved.services)


def _plan_items(client: Client, project: Project, branch: str,
                desired: dict[str, DesiredFunction], owner: str | None,
                artifact_sha: str) -> list[PlanItem]:
    live = {f["slug"]: f for f in client.list_functions(branch)}
    plan: list[PlanItem] = []
    for slug, want in sorted(desired.items()):
        fn = live.get(slug)
        active = None
        if fn is not None and fn["deployment_id"]:
            active = client.get_deployment(fn["deployment_id"])
        their = fn.get("owner") if fn is not None else None
        takeover = their is not None and their != owner
        if active is None:
            plan.append(PlanItem(slug, "create", ["not deployed", *_taking(fn, owner)],
                                 want, their, takeover))
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
        if active.get("bundle", True) != want.bundle:
            reasons.append("bundler esbuild -> none" if want.bundle is False
                           else "bundler none -> esbuild")
        keys = set(active["env_keys"])
        added, removed = sorted(set(want.env) - keys), sorted(keys - set(want.env))
        if added:
            reasons.append(f"env added {', '.join(added)}")
        if removed:
            reasons.append(f"env removed {', '.join(removed)}")
        if not added and not removed and client.env_digest(want.env) != active["env_digest"]:
            reasons.append("env values changed")
        if reasons:
            reasons += _taking(fn, owner)
        plan.append(PlanItem(slug, "update" if reasons else "unchanged", reasons, want,
                             their, takeover and bool(reasons)))
    for slug in sorted(set(live) - set(desired)):
        their = live[slug].get("owner")
        if owner is not None and their == owner:
            plan.append(PlanItem(slug, "delete", [f"not in {project.config_file}"],
                                 owner=their))
        elif their is None:
            plan.append(PlanItem(slug, "keep", ["not created by a project deploy (phloem "
                                                "functions deploy): never deleted by one"]))
        else:
            plan.append(PlanItem(slug, "keep", [f"created by another project ({their})"],
                                 owner=their))
    return plan


def _taking(fn: Mapping[str, Any] | None, owner: str | None) -> list[str]:
    """Why deploying changes who owns the live function ``fn``, if it does."""
    their = fn.get("owner") if fn is not None else None
    if fn is None or owner is None or their == owner:
        return []
    if their is None:
        return ["adopts it (created without a project)"]
    return [f"takes it over from project {their}"]


@dataclass
class ApplyResult:
    slug: str
    action: str
    ok: bool
    detail: str
    #: The deployment's status (``building`` when not waited for); "" for a delete.
    status: str = ""


def apply_plan(client: Client, project: Project, plan: list[PlanItem], branch: str,
               artifact: tuple[bytes, str], progress: Callable[[str], None],
               owner: str | None = None, wait: bool = True) -> list[ApplyResult]:
    """Make the plan so, functions in parallel; failures are reported, others applied.
    Deployments record ``owner`` (this project's id); ``wait`` False returns once each
    is accepted (``building``)."""
    data, sha = artifact
    work = [i for i in plan if i.action not in ("unchanged", "keep")]
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
                progress=lambda line: progress(f"{item.slug}: {line}"), wait=wait,
                owner=owner, bundle=want.bundle)
        except ClientError as exc:
            return ApplyResult(item.slug, item.action, False, str(exc))
        if dep["status"] == "failed":
            return ApplyResult(item.slug, item.action, False, str(dep["error"]), "failed")
        return ApplyResult(item.slug, item.action, True, dep["id"], dep["status"])

    if not work:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(work))) as pool:
        return list(pool.map(run, work))


def pack_project(project: Project) -> tuple[bytes, str]:
    # The config is not code: editing it changes the plan through env/name/..., not by
    # changing every function's source hash.
    # A Node function may import its neon.ts (parseEnv(config)), so that one is packed.
    return pack_directory(project.root, ignore=[f"/{CONFIG_FILE}"])
