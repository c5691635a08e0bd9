"""Project commands: config status|plan|apply, deploy, link, checkout, env pull|run, init.

    phloem init --template python && phloem link && phloem deploy
    phloem checkout preview/login          # new branch, functions deployed, .env pulled
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.markup import escape

from phloem.cli.main import (
    BranchOpt,
    DataDirOpt,
    OutputFormat,
    OutputOpt,
    api_errors,
    app,
    client_for,
    err,
    fail,
    out,
    print_json,
)
from phloem.dev.forward import ServiceForwarders
from phloem.project.client import Client, ClientError
from phloem.project.clientbuild import ClientBuild
from phloem.project.clientbuild import explain as explain_build
from phloem.project.clientbuild import prepare as prepare_build
from phloem.project.domains import apply_domains
from phloem.project.neon import find_neon_config
from phloem.project.npmrc import is_node_project, write_npmrc
from phloem.project.packing import PackError
from phloem.project.plan import (
    CONFIG_FILE,
    ConfigError,
    PlanItem,
    Project,
    ProjectPlan,
    apply_plan,
    branch_info,
    find_root,
    load_project,
    pack_project,
    plan_project,
    project_id,
    read_link,
    write_link,
)
from phloem.project.service_plan import service_changes
from phloem.project.trigger_plan import TriggerChange, plan_triggers

config_app = typer.Typer(help="Config as code: compare phloemfile.py with a branch and "
                              "make it so.", no_args_is_help=True)
env_app = typer.Typer(help="The linked branch's connection variables, locally.",
                      no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(env_app, name="env")

ProjectOpt = Annotated[Path, typer.Option(
    "--project", "-C", envvar="PHLOEM_PROJECT", help="Project root [default: the nearest "
    "directory up from here with phloemfile.py or a link]", show_default=False)]
EnvFileOpt = Annotated[Path | None, typer.Option(
    "--env", envvar="PHLOEM_ENV_FILE", help="Dotenv file loaded before phloemfile.py (or "
    "neon.ts) is evaluated, after the project's .env and .env.local (it wins over them; "
    "set variables win over all). Any readable file, a pipe too: --env <(echo K=V).")]
YesOpt = Annotated[bool, typer.Option(
    "--yes", "-y", envvar="PHLOEM_YES", help="Apply without asking when the plan deletes "
    "functions this project created, or takes over another project's; without it such a "
    "plan is asked about on a terminal and refused otherwise (nothing is changed).")]
AllowProtectedOpt = Annotated[bool, typer.Option(
    "--allow-protected", help="Deploy to a protected branch (neon.ts branch setting "
    "protected: true); refused without it.")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait/--no-wait", envvar="PHLOEM_WAIT", help="Wait until each deployment is ready "
    "or failed; --no-wait returns once they are accepted (state building: see 'phloem "
    "functions deployments SLUG').")]
ACTION_STYLE = {"create": "green", "update": "yellow", "delete": "red", "unchanged": "dim",
                "keep": "dim"}


def project_root(given: Path | None) -> Path:
    if given and str(given) != ".":
        return given.absolute()
    return find_root(Path.cwd()) or Path.cwd()


def _load(root: Path, env_file: Path | None) -> Project:
    try:
        return load_project(root, env_file,
                            progress=lambda line: err.print(escape(line), highlight=False))
    except ConfigError as exc:
        fail(str(exc))


def _plan(client: Client, project: Project, branch: str, owner: str | None,
          new_branch: bool = False) -> tuple[ProjectPlan, tuple[bytes, str], ClientBuild]:
    with api_errors(ConfigError, PackError):
        built = prepare_build(client, project, branch, new_branch,
                              lambda line: err.print(f"  [dim]{escape(line)}[/]",
                                                     highlight=False))
        artifact = built.artifact or pack_project(project)
        pp = plan_project(client, project, branch, artifact[1], owner, new_branch)
        explain_build(pp.items, built)
        return pp, artifact, built


def _show_build(built: ClientBuild) -> None:
    """Which bundling ran: here from node_modules, or on the platform (and why)."""
    if built.where == "client":
        out.print(f"  bundled here: {escape(built.why)}", highlight=False)
    else:
        out.print(f"  bundling on the platform: {escape(built.why)}", highlight=False)


def _show_branch_changes(pp: ProjectPlan) -> None:
    for line in pp.domains.lines() if pp.domains is not None else ():
        out.print(f"  domain {escape(line)}", highlight=False)
    changes = pp.branch_changes()
    if "ttl_s" in changes:
        out.print(f"  branch expires {changes['ttl_s']} s after its creation (ttl)")
    if "protected" in changes:
        out.print(f"  branch {'becomes' if changes['protected'] else 'stops being'} "
                  "protected")


def _show_plan(plan: list[PlanItem], branch: str) -> None:
    out.print(f"plan for branch [bold]{escape(branch)}[/]:")
    for item in plan:
        style = ACTION_STYLE[item.action]
        why = f"  ({'; '.join(item.reasons)})" if item.reasons else ""
        out.print(f"  [{style}]{item.action:<9}[/] {item.slug}{escape(why)}")
    counts = {a: sum(1 for i in plan if i.action == a) for a in ACTION_STYLE}
    words = {"unchanged": "{n} unchanged", "keep": "{n} kept (not this project's)"}
    out.print("  " + ", ".join(words.get(a, "{n} to " + a).format(n=n)
                               for a, n in counts.items()))


TRIGGER_STYLE = {"add": "green", "change": "yellow", "remove": "red", "unchanged": "dim",
                 "keep": "dim"}


def _show_trigger_plan(changes: list[TriggerChange]) -> None:
    if not changes:
        return
    out.print("  triggers:")
    for c in changes:
        why = f"  ({'; '.join(c.reasons)})" if c.reasons else ""
        out.print(f"    [{TRIGGER_STYLE[c.action]}]{c.action:<9}[/] {escape(c.name)}"
                  f"{escape(why)}", highlight=False)


def _confirm(plan: list[PlanItem], yes: bool) -> None:
    """Deleting what this project made, or taking over another project's function, is
    applied only with --yes or a yes on a terminal; refused before anything is changed."""
    risky = [i for i in plan if i.destructive]
    if not risky or yes:
        return
    what = "; ".join(f"delete {i.slug}" if i.action == "delete"
                     else f"take over {i.slug} from project {i.owner}" for i in risky)
    if not sys.stdin.isatty():
        fail(f"deploy: the plan would {what}, and stdin is not a terminal to confirm it: "
             "pass --yes to apply it. Nothing was changed.")
    try:
        answer = err.input(escape(f"the plan would {what}. Apply it? [y/N] "))
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        fail("deploy: not confirmed. Nothing was changed.")


@config_app.command("status")
def config_status(data_dir: DataDirOpt, branch: BranchOpt = "",
                  output: OutputOpt = OutputFormat.text) -> None:
    """The linked branch's live functions and their active deployments, its schedule
    triggers, and its services (Neon Auth, AI Gateway, object storage) with their URLs."""
    client = client_for(data_dir)
    with api_errors():
        fns = client.list_functions(branch)
        live = client.list_triggers(branch)
        on = client.get_services(branch)
    rows = [{"slug": f["slug"], "status": f["status"], "deployment_id": f["deployment_id"],
             "invocation_url": f["invocation_url"]} for f in fns]
    triggers = [{"name": t["name"], "function": t["function"], "cron": t["cron"],
                 "functionPath": t["functionPath"], "enabled": t["enabled"],
                 "owner": t["owner"]} for t in live]
    if output is OutputFormat.json:
        print_json({"branch": branch, "functions": rows, "triggers": triggers,
                    "services": {name: {"config": config, "url": on["urls"].get(name)}
                                 for name, config in on["services"].items()}})
        return
    out.print(f"branch [bold]{escape(branch)}[/]: {len(rows)} function(s)")
    for r in rows:
        out.print(f"  {r['slug']:<20} {r['status']:<9} {r['deployment_id'] or '-'}  "
                  f"{r['invocation_url']}", highlight=False)
    if triggers:
        out.print(f"{len(triggers)} trigger(s):")
    for t in triggers:
        state = "enabled" if t["enabled"] else "disabled"
        out.print(f"  {escape(t['name']):<20} {state:<9} {t['cron']:<16} -> "
                  f"{t['function']}{escape(t['functionPath'])}", highlight=False)
    if on["services"]:
        out.print(f"{len(on['services'])} service(s):")
    for name in on["services"]:
        out.print(f"  {name:<20} {on['urls'].get(name, '-')}", highlight=False)


@config_app.command("plan")
def config_plan(data_dir: DataDirOpt, project: ProjectOpt = Path("."),
                env_file: EnvFileOpt = None, branch: BranchOpt = "",
                output: OutputOpt = OutputFormat.text) -> None:
    """What apply would change (create / update / delete / unchanged, with reasons);
    changes nothing."""
    root = project_root(project)
    proj = _load(root, env_file)
    client = client_for(data_dir)
    # Plan changes nothing: a project without an id yet has created nothing.
    owner = read_link(root).get("project_id")
    pp, _, _ = _plan(client, proj, branch, owner)
    with api_errors():
        triggers = plan_triggers(proj.triggers, client.list_triggers(branch), owner)
        services = service_changes(client.get_services(branch)["services"], pp.services)
    if output is OutputFormat.json:
        print_json({"branch": branch, "plan": [i.as_dict() for i in pp.items],
                    "branch_changes": pp.branch_changes(), "services": services,
                    "domains": pp.domains.as_dict() if pp.domains else None,
                    "triggers": [t.as_dict() for t in triggers]})
    else:
        _show_plan(pp.items, branch)
        _show_branch_changes(pp)
        _show_trigger_plan(triggers)
        for name, change in services.items():
            out.print(f"  service {name}: {change}")


def do_apply(data_dir: Path, root: Path, env_file: Path | None, branch: str,
             output: OutputFormat, yes: bool = False, wait: bool = True,
             allow_protected: bool = False, new_branch: bool = False) -> None:
    proj = _load(root, env_file)
    client = client_for(data_dir)
    owner = project_id(root)
    pp, artifact, built = _plan(client, proj, branch, owner, new_branch)
    plan = pp.items
    quiet = output is OutputFormat.json
    if not quiet:
        _show_plan(plan, branch)
        _show_branch_changes(pp)
        _show_build(built)
    if pp.branch.is_protected and not allow_protected:
        fail(f"branch {pp.branch.name!r} is protected: deploying to it needs "
             "--allow-protected")
    _confirm(plan, yes)
    with api_errors(), err.status("applying") as spinner:
        def progress(line: str) -> None:
            spinner.update(f"applying: {line[:100]}")
            if not quiet:
                err.print(f"  [dim]{escape(line)}[/]", highlight=False)

        # Services first: the functions' variables come from them.
        services = (client.put_services(branch, pp.services)
                    if pp.services is not None else None)
        results = apply_plan(client, proj, plan, branch, artifact, progress,
                             owner=owner, wait=wait)
        changes = pp.branch_changes()
        lifetime = client.set_branch_lifetime(branch, changes) if changes else None
        # This project's schedule triggers (none: its earlier ones go).
        triggers = client.put_triggers(branch, proj.triggers, owner)
        # This project's custom domains (names another branch holds are skipped).
        domains = apply_domains(client, branch, pp.domains, owner) if pp.domains else None
    ours = [t["name"] for t in triggers if t["owner"] == owner]
    failed = [r for r in results if not r.ok]
    pulled = None
    if services is not None and services["urls"]:
        # As `neon deploy`: the services' variables go into the local env file at once,
        # so the next local step (Neon's READMEs: `npm run db:push`) has them.
        with api_errors():
            pulled = _pull_env(client, root, pp.branch.id, None)
    if quiet:
        print_json({"branch": branch, "plan": [i.as_dict() for i in plan],
                    "results": [r.__dict__ for r in results], "triggers": ours,
                    "services": None if services is None else services["urls"],
                    "domains": domains,
                    "bundled": {"where": built.where, "why": built.why},
                    "branch_settings": None if lifetime is None else {
                        "expires_at": lifetime["expires_at"],
                        "protected": lifetime["protected"]}})
    else:
        for r in results:
            mark = "[green]ok[/]" if r.ok else "[bold red]failed[/]"
            state = f" ({r.status})" if r.status == "building" else ""
            out.print(f"  {mark} {r.action} {r.slug}: {escape(r.detail)}{state}")
        if ours:
            out.print(f"  [green]ok[/] triggers: {escape(', '.join(ours))}")
        for name, url in (services or {}).get("urls", {}).items():
            out.print(f"  [green]ok[/] service {name}: {escape(url)}", highlight=False)
        for d in (domains or {}).get("domains", []):
            if d["owner"] == owner:
                out.print(f"  [green]ok[/] domain {escape(d['hostname'])} -> {d['function']}")
        for d in (domains or {}).get("skipped", []):
            out.print(f"  [yellow]skipped[/] domain {escape(d['hostname'])}: "
                      f"{escape(d['reason'])}")
        if pulled is not None:
            out.print(f"  wrote {escape(str(pulled))} (the branch's service variables)",
                      highlight=False)
        if not results and not ours and not domains and not (services or {}).get("urls"):
            out.print("nothing to do")
    if failed:
        fail("apply failed for " + ", ".join(r.slug for r in failed))


@config_app.command("apply")
def config_apply(data_dir: DataDirOpt, project: ProjectOpt = Path("."),
                 env_file: EnvFileOpt = None, branch: BranchOpt = "",
                 output: OutputOpt = OutputFormat.text, yes: YesOpt = False,
                 wait: WaitOpt = True,
                 allow_protected: AllowProtectedOpt = False) -> None:
    """Bundle, upload and deploy what the plan says, in parallel; exit 1 if any function
    failed (the others stay applied). Functions the config no longer declares are
    deleted only if this project created them (asked first: --yes); other projects'
    and 'phloem functions deploy' ones are kept."""
    do_apply(data_dir, project_root(project), env_file, branch, output, yes, wait,
             allow_protected)


@app.command("deploy")
def deploy_alias(data_dir: DataDirOpt, project: ProjectOpt = Path("."),
                 env_file: EnvFileOpt = None, branch: BranchOpt = "",
                 output: OutputOpt = OutputFormat.text, yes: YesOpt = False,
                 wait: WaitOpt = True,
                 allow_protected: AllowProtectedOpt = False) -> None:
    """Apply phloemfile.py (or neon.ts) to the linked branch (same as 'phloem config
    apply').

    Example: phloem deploy --yes --no-wait
    """
    do_apply(data_dir, project_root(project), env_file, branch, output, yes, wait,
             allow_protected)


# -- link, checkout, env ---------------------------------------------------------
#: Written by ``env pull`` for each function of the branch, as Neon's CLI does: its
#: invocation URL with a trailing slash, so paths concatenate onto it.
FUNCTION_URL_RE = re.compile(r"^NEON_FUNCTION_[A-Z0-9]+_BASE_URL$")


def function_url_var(slug: str) -> str:
    return f"NEON_FUNCTION_{slug.upper()}_BASE_URL"


def default_env_target(root: Path) -> Path:
    """Where ``env pull`` writes without ``--file``: the project's ``.env`` if it has one
    (where its secrets already live), else ``.env.local``."""
    return root / ".env" if (root / ".env").is_file() else root / ".env.local"


def _hosts_notice(hosts: list[str]) -> None:
    """Service host names resolve inside isolates only; say what a local process needs."""
    if hosts:
        err.print("note: the branch's services answer at names only isolates resolve; "
                  "'phloem env run --forward-services' and 'phloem dev' reach them through "
                  "local forwarders, or add this line to /etc/hosts:\n  127.0.0.1 "
                  + " ".join(hosts), highlight=False)


def _forwarders(client: Client, branch: str) -> tuple[ServiceForwarders | None,
                                                      dict[str, str]]:
    """Local forwarders to the branch's services (none if it has none) and their
    variables; the forwarders connect to the platform's host (the API URL's)."""
    urls: dict[str, str] = client.get_services(branch)["urls"]
    env: dict[str, str] = client.service_env(branch)["env"]
    if not urls:
        return None, env
    host = urlsplit(client.creds.api_url).hostname or "127.0.0.1"
    return ServiceForwarders(urls, host), env


def _pull_env(client: Client, root: Path, branch: str, file: Path | None) -> Path:
    target = default_env_target(root) if file is None else (
        file if file.is_absolute() else root / file)
    values = {
        "DATABASE_URL": client.connection_string(branch, pooled=True),
        "DATABASE_URL_UNPOOLED": client.connection_string(branch, pooled=False),
        "PHLOEM_BRANCH": client.get_branch(branch)["name"],
    }
    values["NEON_BRANCH"] = values["PHLOEM_BRANCH"]
    for fn in client.list_functions(branch):
        url = fn["invocation_url"]
        values[function_url_var(fn["slug"])] = url if url.endswith("/") else url + "/"
    services = client.service_env(branch)
    values.update(services["env"])
    _hosts_notice(services["hosts"])
    lines = target.read_text().splitlines() if target.exists() else []
    seen: set[str] = set()
    merged = []
    for line in lines:  # the user's own lines stay as they are
        key = line.strip().removeprefix("export ").split("=", 1)[0].strip()
        if key in values and "=" in line:
            merged.append(f"{key}={values[key]}")
            seen.add(key)
        elif "=" in line and FUNCTION_URL_RE.match(key):
            continue  # a function this branch no longer has (or another branch's)
        else:
            merged.append(line)
    merged += [f"{k}={v}" for k, v in values.items() if k not in seen]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(merged) + "\n")
    return target


@app.command("link")
def link(data_dir: DataDirOpt, project: ProjectOpt = Path("."), branch: BranchOpt = "",
         no_env_pull: Annotated[bool, typer.Option("--no-env-pull", help="Do not write "
                                                   ".env.")] = False) -> None:
    """Link this project to a branch (.phloem/link.json); later commands use it. A Node
    project (package.json or neon.ts) also gets two .npmrc lines pointing the @neon and
    @neondatabase scopes at the platform's registry, so 'npm install' finds
    @neon/functions (its other lines are kept)."""
    root = project_root(project)
    client = client_for(data_dir)
    with api_errors():
        b = client.get_branch(branch)
        path = write_link(root, client.creds.api_url, b["name"])
        if not no_env_pull:
            _pull_env(client, root, b["name"], Path(".env"))
    out.print(f"linked {root} to branch {b['name']} ({b['id']}) in {path}")
    if is_node_project(root):
        npmrc, changed = write_npmrc(root, client.creds.api_url)
        out.print(f"{'wrote' if changed else 'unchanged:'} {npmrc} (@neon and "
                  "@neondatabase from the platform's registry)", highlight=False)


@app.command("checkout")
def checkout(
    name: Annotated[str, typer.Argument(help="Branch to switch to (created if missing).")],
    data_dir: DataDirOpt, project: ProjectOpt = Path("."), env_file: EnvFileOpt = None,
    parent: Annotated[str | None, typer.Option("--parent", help="Parent for a new branch "
                                               "[default: the linked branch]")] = None,
    no_env_pull: Annotated[bool, typer.Option("--no-env-pull", help="Do not write "
                                              ".env.")] = False,
) -> None:
    """Switch the link to NAME. A new branch is created from the parent and gets the
    project's functions deployed; an existing one is only switched to.

    Example: phloem checkout preview/login
    """
    root = project_root(project)
    client = client_for(data_dir)
    created = False
    with api_errors():
        try:
            client.get_branch(name)
        except ClientError as exc:
            if exc.status != 404:
                raise
            base = parent or read_link(root).get("branch") or "main"
            with err.status(f"creating branch {name} from {base}"):
                client.create_branch(name, base)
            created = True
        write_link(root, client.creds.api_url, name)
    out.print(f"{'created and ' if created else ''}switched to branch {name}")
    if created and ((root / CONFIG_FILE).is_file() or find_neon_config(root) is not None):
        do_apply(data_dir, root, env_file, name, OutputFormat.text, new_branch=True)
    if not no_env_pull:
        with api_errors():
            target = _pull_env(client, root, name, Path(".env"))
        out.print(f"wrote {target}")


@env_app.command("pull")
def env_pull(data_dir: DataDirOpt, project: ProjectOpt = Path("."), branch: BranchOpt = "",
             file: Annotated[Path | None, typer.Option(
                 "--file", help="Dotenv file to merge into [default: the project's .env "
                 "if it has one, else .env.local]", show_default=False)] = None) -> None:
    """Write DATABASE_URL, DATABASE_URL_UNPOOLED, PHLOEM_BRANCH, NEON_BRANCH and
    NEON_FUNCTION_<SLUG>_BASE_URL for each function of the branch into a dotenv file,
    keeping every other line of it.

    Example: phloem env pull --file .env.preview
    """
    with api_errors():
        target = _pull_env(client_for(data_dir), project_root(project), branch, file)
    out.print(f"wrote {target}")


@env_app.command("run", context_settings={"allow_extra_args": True,
                                          "ignore_unknown_options": True})
def env_run(ctx: typer.Context, data_dir: DataDirOpt, branch: BranchOpt = "",
            forward: Annotated[bool, typer.Option(
                "--forward-services", help="Reach the branch's services through local "
                "forwarders (127.0.0.1) for the command's run, instead of their names "
                "that only isolates resolve.")] = False) -> None:
    """Run a command with the branch's connection variables injected.

    Example: phloem env run --forward-services -- node scripts/upload.mjs
    """
    command = list(ctx.args)
    if not command:
        fail("env run: give a command after --, e.g. phloem env run -- psql")
    client = client_for(data_dir)
    with api_errors():
        name = client.get_branch(branch)["name"]
        forwarders, service_env = _forwarders(client, branch) if forward else (
            None, client.service_env(branch)["env"])
        if not forward:
            _hosts_notice(client.service_env(branch)["hosts"])
        env = {**os.environ, **service_env,
               "DATABASE_URL": client.connection_string(branch, pooled=True),
               "DATABASE_URL_UNPOOLED": client.connection_string(branch, pooled=False),
               "PHLOEM_BRANCH": name, "NEON_BRANCH": name}
    if shutil.which(command[0]) is None:
        fail(f"env run: command not found: {command[0]}", 127)
    if forwarders is None:
        raise typer.Exit(subprocess.call(command, env=env))
    with forwarders.in_thread():
        code = subprocess.call(command, env={**env, **forwarders.localize(service_env)})
    raise typer.Exit(code)


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Where to create the project.")]
    = Path("."),
    template: Annotated[str, typer.Option(
        "--template", "-t", envvar="PHLOEM_TEMPLATE",
        help="python: phloemfile.py + an ASGI app; hono: neon.ts + a TypeScript Hono "
        "app.")] = "python",
) -> None:
    """Scaffold a project: a config (phloemfile.py or neon.ts) and one function.

    Example: phloem init my-api --template hono
    """
    templates = {"python": CONFIG_FILE, "hono": "neon.ts"}
    if template not in templates:
        fail(f"template: {template!r} is not available (available: "
             f"{', '.join(templates)})")
    directory.mkdir(parents=True, exist_ok=True)
    for config_name in ("phloemfile.py", "neon.ts"):
        if (directory / config_name).exists():
            fail(f"{directory / config_name} exists; not overwriting")
    src = resources.files("phloem") / "templates" / template
    written = []

    def copy(node: Any, dest: Path) -> None:
        for item in node.iterdir():
            if item.name == "__pycache__":
                continue
            target = dest / item.name.removesuffix(".tmpl")
            if item.is_dir():
                target.mkdir(exist_ok=True)
                copy(item, target)
            elif not target.exists():
                target.write_text(item.read_text())
                written.append(str(target))

    copy(src, directory)
    for path in written:
        out.print(f"  created {path}")
    out.print("next: phloem link && phloem deploy")


@app.command("dev")
def dev(
    data_dir: DataDirOpt, project: ProjectOpt = Path("."), env_file: EnvFileOpt = None,
    branch: BranchOpt = "",
    port: Annotated[int, typer.Option(
        "--port", envvar="PHLOEM_DEV_PORT", min=1, max=65535,
        help="First port tried for functions without dev.port in neon.ts; a taken port "
        "is skipped (and said).")] = 8787,
) -> None:
    """Serve the project's functions from the working tree with the linked branch's
    database and env, each on its own port of localhost (any Host header), reloading a
    function when its files change (requests in flight finish on the old version).

    Example: phloem dev   # then: curl http://localhost:8787/
    """
    import asyncio

    from phloem.control.triggers import check_triggers
    from phloem.dev.server import DevPortError, DevServer
    from phloem.runtimes.base import BuildFailed
    from phloem.system.validation import InvalidInput

    root = project_root(project)
    proj = _load(root, env_file)
    client = client_for(data_dir)
    with api_errors(ConfigError):
        info = client.get_branch(branch)
        desired = proj.desired(branch_info(info))
        base_env = {
            "DATABASE_URL": client.connection_string(branch, pooled=True),
            "DATABASE_URL_UNPOOLED": client.connection_string(branch, pooled=False),
            "PHLOEM_BRANCH": info["name"], "NEON_BRANCH": info["name"],
            "PHLOEM_BRANCH_ID": info["id"],
        }
        forwarders, service_env = _forwarders(client, branch)
        service_urls = forwarders.urls if forwarders else {}
    if not desired:
        fail(f"{proj.config_file}: declares no functions to serve")
    try:
        triggers = check_triggers(proj.triggers)
    except InvalidInput as exc:
        fail(f"{proj.config_file}: {exc.field}: {exc.message}")

    def say(line: str) -> None:
        out.print(escape(line), highlight=False)

    try:
        server = DevServer(root, desired, info["id"], base_env, port=port, say=say,
                           triggers=triggers, services=forwarders, service_env=service_env)
    except BuildFailed as exc:  # a runtime's tools (Node, esbuild) could not be provisioned
        fail(str(exc))

    def ready() -> None:
        for slug, first, got in server.moved:
            err.print(f"port {first} is in use: {slug} serves on {got}", highlight=False)
        width = max(len(slug) for slug in desired)
        for slug in desired:
            state = "" if server.functions[slug].ok else "  [red](not started: see above)[/]"
            out.print(f"[bold]{slug:<{width}}[/]  {server.url(slug)}{state}",
                      highlight=False)
        for t in server.triggers.specs:
            due = server.triggers.next_due[t.name].strftime("%H:%M")
            out.print(f"trigger {t.name} -> {t.function}{t.function_path}: {t.cron} "
                      f"(UTC; next {due})", highlight=False)
        for name, url in (forwarders.local if forwarders else {}).items():
            out.print(f"service {name}: {url} (forwards to {service_urls[name]})",
                      highlight=False)
        out.print(f"watching {escape(str(root))} (Ctrl-C to stop)", highlight=False)

    try:
        asyncio.run(server.run(ready))
    except DevPortError as exc:
        fail(f"port: {exc.strerror}")
    except OSError as exc:
        fail(f"port: {exc}")
