"""``phloem functions``: deploy, inspect, roll back and follow functions, through the API.

    phloem functions deploy todos --path examples/hello-python --entry main:app
    phloem functions deployments todos
    phloem functions rollback todos
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from phloem.cli.main import (
    BranchOpt,
    DataDirOpt,
    OutputFormat,
    OutputOpt,
    api_errors,
    client_for,
    err,
    fail,
    functions_app,
    out,
    parse_pairs,
    print_json,
)
from phloem.project.packing import PackError
from phloem.runtimes.registry import RUNTIMES, choose
from phloem.system.limits import check_limits
from phloem.system.validation import InvalidInput, check_slug


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    return parse_pairs("env", pairs)


@functions_app.command("deploy")
def functions_deploy(
    slug: Annotated[str, typer.Argument(help="Function slug: ^[a-z0-9]{1,20}$, fixed once "
                                             "deployed.")],
    data_dir: DataDirOpt,
    path: Annotated[Path, typer.Option("--path", "-p", envvar="PHLOEM_PATH",
                                       help="Source directory.")] = Path("."),
    entry: Annotated[str | None, typer.Option(
        "--entry", "-e", envvar="PHLOEM_ENTRY", help="The app, e.g. " + ", ".join(
            f"{rt.entry_example} ({rt.family})" for rt in RUNTIMES)
        + " [default: the first runtime's default found in the source, e.g. main.py -> "
        "main:app]")] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="KEY=VALUE sets a variable, KEY= removes it; others carry over from "
        "the previous deployment (repeatable).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Display name [default: the "
                                             "slug]")] = None,
    runtime: Annotated[str | None, typer.Option(
        "--runtime", envvar="PHLOEM_RUNTIME", help="Runtime: "
        f"{', '.join(n for rt in RUNTIMES for n in (rt.family, rt.name))} [default: the one "
        "the entry or the source's files call for; a family means the platform's "
        "version]")] = None,
    limit: Annotated[list[str] | None, typer.Option(
        "--limit", help="NAME=VALUE overriding a platform limit for this function, e.g. "
        "idle_timeout_s=60, memory_mb=512, max_isolates=4 (repeatable).")] = None,
    branch: BranchOpt = "",
    output: OutputOpt = OutputFormat.text,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", envvar="PHLOEM_WAIT", help="Wait until the deployment is ready "
        "or failed; --no-wait returns once it is accepted (state building: see 'phloem "
        "functions deployments SLUG').")] = True,
    no_bundle: Annotated[bool, typer.Option(
        "--no-bundle", help="The entry is a prebuilt bundle (node): it runs as uploaded, "
        "with no npm install and no esbuild. --path may name the bundle file itself.")]
    = False,
) -> None:
    """Deploy a directory as a function on a branch and wait until it is ready.

    Example: phloem functions deploy todos --path examples/hello-python --entry main:app
    """
    try:
        check_slug(slug)
        if no_bundle and path.is_file():
            # The file is the bundle: it alone is uploaded, and it is the entry.
            if entry is not None and entry != path.name:
                raise InvalidInput("entry", f"with --no-bundle and --path naming a file, "
                                   f"the file is the entry (got --entry {entry!r})")
            chosen, resolved_entry = choose(path.parent, runtime, path.name)
        else:
            chosen, resolved_entry = choose(path, runtime, entry)
        if no_bundle and not chosen.bundles:
            raise InvalidInput("bundle", f"--no-bundle: {chosen.family} functions are not "
                               "bundled; it applies to node functions")
        runtime = runtime or chosen.family
        env_map = parse_env_pairs(env or [])
        unset = [k for k, v in env_map.items() if v == ""]
        env_map = {k: v for k, v in env_map.items() if v != ""}
        limits = check_limits(parse_pairs("limit", limit or []))
    except InvalidInput as exc:
        fail(str(exc))
    client = client_for(data_dir)
    quiet = output is OutputFormat.json
    with api_errors(InvalidInput, PackError):
        with err.status(f"deploying {slug}") as spinner:
            def progress(line: str) -> None:
                spinner.update(f"deploying {slug}: {line[:100]}")
                if not quiet:
                    err.print(f"  [dim]{escape(line)}[/]", highlight=False)

            dep = client.deploy(branch, slug, path, resolved_entry, env=env_map, name=name,
                                runtime=runtime, limits=limits, unset_env=unset,
                                progress=progress, wait=wait, bundle=not no_bundle)
        fn = client.get_function(branch, slug)
    if quiet:
        print_json({**fn, "deployment": dep})
    elif dep["status"] == "ready":
        out.print(f"[bold green]deployed[/] {slug}  {fn['invocation_url']}  ready")
    elif dep["status"] == "building":
        out.print(f"[bold]accepted[/] {slug}  deployment {dep['id']} building  "
                  f"(phloem functions deployments {slug})", highlight=False)
    if dep["status"] not in ("ready", "building"):
        fail(f"deployment {dep['id']} of {slug} failed: {dep['error']}")


@functions_app.command("list")
def functions_list(data_dir: DataDirOpt, branch: BranchOpt = "",
                   output: OutputOpt = OutputFormat.text) -> None:
    """List the functions of a branch."""
    with api_errors():
        fns = client_for(data_dir).list_functions(branch)
    if output is OutputFormat.json:
        print_json(fns)
        return
    table = Table("slug", "name", "status", "url", "deployment")
    for f in fns:
        table.add_row(f["slug"], f["name"], f["status"], f["invocation_url"],
                      f["deployment_id"] or "-")
    out.print(table)


@functions_app.command("get")
def functions_get(
    slug: str, data_dir: DataDirOpt, branch: BranchOpt = "",
    output: OutputOpt = OutputFormat.text,
    list_env: Annotated[bool, typer.Option("--list-env", help="Show the env's names.")]
    = False,
    show_values: Annotated[bool, typer.Option("--show-values", help="With --list-env: "
                                              "show the values too (secrets!).")] = False,
) -> None:
    """Show one function and its latest deployment."""
    with api_errors():
        client = client_for(data_dir)
        fn = client.get_function(branch, slug)
        env = client.function_env(branch, slug, show_values) if list_env else None
    if env is not None:
        fn["env"] = env["values"] if show_values else env["keys"]
    if output is OutputFormat.json:
        print_json(fn)
        return
    if env is not None:
        for key in env["keys"]:
            out.print(f"{key}={env['values'][key]}" if show_values else key, highlight=False)
        return
    for key in ("slug", "name", "branch_id", "branch_name", "runtime", "invocation_url",
                "status", "deployment_id", "created_at", "owner"):
        out.print(f"{key:<15} {fn.get(key) or '-'}")
    latest = fn.get("latest_deployment")
    if latest and latest["status"] == "failed":
        out.print(f"{'last error':<15} {latest['error']}")


@functions_app.command("delete")
def functions_delete(slug: str, data_dir: DataDirOpt, branch: BranchOpt = "",
                     output: OutputOpt = OutputFormat.text) -> None:
    """Delete a function: its URL stops answering and its isolates stop."""
    with api_errors():
        client_for(data_dir).delete_function(branch, slug)
    if output is OutputFormat.json:
        print_json({"deleted": slug, "branch": branch})
    else:
        out.print(f"deleted {slug}")


DEPLOYMENT_STYLE = {"active": "bold green", "ready": "green", "building": "yellow",
                    "failed": "red", "pruned": "dim"}


@functions_app.command("deployments")
def functions_deployments(slug: str, data_dir: DataDirOpt, branch: BranchOpt = "",
                          output: OutputOpt = OutputFormat.text) -> None:
    """A function's deployments, newest first, with their state: active, ready (kept
    built: a rollback target), pruned, building or failed.

    Example: phloem functions deployments todos --output json
    """
    with api_errors():
        deps = client_for(data_dir).list_deployments(branch, slug)
    if output is OutputFormat.json:
        print_json(deps)
        return
    table = Table("deployment", "state", "created", "activated", "artifact", "entry",
                  "error")
    for d in deps:
        style = DEPLOYMENT_STYLE.get(d["state"], "")
        table.add_row(d["id"], f"[{style}]{d['state']}[/]", str(d["created_at"])[:19],
                      str(d["activated_at"] or "-")[:19], d["artifact_sha256"][:12],
                      d["entry"] + ("" if d["bundle"] else " (prebuilt)"),
                      escape((d["error"] or "")[:60]))
    out.print(table)


@functions_app.command("rollback")
def functions_rollback(
    slug: str, data_dir: DataDirOpt, branch: BranchOpt = "",
    to: Annotated[str | None, typer.Option("--to", help="Deployment id to switch to "
                                           "[default: the newest ready one older than the "
                                           "active one]")] = None,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Switch a function back to an earlier deployment in one step, without a rebuild:
    its code, env and limits as they were. The replaced one stays kept (--to switches
    forward again).

    Example: phloem functions rollback todos --to dep-3f9a1c2b7d4e
    """
    with api_errors():
        done = client_for(data_dir).rollback(branch, slug, to)
    if output is OutputFormat.json:
        print_json(done)
        return
    dep = done["deployment"]
    if done["previous_deployment_id"] is None:
        out.print(f"{slug}: deployment {dep['id']} is already active", highlight=False)
        return
    out.print(f"[bold green]rolled back[/] {slug}: {done['previous_deployment_id']} -> "
              f"{dep['id']} (created {str(dep['created_at'])[:19]}) in "
              f"{done['switch_ms']:.1f} ms", highlight=False)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise InvalidInput("since", f"expected a duration like 90s, 10m or 2h (got "
                                    f"{text!r})") from None
    if value <= 0:
        raise InvalidInput("since", f"must be positive (got {text!r})")
    return value


@functions_app.command("logs")
def functions_logs(
    slug: str, data_dir: DataDirOpt, branch: BranchOpt = "",
    lines: Annotated[int, typer.Option(help="How many recent lines.")] = 200,
    since: Annotated[str | None, typer.Option(help="Only lines newer than this, e.g. 10m "
                                              "[default: no limit]")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing new lines.")] = False,
) -> None:
    """Print a function's log: isolate output (tagged with request ids), lifecycle
    events and one access line per request.

    Example: phloem functions logs todos --since 10m --follow
    """
    try:
        since_s = parse_duration(since) if since else None
    except InvalidInput as exc:
        fail(str(exc))
    client = client_for(data_dir)
    try:
        with api_errors():
            if follow:
                for line in client.follow_logs(branch, slug, lines, since_s):
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
            else:
                sys.stdout.write(client.function_logs(branch, slug, lines, since_s))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
