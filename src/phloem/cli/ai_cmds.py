"""``phloem ai``: the AI Gateway's usage, per branch, function, provider and model.

    phloem ai usage                       # every branch
    phloem ai usage --branch dev --output json
"""

from __future__ import annotations

from typing import Annotated

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
    out,
    print_json,
)

ai_app = typer.Typer(help="The AI Gateway: usage per branch and function.",
                     no_args_is_help=True)
app.add_typer(ai_app, name="ai")


@ai_app.command("usage")
def ai_usage(
    data_dir: DataDirOpt,
    branch: Annotated[str, typer.Option("--branch", "-b", help="Branch name or id "
                                        "[default: every branch].", show_default=False)] = "",
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Requests, errors and input/output tokens the AI Gateway counted, per branch,
    calling function ('-' for the branch-wide token), provider and model."""
    with api_errors():
        rows = client_for(data_dir).json("GET", "/ai/usage",
                                         params={"branch": branch} if branch else {})
    if output is OutputFormat.json:
        print_json(rows)
        return
    table = Table("branch", "function", "provider", "model", "requests", "errors",
                  "input tokens", "output tokens", "last")
    for r in rows:
        table.add_row(r["branch_id"], r["function"] or "-", r["provider"],
                      escape(r["model"] or "-"), str(r["requests"]), str(r["errors"]),
                      str(r["input_tokens"]), str(r["output_tokens"]), str(r["last_at"])[:19])
    out.print(table if rows else "no AI Gateway usage yet")
