"""``phloem backup create|list|restore``.

    phloem backup create                       # through the API; the platform keeps serving
    phloem backup list
    phloem backup restore bk-20261201T170000Z-1a2b --data-dir /var/lib/phloem-restored
    phloem up --data-dir /var/lib/phloem-restored
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from phloem.cli.main import (
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
from phloem.system.settings import default_data_dir

backup_app = typer.Typer(help="Back up the whole platform (metadata, every branch, "
                              "deployments, secrets) and restore it into a new data dir.",
                         no_args_is_help=True)
app.add_typer(backup_app, name="backup")


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


@backup_app.command("create")
def backup_create(
    data_dir: DataDirOpt,
    timeout: Annotated[float, typer.Option(
        envvar="PHLOEM_BACKUP_TIMEOUT", help="Seconds to wait for the backup to finish "
        "(it goes on in the platform after that).")] = 3600.0,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Back up the running platform into <data dir>/backups/<id>: the metadata and every
    branch as base backups (each keeps serving), artifacts, built deployments and the
    secrets that open sealed values. Branch creates, resets and deletes wait meanwhile.

    Example: phloem backup create
    """
    client = client_for(data_dir)
    quiet = output is OutputFormat.json
    with api_errors():
        job: dict[str, Any] = client.json("POST", "/backups")
        shown = 0
        deadline = time.monotonic() + timeout
        with err.status(f"backing up ({job['id']})") as spinner:
            while True:
                job = client.json("GET", f"/backups/{job['id']}")
                for line in job["progress"][shown:]:
                    spinner.update(f"backing up: {line[:100]}")
                    if not quiet:
                        err.print(f"  {escape(line)}", highlight=False)
                shown = len(job["progress"])
                if job["state"] != "running":
                    break
                if time.monotonic() > deadline:
                    fail(f"backup {job['id']} still running after {timeout:.0f} s; "
                         f"see 'phloem backup list'")
                time.sleep(0.2)
    if quiet:
        print_json(job)
    if job["state"] != "complete":
        fail(f"backup {job['id']} failed: {job['error']}")
    if not quiet:
        for warning in job["warnings"]:
            err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        out.print(f"[bold green]backup {job['id']}[/]  {_size(job['size_bytes'])}  "
                  f"{len(job['branches'])} branches  {job['path']}", highlight=False)
        out.print("  it holds the platform's secrets: keep it as private as the data dir")


@backup_app.command("list")
def backup_list(data_dir: DataDirOpt, output: OutputOpt = OutputFormat.text) -> None:
    """List the backups in <data dir>/backups (and one running)."""
    with api_errors():
        rows: list[dict[str, Any]] = client_for(data_dir).json("GET", "/backups")
    if output is OutputFormat.json:
        print_json(rows)
        return
    table = Table("id", "created", "size", "branches", "state")
    for b in rows:
        table.add_row(b["id"], b["created_at"] or "-", _size(b["size_bytes"]),
                      ", ".join(x["name"] for x in b["branches"]) or "-", b["state"])
    out.print(table)


def _default_backups_dir() -> Path:
    return default_data_dir() / "backups"


@backup_app.command("restore")
def backup_restore(
    backup: Annotated[str, typer.Argument(help="A backup's id (looked up in "
                                          "--backups-dir) or the path of its directory.")],
    data_dir: Annotated[Path, typer.Option(
        "--data-dir", envvar="PHLOEM_RESTORE_DATA_DIR", help="The data dir to create: "
        "must not exist or be empty.", show_default="required")],
    backups_dir: Annotated[Path, typer.Option(
        "--backups-dir", envvar="PHLOEM_BACKUPS_DIR", default_factory=_default_backups_dir,
        help="Where backup ids are looked up.",
        show_default="backups/ in $PHLOEM_DATA_DIR or the default data dir")],
    service_user: Annotated[str, typer.Option(
        envvar="PHLOEM_SERVICE_USER", help="Unprivileged user the restored clusters "
        "belong to (root only; as for 'phloem up').")] = "phloem",
    isolate_uid_base: Annotated[int | None, typer.Option(
        envvar="PHLOEM_ISOLATE_UID_BASE", help="Isolate uid base the restored platform "
        "will run with; files of functions move to it (pass the same to 'phloem up').",
        show_default="the backed-up platform's")] = None,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Lay out a backup as a new data dir, offline (no platform needed); then start it
    with 'phloem up --data-dir <it>'.

    Example: phloem backup restore bk-20261201T170000Z-1a2b --data-dir /var/lib/phloem2
    """
    from phloem.backup.manifest import BackupError
    from phloem.backup.restore import backup_path, restore

    quiet = output is OutputFormat.json

    def progress(line: str) -> None:
        if not quiet:
            err.print(f"  {escape(line)}", highlight=False)

    try:
        result = restore(backup_path(backups_dir, backup), data_dir,
                         service_user=service_user, isolate_uid_base=isolate_uid_base,
                         progress=progress)
    except BackupError as exc:
        fail(exc.message)
    m = result.manifest
    if quiet:
        print_json({"backup": m.id, "data_dir": str(result.data_dir),
                    "isolate_uid_base": result.isolate_uid_base, "files": result.files,
                    "bytes": result.bytes, "ms": result.ms, "method": result.method,
                    "branches": [b.name for b in m.branches], "warnings": result.warnings})
        return
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    out.print(f"[bold green]restored {m.id}[/] into {result.data_dir}: "
              f"{len(m.branches)} branches, {len(m.deployments)} deployments, "
              f"{_size(result.bytes)} by {result.method} in {result.ms / 1000:.1f} s",
              highlight=False)
    out.print(f"  start it: phloem up --data-dir {result.data_dir} --isolate-uid-base "
              f"{result.isolate_uid_base}", highlight=False)
    out.print("  its branches keep their database ports: stop the original platform "
              "first if it runs on this machine", highlight=False)
