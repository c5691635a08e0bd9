"""``phloem domains``: custom domains, a host name of yours served by one function of one
branch (not inherited by its children).

    phloem domains add api.example.com --function todos [--branch B] [--hsts]
    phloem domains list [--branch B] [--status] --output json
    phloem domains get api.example.com        # with DNS and certificate status
    phloem domains remove api.example.com
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

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

domains_app = typer.Typer(help="Custom domains: add, list, get, remove.",
                          no_args_is_help=True)
app.add_typer(domains_app, name="domains")

HostnameArg = Annotated[str, typer.Argument(help="The custom domain, e.g. api.example.com.")]


def _call(data_dir: Path, method: str, path: str, **kwargs: Any) -> Any:
    with api_errors():
        return client_for(data_dir).json(method, path, **kwargs)


def _path(hostname: str) -> str:
    return f"/domains/{quote(hostname.strip(), safe='')}"


def _show(d: dict[str, Any]) -> None:
    hsts = " [cyan]hsts[/]" if d["hsts"] else ""
    out.print(f"[bold]{escape(d['hostname'])}[/] -> {d['function']} on branch "
              f"{escape(d['branch'])}{hsts}  {d['url']}", highlight=False)
    status = d.get("status")
    if status:
        dns, cert = status["dns"], status["certificate"]
        mark = "[green]ok[/]" if dns["ok"] else "[yellow]not yet[/]"
        addrs = ", ".join(dns["addresses"]) or "-"
        out.print(f"  dns          {mark} ({addrs}){_why(dns['reason'])}", highlight=False)
        mark = "[green]issued[/]" if cert["issued"] else "[yellow]not issued[/]"
        until = f" until {cert['not_after']}" if cert.get("not_after") else ""
        out.print(f"  certificate  {mark}{until}{_why(cert['reason'])}", highlight=False)


def _why(reason: str | None) -> str:
    return f": {escape(reason)}" if reason else ""


@domains_app.command("add")
def domains_add(
    hostname: HostnameArg, data_dir: DataDirOpt,
    function: Annotated[str, typer.Option("--function", "-f",
                                          help="The function's slug on the branch.")],
    branch: BranchOpt = "",
    hsts: Annotated[bool, typer.Option(
        "--hsts", help="Send Strict-Transport-Security (one year) on its responses over "
        "TLS.")] = False,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Serve the branch's function at HOSTNAME too (point its DNS at this host). The name
    is unique on the platform and stays with this branch: child branches do not get it."""
    row = _call(data_dir, "POST", "/domains",
                json={"hostname": hostname, "function": function, "branch": branch,
                      "hsts": hsts})
    if output is OutputFormat.json:
        print_json(row)
    else:
        _show(row)


@domains_app.command("list")
def domains_list(
    data_dir: DataDirOpt,
    branch: Annotated[str | None, typer.Option(
        "--branch", "-b", help="Only this branch's (name or id).",
        show_default="every branch")] = None,
    status: Annotated[bool, typer.Option("--status", help="Check each one's DNS and "
                                         "certificate too.")] = False,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """The custom domains: host name, branch, function, HSTS, owner."""
    params: dict[str, Any] = {"status": status}
    if branch:
        params["branch"] = branch
    rows = _call(data_dir, "GET", "/domains", params=params)
    if output is OutputFormat.json:
        print_json(rows)
        return
    if not rows:
        out.print("no custom domains")
        return
    table = Table("hostname", "branch", "function", "hsts", "owner", *(
        ("dns", "certificate") if status else ()))
    for d in rows:
        checks: tuple[str, ...] = ()
        if status and d.get("status"):
            checks = ("ok" if d["status"]["dns"]["ok"] else "no",
                      "issued" if d["status"]["certificate"]["issued"] else "no")
        table.add_row(escape(d["hostname"]), escape(d["branch"]), d["function"],
                      "yes" if d["hsts"] else "no", d["owner"] or "-", *checks)
    out.print(table)


@domains_app.command("get")
def domains_get(hostname: HostnameArg, data_dir: DataDirOpt,
                output: OutputOpt = OutputFormat.text) -> None:
    """One custom domain and its status: whether its name resolves to this host and
    whether its certificate is issued (with the reason when not)."""
    row = _call(data_dir, "GET", _path(hostname))
    if output is OutputFormat.json:
        print_json(row)
    else:
        _show(row)


@domains_app.command("remove")
def domains_remove(hostname: HostnameArg, data_dir: DataDirOpt,
                   output: OutputOpt = OutputFormat.text) -> None:
    """Stop serving HOSTNAME (the function keeps its own URL)."""
    row = _call(data_dir, "DELETE", _path(hostname))
    if output is OutputFormat.json:
        print_json(row)
    else:
        out.print(f"removed {escape(row['hostname'])} (was {row['function']} on branch "
                  f"{escape(row['branch'])})")
