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

from phloem.client import Client, ClientError
from phloem.config import BranchInfo, Config, Function
from phloem.limits import check_limits
from phloem.packing import pack_directory
from phloem.validation import ENTRY_RE, InvalidInput, check_env, check_name, check_slug

CONFIG_FILE = "phloemfile.py"
LINK_FILE = Path(".phloem") / "link.json"
PYTHON_RUNTIMES = ("python3.11", "python3.12", "python3.13", "python3.14")


class ConfigError(ValueError):
    """Names the file, the key and the rule."""


@dataclass(frozen=True)
class DesiredFunction:
    slug: str
    name: str
    entry: str
    runtime: str | None
    env: dict[str, str]
    limits: dict[str, Any]


@dataclass
class Project:
    root: Path
    config: Config

    def desired(self, branch: BranchInfo) -> dict[str, DesiredFunction]:
        overrides: Mapping[str, Any] = {}
        if self.config.branch is not None:
            try:
                overrides = self.config.branch(branch) or {}
            except Exception as exc:
                raise ConfigError(f"{CONFIG_FILE}: branch: the callback raised {exc!r}") \
                    from None
        per_fn = overrides.get("functions", {}) if isinstance(overrides, Mapping) else {}
        out: dict[str, DesiredFunction] = {}
        for slug, fn in self.config.functions.items():
            extra = per_fn.get(slug, {}) if isinstance(per_fn, Mapping) else {}
            out[slug] = _resolve(self.root, slug, fn, extra)
        for slug in per_fn if isinstance(per_fn, Mapping) else ():
            if slug not in self.config.functions:
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
    if source.suffix != ".py":
        raise ConfigError(f"{where}.source: {fn.source!r} is not a Python file (.py); Node "
                          "functions are configured in neon.ts")
    module = ".".join(source.relative_to(root).with_suffix("").parts)
    entry = f"{module}:{extra.get('entry', fn.entry)}"
    if not ENTRY_RE.match(entry):
        raise ConfigError(f"{where}.entry: {entry!r} must be module:attr")
    runtime = extra.get("runtime", fn.runtime)
    if runtime is not None and runtime not in PYTHON_RUNTIMES:
        raise ConfigError(f"{where}.runtime: unknown runtime {runtime!r} (known: "
                          f"{', '.join(PYTHON_RUNTIMES)})")
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
        if (d / CONFIG_FILE).is_file() or (d / LINK_FILE).is_file():
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


def load_project(root: Path, env_file: Path | None = None) -> Project:
    """Evaluate ``phloemfile.py`` (after loading ``env_file`` into the environment)."""
    path = root / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found (create one with 'phloem init')")
    if env_file is not None:
        if not env_file.is_file():
            raise ConfigError(f"--env {env_file}: file not found")
        for key, value in load_dotenv(env_file).items():
            os.environ.setdefault(key, value)
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
    return Project(root=root, config=config)


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
        if want.runtime is not None and active["runtime"] != want.runtime:
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
        plan.append(PlanItem(slug, "delete", [f"not in {CONFIG_FILE}"]))
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
    return pack_directory(project.root, ignore=[f"/{CONFIG_FILE}", "/neon.ts"])
