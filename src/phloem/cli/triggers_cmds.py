"""``phloem triggers``: a branch's schedule triggers (declared in neon.ts or
phloemfile.py, sent by ``phloem deploy``), their history, switching them, firing now.

    phloem triggers list
    phloem triggers history nightly --output json
    phloem triggers disable nightly
    phloem triggers run nightly          # fire now, as its schedule would
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from phloem.cli.main import (
    BranchOpt,
    DataDirOpt,
    OutputFormat,
    OutputOpt,
    api_errors,
    app,
    client_for,
    out,
    print_json,
)

triggers_app = typer.Typer(help="Schedule triggers: list, history, enable, disable, run.",
                           no_args_is_help=True)
app.add_typer(triggers_app, name="triggers")

NameArg = Annotated[str, typer.Argument(help="The trigger's name (its key in neon.ts).")]
RUN_STYLE = {"succeeded": "green", "failed": "red", "running": "yellow"}


def _when(trigger: dict[str, Any]) -> str:
    """``0 3 * * * (UTC)``, or ``object created in images/in/`` for a storage trigger."""
    if trigger.get("type", "schedule") == "schedule":
        return f"{trigger['cron']} (UTC)"
    return escape(f"object created in {trigger['bucket']}/{trigger['prefix']}")


def _show(trigger: dict[str, Any]) -> None:
    state = "[green]enabled[/]" if trigger["enabled"] else "[dim]disabled[/]"
    out.print(f"{escape(trigger['name'])} {state}: {_when(trigger)} -> "
              f"{trigger['function']} {escape(trigger['functionPath'])}")


@triggers_app.command("list")
def triggers_list(data_dir: DataDirOpt, branch: BranchOpt = "",
                  output: OutputOpt = OutputFormat.text) -> None:
    """The branch's triggers: schedule (UTC) or bucket, function and path, enabled or not."""
    with api_errors():
        rows = client_for(data_dir).list_triggers(branch)
    if output is OutputFormat.json:
        print_json(rows)
        return
    table = Table("name", "when", "function", "path", "enabled", "owner")
    for t in rows:
        table.add_row(escape(t["name"]), _when(t), t["function"], escape(t["functionPath"]),
                      "yes" if t["enabled"] else "[dim]no[/]", t["owner"] or "-")
    out.print(table if rows else "no triggers")


@triggers_app.command("history")
def triggers_history(
    name: NameArg, data_dir: DataDirOpt, branch: BranchOpt = "",
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000,
                                       help="How many runs, newest first.")] = 50,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """A trigger's runs, newest first: when, why (schedule or manual), attempts, the
    function's last status and error."""
    with api_errors():
        runs = client_for(data_dir).trigger_history(branch, name, limit)
    if output is OutputFormat.json:
        print_json(runs)
        return
    table = Table("invocation", "scheduled", "reason", "status", "attempts", "http", "error")
    for r in runs:
        style = RUN_STYLE.get(r["status"], "")
        table.add_row(r["id"], str(r["scheduled_for"])[:19], r["reason"],
                      f"[{style}]{r['status']}[/]", str(r["attempts"]),
                      str(r["http_status"] or "-"), escape((r["error"] or "")[:60]))
    out.print(table if runs else "no runs yet")


def _switch(data_dir: Path, branch: str, name: str, action: str,
            output: OutputFormat) -> None:
    with api_errors():
        row = client_for(data_dir).trigger_action(branch, name, action)
    if output is OutputFormat.json:
        print_json(row)
    else:
        _show(row)


@triggers_app.command("enable")
def triggers_enable(name: NameArg, data_dir: DataDirOpt, branch: BranchOpt = "",
                    output: OutputOpt = OutputFormat.text) -> None:
    """Fire it on its schedule again (until a deploy sets what the config says)."""
    _switch(data_dir, branch, name, "enable", output)


@triggers_app.command("disable")
def triggers_disable(name: NameArg, data_dir: DataDirOpt, branch: BranchOpt = "",
                     output: OutputOpt = OutputFormat.text) -> None:
    """Stop firing it (a run in flight finishes; ``run`` still fires it)."""
    _switch(data_dir, branch, name, "disable", output)


@triggers_app.command("run")
def triggers_run(name: NameArg, data_dir: DataDirOpt, branch: BranchOpt = "",
                 output: OutputOpt = OutputFormat.text) -> None:
    """Fire it now, enabled or not, delivered as its schedule would (with retries);
    prints the invocation id (see ``history``)."""
    with api_errors():
        run = client_for(data_dir).trigger_action(branch, name, "run")
    if output is OutputFormat.json:
        print_json(run)
    else:
        out.print(f"started {run['id']} ({escape(name)})")
