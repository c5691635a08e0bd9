"""Deploying functions: build an artifact into a runnable deployment, switch traffic to
it only once it is known to start, and keep the routing table the gateway reads.

A build unpacks the artifact, lets the function's runtime (``phloem.runtimes``) install
its dependencies and bundle it into the deployment directory, and runs the runtime's
entry check in a throw-away process as the function's own uid with the real env. As
root, unpacking and the runtime's steps (pip, npm, esbuild) run as the build user in
sandboxes (``phloem.runtimes.build``) that show them the function's source and their
own output, never the data dir, its secrets or other functions. Any failure marks the
deployment ``failed`` with the reason, and the previous deployment keeps serving.

Deployments stay built after they are replaced: besides the active one, the
``keep_deployments`` most recent ready ones of each function keep their directories
(older ones are pruned once their isolates have drained), so :meth:`Deployer.rollback`
switches back to one in a single step without a rebuild: same artifact, same build,
same env and limits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from phloem.branches.manager import BranchManager
from phloem.control.artifacts import SHA256_RE, ArtifactError, ArtifactStore
from phloem.control.routes import RoutingTable
from phloem.metadata.secrets import SecretBox
from phloem.metadata.store import BranchRow, DeploymentRow, FunctionRow, Store, new_id
from phloem.runtimes.base import (
    BuildContext,
    BuildFailed,
    IsolateContext,
    IsolatePlan,
    Runtime,
    Toolbox,
)
from phloem.runtimes.build import UNPACK_SCRIPT, failure, tool_mounts
from phloem.runtimes.registry import family_of, runtime_for
from phloem.runtimes.unpack import UnpackError, check_tree
from phloem.sandbox import LAUNCHER_ENV, Job, SandboxSpec
from phloem.services.registry import ServiceRegistry
from phloem.supervisor import IsolateSpec, Supervisor
from phloem.system.identity import Identity, make_dir
from phloem.system.limits import check_limits
from phloem.system.paths import DataPaths
from phloem.system.settings import Settings
from phloem.system.validation import (
    InvalidInput,
    check_env,
    check_name,
    check_owner,
    check_slug,
)

log = logging.getLogger("phloem")

#: Builds at once (each a thread: steps are processes, and a build waiting for another
#: to finish a shared dependency environment holds its thread meanwhile).
BUILD_THREADS = 8

P = ParamSpec("P")
T = TypeVar("T")


class NotFound(LookupError):
    def __init__(self, what: str, ref: str) -> None:
        super().__init__(f"{what} {ref!r} not found")
        self.what = what
        self.ref = ref


class Conflict(RuntimeError):
    """The request contradicts the current state (the API answers 409 with ``code``)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass(frozen=True)
class Rollback:
    function: FunctionRow
    deployment: DeploymentRow
    #: The deployment that was active before (None: none was, or it already was active).
    previous_id: str | None
    #: From the request to the route pointing at the old deployment, in ms.
    switch_ms: float


@dataclass(frozen=True)
class DeployRequest:
    slug: str
    artifact_sha256: str
    entry: str
    runtime: str | None = None
    name: str | None = None
    env: dict[str, str] | None = None
    #: Names to remove from the env carried over from the previous deployment.
    unset_env: list[str] | None = None
    #: Start from an empty env instead of the previous deployment's (config apply).
    replace_env: bool = False
    limits: dict[str, Any] | None = None
    #: The deploying project (a project deploy); it becomes the function's owner.
    owner: str | None = None
    #: False: ``entry`` is a prebuilt bundle, run as uploaded (runtimes that bundle).
    bundle: bool = True


#: What a deployment is now (:meth:`Deployer.state_of`).
DEPLOYMENT_STATES = ("building", "failed", "active", "ready", "pruned")


class Deployer:
    #: Awaited when a deploy has recorded its function (before the build, whose import
    #: check runs as the function's uid) and when a deleted function's isolates are gone;
    #: the platform's network rules follow them.
    on_function_deployed: Callable[[BranchRow, FunctionRow], Awaitable[None]] | None = None
    on_function_deleted: Callable[[FunctionRow], Awaitable[None]] | None = None
    #: Awaited each time a function starts serving a deployment (the first and every
    #: later switch): what needs a live function (its ACME certificate) follows it.
    on_function_live: Callable[[BranchRow, FunctionRow], Awaitable[None]] | None = None
    #: Awaited at the end of :meth:`drop_branch` (its custom domains' routes and
    #: certificates go; the rows go with the branch's, by cascade).
    on_branch_dropped: Callable[[BranchRow], Awaitable[None]] | None = None
    #: The branch services (set by the platform): their variables and host names.
    services: ServiceRegistry | None = None

    def __init__(self, settings: Settings, paths: DataPaths, store: Store,
                 artifacts: ArtifactStore, branches: BranchManager, supervisor: Supervisor,
                 toolbox: Toolbox, secrets: SecretBox, sandbox_off: str | None) -> None:
        self.secrets = secrets
        self.settings = settings
        self.paths = paths
        self.store = store
        self.artifacts = artifacts
        self.branches = branches
        self.supervisor = supervisor
        #: What runtimes build and run with; its runner runs every build step: as root,
        #: as the build user through the launcher (in a sandbox unless --no-sandbox);
        #: else directly (docs/architecture.md, Builds).
        self.toolbox = toolbox
        self.runner = toolbox.runner
        #: (branch_id, slug) -> spec of the active deployment; read by the gateway router.
        self.routes = RoutingTable()
        self._builds: set[asyncio.Task[None]] = set()
        #: Per function: switching its active deployment and pruning old ones.
        self._fn_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        #: Replaced deployments whose isolates are still draining (files still needed).
        self._draining: set[str] = set()
        self._executor = ThreadPoolExecutor(BUILD_THREADS, thread_name_prefix="phloem-build")
        #: Why isolates run without a sandbox (None: they run in one).
        self.sandbox_off = sandbox_off
        self.build_identity = Identity.build(settings.isolate_uid_base)

    def close(self) -> None:
        """Builds not yet started are dropped (their deployments fail at next start)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    # -- addressing ----------------------------------------------------------
    def invocation_url(self, branch_id: str, slug: str) -> str:
        s = self.settings
        default = 443 if s.public_scheme == "https" else 80
        port = "" if s.url_port == default else f":{s.url_port}"
        return f"{s.public_scheme}://{branch_id}-{slug}.{s.domain}{port}"

    # -- start-up ------------------------------------------------------------
    async def load_routes(self) -> None:
        await self.store.fail_unfinished_deployments()
        branches = {b.id: b for b in await self.store.list_branches()}
        for fn in await self.store.list_functions():
            if fn.active_deployment_id is None or fn.branch_id not in branches:
                continue
            dep = await self.store.get_deployment(fn.active_deployment_id)
            if dep is None or not self.paths.deployment_dir(dep.id).is_dir():
                continue
            try:
                self.routes.put(fn.branch_id, fn.slug, self.spec_for(
                    branches[fn.branch_id], fn, dep))
            except (InvalidInput, BuildFailed) as exc:
                log.error("function %s of branch %s is not served: %s", fn.slug,
                          fn.branch_id, exc)

    # -- deploy --------------------------------------------------------------
    async def deploy(self, branch: BranchRow, req: DeployRequest) -> DeploymentRow:
        """Validate, record the deployment as 'building' and build it in the background."""
        check_slug(req.slug)
        runtime = runtime_for(req.runtime)
        runtime.check_entry(req.entry)
        limits = check_limits(dict(req.limits or {}))
        if req.name is not None:
            check_name(req.name)
        if req.owner is not None:
            check_owner(req.owner)
        if not req.bundle and not runtime.bundles:
            raise InvalidInput("bundle", f"{runtime.family} functions are not bundled, so "
                               "there is no prebuilt bundle to deploy: --no-bundle (bundle: "
                               "false) applies to runtimes that bundle (node)")
        if not SHA256_RE.fullmatch(req.artifact_sha256):
            raise InvalidInput("artifact_sha256", "must be 64 lowercase hex digits, the "
                               f"sha256 of the uploaded artifact (got {req.artifact_sha256!r})")
        if not self.artifacts.exists(req.artifact_sha256):
            raise InvalidInput("artifact_sha256", f"no artifact {req.artifact_sha256} has "
                               "been uploaded (PUT /api/v1/artifacts/{sha256} first)")
        existing = await self.store.get_function(branch.id, req.slug)
        # Unmentioned keys carry over from the previous deployment; unset ones go.
        env = {} if req.replace_env or existing is None else await self._previous_env(existing)
        for key in req.unset_env or []:
            env.pop(key, None)
        env.update(req.env or {})
        check_env(env)
        name = req.name or (existing.name if existing else req.slug)
        fn = await self.store.upsert_function(branch.id, req.slug, name, runtime.name,
                                              req.owner)
        if self.on_function_deployed is not None:
            await self.on_function_deployed(branch, fn)
        dep_id = new_id("dep")
        dep = await self.store.insert_deployment(
            dep_id, fn.id, req.artifact_sha256, runtime.name, req.entry,
            env_sealed=self.secrets.seal(env, dep_id), env_keys=list(env),
            env_digest=self.secrets.digest(env), limits=limits, bundle=req.bundle)
        task = asyncio.create_task(self._build(branch, fn, dep))
        self._builds.add(task)
        task.add_done_callback(self._builds.discard)
        return dep

    async def _previous_env(self, fn: FunctionRow) -> dict[str, str]:
        """The env of the active deployment, else of the latest one."""
        dep = None
        if fn.active_deployment_id:
            dep = await self.store.get_deployment(fn.active_deployment_id)
        if dep is None:
            deps = await self.store.list_deployments(fn.id)
            dep = deps[0] if deps else None
        return self.env_of(dep) if dep is not None else {}

    def env_of(self, dep: DeploymentRow) -> dict[str, str]:
        if dep.env_sealed:
            return self.secrets.open(dep.env_sealed, dep.id)
        return dict(dep.env)  # written before env sealing existed

    def identity(self, fn: FunctionRow) -> Identity:
        return Identity.isolate(self.settings.isolate_uid_base, fn.number)

    def _home(self, ident: Identity) -> Path:
        home = self.paths.home(ident.uid)
        make_dir(home.parent, 0o711)
        make_dir(home, 0o700, ident)
        return home

    @staticmethod
    def runtime_of(dep: DeploymentRow) -> Runtime:
        """The runtime a deployment runs on. Its stored name is exact; one of a version
        this platform no longer runs (after an upgrade) runs on the current one."""
        return family_of(dep.runtime)

    def spec_for(self, branch: BranchRow, fn: FunctionRow, dep: DeploymentRow) -> IsolateSpec:
        return self._isolate(branch, fn, dep)[0]

    def _isolate(self, branch: BranchRow, fn: FunctionRow,
                 dep: DeploymentRow) -> tuple[IsolateSpec, IsolatePlan]:
        ident = self.identity(fn)
        dep_dir = self.paths.deployment_dir(dep.id)
        app_dir = dep_dir / "app"
        limits = self.settings.function_limits.merged(dep.limits or {})
        plan = self.runtime_of(dep).isolate(IsolateContext(
            self.toolbox, source=app_dir, out=dep_dir, entry=dep.entry, limits=limits))
        urls = self.branches.connection_strings(branch)
        sandbox = None
        if self.sandbox_off is None:
            make_dir(self.paths.sandbox_root, 0o700)
            # What the isolate sees of the data dir, read-only: its deployment and what
            # its runtime runs it with (interpreter, host, dependencies); nothing else.
            sandbox = SandboxSpec(root_dir=str(self.paths.sandbox_root),
                                  ro=[str(dep_dir), *plan.ro],
                                  tmp_mb=limits.tmp_mb, cwd=str(app_dir),
                                  hosts=self._service_hosts(branch))
            home = Path("/tmp")  # the isolate's own, private
        else:
            home = self._home(ident)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "TMPDIR": str(home),
            "LANG": "C.UTF-8",
            **plan.env,
            **self.env_of(dep),
            # Declared in neon.ts, so they win over the deployment's env, as DATABASE_URL.
            **(self.services.env(branch, fn.slug) if self.services is not None else {}),
            "DATABASE_URL": urls.pooled,
            "DATABASE_URL_UNPOOLED": urls.unpooled,
            "PHLOEM_BRANCH": branch.name,
            "NEON_BRANCH": branch.name,
            "PHLOEM_BRANCH_ID": branch.id,
            "PHLOEM_FUNCTION": fn.slug,
            "PHLOEM_DEPLOYMENT": dep.id,
        }
        spec = IsolateSpec(
            deployment_id=dep.id, function_id=fn.id, slug=fn.slug, branch_id=branch.id,
            command=plan.command, env=env, cwd=app_dir, identity=ident,
            log_path=self.paths.function_log(branch.id, fn.slug),
            limits=limits, sandbox=sandbox, nofile=limits.nofile,
            start=plan.start,
        )
        return spec, plan

    def _service_hosts(self, branch: BranchRow) -> dict[str, str]:
        """The branch's service names, resolved in the sandbox to the gateway's address."""
        if self.services is None:
            return {}
        host = self.settings.gateway_host
        address = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
        return dict.fromkeys(self.services.hosts(branch.id), address)

    async def _build(self, branch: BranchRow, fn: FunctionRow, dep: DeploymentRow) -> None:
        lines: list[str] = []
        started = time.monotonic()

        def log(line: str) -> None:  # called from the build's thread
            lines.append(f"[{time.monotonic() - started:6.2f}s] {line}")

        dep_dir = self.paths.deployment_dir(dep.id)
        try:
            spec = await self._in_thread(self._build_steps, branch, fn, dep, log)
        except (BuildFailed, ArtifactError, OSError) as exc:
            log(f"failed: {exc}")
            await self.store.finish_deployment(dep.id, "failed", str(exc), "\n".join(lines))
            await asyncio.to_thread(shutil.rmtree, dep_dir, True)
            return
        except BaseException as exc:
            await self.store.finish_deployment(dep.id, "failed", f"internal error: {exc!r}",
                                               "\n".join(lines))
            await asyncio.to_thread(shutil.rmtree, dep_dir, True)
            raise
        log(f"ready in {time.monotonic() - started:.2f}s")
        # "ready" and the switch are one write: a client that sees the deployment ready
        # finds the function pointing at it (two writes let it read the old one).
        await self.activate(branch, fn, dep, spec, build_log="\n".join(lines))

    def _build_steps(self, branch: BranchRow, fn: FunctionRow, dep: DeploymentRow,
                     log: Callable[[str], None]) -> IsolateSpec:
        """Unpack, the runtime's build, the entry check (blocking: in a build thread)."""
        dep_dir = self.paths.deployment_dir(dep.id)
        app = dep_dir / "app"
        log(f"unpacking artifact {dep.artifact_sha256[:12]}")
        self._unpack(dep, dep_dir)
        self.runtime_of(dep).build(BuildContext(self.toolbox, source=app, out=dep_dir,
                                                entry=dep.entry, log=log, bundle=dep.bundle))
        # What the build wrote (the source, a bundle) is the function's alone; links
        # (to shared dependency environments) stay as they are.
        ident = self.identity(fn)
        for entry in dep_dir.iterdir():
            if not entry.is_symlink():
                _restrict_to(entry, ident)
        spec, plan = self._isolate(branch, fn, dep)
        log(f"checking entry {dep.entry!r}" if dep.entry else "checking the entry")
        self._check_entry(spec, plan.check)
        return spec

    async def activate(self, branch: BranchRow, fn: FunctionRow, dep: DeploymentRow,
                       spec: IsolateSpec, build_log: str | None = None) -> None:
        """Serve ``dep``; with ``build_log``, its build is marked ready in the same write."""
        async with self._fn_locks[fn.id]:
            await self._switch(branch, fn, dep, spec, build_log)

    async def _switch(self, branch: BranchRow, fn: FunctionRow, dep: DeploymentRow,
                      spec: IsolateSpec, build_log: str | None = None) -> str | None:
        """Point the function at ``dep`` (its lock held); returns the one replaced."""
        current = await self.store.get_function(branch.id, fn.slug)
        previous = current.active_deployment_id if current else None
        await self.store.set_active_deployment(fn.id, dep.id, build_log=build_log)
        # New requests go to the new version at once; the old one drains in the background.
        self.routes.put(branch.id, fn.slug, spec)
        if self.on_function_live is not None:
            await self.on_function_live(branch, fn)
        if previous and previous != dep.id:
            self._draining.add(previous)
            retire = asyncio.create_task(self._retire(fn, previous))
            self._builds.add(retire)
            retire.add_done_callback(self._builds.discard)
        return previous if previous != dep.id else None

    async def _retire(self, fn: FunctionRow, deployment_id: str) -> None:
        """Drain a replaced deployment's isolates; its files stay (a rollback target)
        until retention prunes them."""
        try:
            route = self.routes.get((fn.branch_id, fn.slug))
            # A rollback may have made it active again before this task ran.
            if route is None or route.deployment_id != deployment_id:
                await self.supervisor.retire(deployment_id)
        finally:
            self._draining.discard(deployment_id)
        await self.prune(fn)

    async def prune(self, fn: FunctionRow) -> list[str]:
        """Remove the built files of the function's ready deployments beyond the
        ``keep_deployments`` most recent inactive ones (never the active one, nor one
        whose isolates still drain); returns their ids."""
        async with self._fn_locks[fn.id]:
            current = await self.store.get_function(fn.branch_id, fn.slug)
            if current is None or current.id != fn.id:
                return []  # deleted: its files went with it
            inactive = [d for d in await self.store.list_deployments(fn.id)
                        if d.id != current.active_deployment_id and d.status == "ready"
                        and d.pruned_at is None]
            drop = [d.id for d in inactive[max(0, self.settings.keep_deployments):]
                    if d.id not in self._draining]
            # Marked first: from here on a rollback to them is refused.
            await self.store.mark_pruned(drop)
        for dep_id in drop:
            await asyncio.to_thread(shutil.rmtree, self.paths.deployment_dir(dep_id), True)
        return drop

    def state_of(self, fn: FunctionRow, dep: DeploymentRow) -> str:
        """One of :data:`DEPLOYMENT_STATES`: ``active`` (serving), ``ready`` (replaced,
        kept built: a rollback target), ``pruned`` (replaced, files removed), or its
        build's ``building``/``failed``."""
        if dep.id == fn.active_deployment_id:
            return "active"
        if dep.status != "ready":
            return dep.status
        # A backup restores active deployments' files only.
        if dep.pruned_at is not None or not self.paths.deployment_dir(dep.id).is_dir():
            return "pruned"
        return "ready"

    async def rollback(self, branch: BranchRow, slug: str, to: str | None = None) -> Rollback:
        """Make an earlier deployment of the function active again, without a build:
        ``to``, or else the newest ready one older than the active one. The route
        switches at once; the replaced deployment drains and stays kept (``to`` can
        switch forward to it again)."""
        started = time.monotonic()
        fn = await self.store.get_function(branch.id, slug)
        if fn is None:
            raise NotFound("function", slug)
        async with self._fn_locks[fn.id]:
            fn = await self.store.get_function(branch.id, slug)
            if fn is None:
                raise NotFound("function", slug)
            deps = await self.store.list_deployments(fn.id)  # newest first
            target = self._rollback_target(fn, deps, to)
            if target.id == fn.active_deployment_id:  # already serving: nothing to do
                return Rollback(fn, target, None, (time.monotonic() - started) * 1000)
            try:
                spec = self.spec_for(branch, fn, target)
            except (InvalidInput, BuildFailed) as exc:
                raise Conflict("deployment_not_ready", f"deployment {target.id} cannot run "
                               f"any more: {exc}", "deployment_id") from None
            previous = await self._switch(branch, fn, target, spec)
        switch_ms = (time.monotonic() - started) * 1000
        log.info("function %s of branch %s rolled back from %s to %s in %.1f ms", slug,
                 branch.id, previous, target.id, switch_ms)
        fn = await self.store.get_function(branch.id, slug) or fn
        return Rollback(fn, target, previous, switch_ms)

    def _rollback_target(self, fn: FunctionRow, deps: list[DeploymentRow],
                         to: str | None) -> DeploymentRow:
        if to is not None:
            target = next((d for d in deps if d.id == to), None)
            if target is None:
                raise NotFound("deployment", to)
            state = self.state_of(fn, target)
            if state not in ("active", "ready"):
                why = {"pruned": "its built files were removed (each function keeps its "
                                 f"{self.settings.keep_deployments} latest replaced "
                                 "deployments); deploy that version again",
                       "failed": "its build failed",
                       "building": "it is still building: wait for it"}[state]
                raise Conflict("deployment_not_ready", f"deployment {to} is {state}, not a "
                               f"rollback target: {why}", "deployment_id")
            return target
        active = next((d for d in deps if d.id == fn.active_deployment_id), None)
        older = [d for d in deps if d is not active
                 and (active is None or d.created_at < active.created_at)]
        target = next((d for d in older if self.state_of(fn, d) == "ready"), None)
        if target is None:
            pruned = sum(1 for d in older if self.state_of(fn, d) == "pruned")
            raise Conflict("no_previous_deployment", f"function {fn.slug} has no earlier "
                           "deployment to roll back to" + (
                               f" ({pruned} older one(s) were pruned: deploy again)"
                               if pruned else ""))
        return target

    def _unpack(self, dep: DeploymentRow, dep_dir: Path) -> None:
        """Unpack the artifact into ``dep_dir/app``, readable by the build user until the
        build restricts it to the function. As root the build user unpacks it in a
        sandbox where only ``app`` is writable (the archive comes on stdin)."""
        shutil.rmtree(dep_dir, ignore_errors=True)
        make_dir(dep_dir.parent, 0o711)
        make_dir(dep_dir, 0o711)
        app = dep_dir / "app"
        tools = self.toolbox.build_python()
        if tools is None:
            self.artifacts.extract(dep.artifact_sha256, app)
        else:
            python = self.toolbox.python
            self.runner.output_dir(app)
            with open(self.artifacts.path(dep.artifact_sha256), "rb") as artifact:
                try:
                    proc = self.runner.run(
                        [python, "-I", "-S", tools / UNPACK_SCRIPT, app],
                        cwd=app, env=self.runner.env(), stdin=artifact,
                        ro=[tools, *tool_mounts(python)], rw=[app],
                        timeout=UNPACK_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    raise ArtifactError(f"artifact: unpacking took longer than "
                                        f"{UNPACK_TIMEOUT_S} s") from None
                finally:
                    self.runner.reclaim(app)
            if proc.returncode != 0:
                raise ArtifactError(failure(proc))
        # Links are checked once all exist (a chain of links can hide where it points);
        # only then does the platform read files of the source.
        try:
            check_tree(str(app))
        except UnpackError as exc:
            raise ArtifactError(f"artifact: {exc}") from None
        _restrict_to(app, self.build_identity)

    def _check_entry(self, spec: IsolateSpec, cmd: list[str]) -> None:
        # The import check is an isolate of its own as far as the app can tell.
        spec = replace(spec, env={**spec.env, "PHLOEM_ISOLATE": "iso-check"})
        try:
            if spec.sandbox is not None or not spec.identity.is_self:
                # As an isolate runs: the function's env only after the privilege drop.
                job = Job(argv=cmd, env=spec.env, cwd=str(spec.cwd), uid=spec.identity.uid,
                          gid=spec.identity.gid, sandbox=spec.sandbox, nofile=spec.nofile)
                argv, job_fd = job.launcher()
                try:
                    proc = subprocess.run(argv, cwd="/", env=LAUNCHER_ENV,
                                          pass_fds=(job_fd,), stdin=subprocess.DEVNULL,
                                          capture_output=True, text=True, timeout=300,
                                          check=False)
                finally:
                    os.close(job_fd)
            else:
                proc = subprocess.run(cmd, cwd=spec.cwd, env=spec.env, capture_output=True,
                                      text=True, timeout=300, check=False,
                                      **spec.identity.popen_kwargs())
        except subprocess.TimeoutExpired:
            raise BuildFailed("entry: importing the app took longer than 300 s") from None
        if proc.returncode != 0:
            raise BuildFailed((proc.stderr or proc.stdout).strip()[-4000:]
                             or f"entry: check exited with {proc.returncode}")

    async def delete(self, branch: BranchRow, slug: str) -> None:
        fn = await self.store.get_function(branch.id, slug)
        if fn is None:
            raise NotFound("function", slug)
        self._fn_locks.pop(fn.id, None)
        self.routes.remove(branch.id, slug)
        deployments = await self.store.list_deployments(fn.id)
        await self.store.delete_function(fn.id)
        for dep in deployments:
            await self.supervisor.retire(dep.id, drain_s=0)
            await asyncio.to_thread(shutil.rmtree, self.paths.deployment_dir(dep.id), True)
        if self.on_function_deleted is not None:  # after its isolates' shutdown handlers
            await self.on_function_deleted(fn)

    # -- branch events -----------------------------------------------------------
    async def restart_branch(self, branch: BranchRow) -> None:
        """Stop the branch's isolates (after their in-flight requests, briefly); the next
        request starts fresh ones, e.g. against reset data."""
        deps = self.routes.deployments_of(branch.id)
        await asyncio.gather(*(self.supervisor.retire(d, drain_s=5) for d in deps))

    async def refresh_branch(self, branch: BranchRow) -> None:
        """The branch's variables changed (a branch service came or went): route its
        functions to specs made anew, then restart their isolates with them."""
        for fn in await self.store.list_functions(branch.id):
            dep = (await self.store.get_deployment(fn.active_deployment_id)
                   if fn.active_deployment_id else None)
            if dep is not None and self.routes.get((branch.id, fn.slug)) is not None:
                self.routes.put(branch.id, fn.slug, self.spec_for(branch, fn, dep))
        await self.restart_branch(branch)

    async def drop_branch(self, branch: BranchRow) -> None:
        """Everything of a branch being deleted: routes, isolates, deployment files."""
        for fn in await self.store.list_functions(branch.id):
            await self.delete(branch, fn.slug)
        if self.on_branch_dropped is not None:
            await self.on_branch_dropped(branch)

    async def copy_functions(self, parent: BranchRow, child: BranchRow) -> list[DeploymentRow]:
        """Deploy the parent's active deployments on ``child`` (same artifacts, entries,
        env); they build in the background like any deploy."""
        out = []
        for fn in await self.store.list_functions(parent.id):
            if fn.active_deployment_id is None:
                continue
            dep = await self.store.get_deployment(fn.active_deployment_id)
            if dep is None:
                continue
            out.append(await self.deploy(child, DeployRequest(
                slug=fn.slug, artifact_sha256=dep.artifact_sha256, entry=dep.entry,
                runtime=dep.runtime, name=fn.name, env=self.env_of(dep), replace_env=True,
                limits=dep.limits, owner=fn.owner, bundle=dep.bundle)))
        return out


UNPACK_TIMEOUT_S = 300


def _restrict_to(root: Path, ident: Identity) -> None:
    """Only this function's uid (via its group) may read what is under ``root``."""
    for dirpath, _dirs, files in os.walk(root):
        if os.geteuid() == 0:
            os.chown(dirpath, 0, ident.gid)
        os.chmod(dirpath, 0o750)
        for name in files:
            p = os.path.join(dirpath, name)
            if os.geteuid() == 0:
                os.chown(p, 0, ident.gid, follow_symlinks=False)
            if not os.path.islink(p):
                os.chmod(p, 0o750 if os.access(p, os.X_OK) else 0o640)

