"""``phloem keys``: scoped API keys; ``phloem login``/``logout``: remote platforms.

    phloem keys create --name ci --scope read --scope deploy --branch main --expires-in 30d
    phloem keys list --output json          # scopes, branches, expiry, last use; no secret
    phloem keys revoke key-0123456789ab
    phloem login --api https://host:8789 --key phk_... --ca-cert ca.pem [--profile NAME]
    phloem logout [--profile NAME | --all]

A key's secret is printed once, by ``keys create``, and never again. ``login`` checks the
key against the platform and keeps it in a profile (``$XDG_CONFIG_HOME/phloem/
profiles.json``, 0600); every other verb then talks to that platform, unless
``PHLOEM_API_URL``/``PHLOEM_API_KEY`` are set (they win over a profile, which wins over
the local data dir's ``credentials.json``).
"""

from __future__ import annotations

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
from phloem.project.client import (
    Client,
    Credentials,
    profiles_path,
    read_profiles,
    write_profiles,
)
from phloem.project.plan import ConfigError, parse_ttl

keys_app = typer.Typer(help="Scoped API keys: create (the secret is shown once), list, "
                            "revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

ProfileOpt = Annotated[str | None, typer.Option(
    "--profile", envvar="PHLOEM_PROFILE", help="Profile name [default: the current one, "
    "else 'default'].", show_default=False)]


def parse_expiry(text: str) -> int:
    """``30d``, ``12h``, ``30m``, ``90s``, ``2w`` or seconds -> seconds."""
    try:
        return parse_ttl("expires_in", int(text) if text.isdigit() else text)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


@keys_app.command("create")
def keys_create(
    data_dir: DataDirOpt,
    name: Annotated[str, typer.Option("--name", help="What the key is for.")],
    scope: Annotated[list[str], typer.Option(
        "--scope", help="Repeatable: read, deploy, branches, admin, metrics (admin "
        "includes all; deploy and branches include read).")],
    branch: Annotated[list[str] | None, typer.Option(
        "--branch", "-b", help="Limit the key to this branch (name or id; repeatable).",
        show_default="every branch")] = None,
    expires_in: Annotated[str | None, typer.Option(
        "--expires-in", help="It stops working after this long: 30d, 12h, 90m, 3600.",
        show_default="never")] = None,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Create a key. Its secret is printed this once: store it now."""
    seconds = parse_expiry(expires_in) if expires_in is not None else None
    with api_errors():
        key = client_for(data_dir).create_key(name, scope, branch or None, seconds)
    if output is OutputFormat.json:
        print_json(key)
        return
    out.print(f"created key {key['id']} ({escape(key['name'])}): scopes "
              f"{', '.join(key['scopes'])}", highlight=False)
    out.print(key["secret"], highlight=False, soft_wrap=True)
    err.print("this secret is shown once; it cannot be shown again", highlight=False)


@keys_app.command("list")
def keys_list(data_dir: DataDirOpt, output: OutputOpt = OutputFormat.text) -> None:
    """Every key: scopes, branches, expiry, last use and state (never a secret)."""
    with api_errors():
        rows = client_for(data_dir).list_keys()
    if output is OutputFormat.json:
        print_json(rows)
        return
    table = Table("id", "name", "scopes", "branches", "expires", "last used", "state")
    for k in rows:
        table.add_row(k["id"], escape(k["name"]), ",".join(k["scopes"]),
                      ",".join(k["branches"]) if k["branches"] is not None else "all",
                      _when(k["expires_at"]), _when(k["last_used_at"]), k["state"])
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key-...).")],
                data_dir: DataDirOpt, output: OutputOpt = OutputFormat.text) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    with api_errors():
        key = client_for(data_dir).revoke_key(key_id)
    if output is OutputFormat.json:
        print_json(key)
        return
    out.print(f"revoked {key['id']} ({escape(key['name'])})", highlight=False)


@app.command()
def login(
    api: Annotated[str, typer.Option("--api", help="The platform's API, e.g. "
                                     "https://host:8789 (its --api-listen).")],
    key: Annotated[str, typer.Option("--key", help="An API key (phloem keys create).",
                                     prompt=True, hide_input=True)],
    profile: ProfileOpt = None,
    ca_cert: Annotated[Path | None, typer.Option(
        "--ca-cert", help="PEM CA certificate to verify the API's (e.g. the platform's "
        "<data dir>/tls/ca.pem with --tls self-signed).", show_default="the system's")]
    = None,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Check a key against a platform and keep both in a profile (0600): every verb then
    works against that platform."""
    url = api.rstrip("/")
    if not url.startswith(("https://", "http://")):
        fail(f"api: must start with https:// or http:// (got {api!r})")
    ca = ca_cert.absolute() if ca_cert is not None else None
    with api_errors(what=f"login to {url}"):
        client = Client(Credentials(url, key, ca))
        me = client.my_key()
    data = read_profiles()
    name = profile or data.get("current") or "default"
    data["profiles"][name] = {"api_url": url, "api_key": key,
                              "ca_cert": str(ca) if ca is not None else None}
    data["current"] = name
    path = write_profiles(data)
    summary: dict[str, Any] = {"profile": name, "api_url": url, "path": str(path),
                               "key": {k: me[k] for k in ("id", "name", "scopes",
                                                          "branches", "expires_at")}}
    if output is OutputFormat.json:
        print_json(summary)
        return
    out.print(f"logged in to {url} as key {me['id']} ({escape(me['name'])}, scopes "
              f"{', '.join(me['scopes'])}); profile {name!r} in {path}", highlight=False)
    if url.startswith("http://"):
        err.print("warning: plain http: the key crosses the network in clear")


@app.command()
def logout(profile: ProfileOpt = None,
           all_profiles: Annotated[bool, typer.Option(
               "--all", help="Forget every profile.")] = False) -> None:
    """Forget a profile (the current one by default); the key itself stays valid
    (revoke it with phloem keys revoke)."""
    data = read_profiles()
    if all_profiles:
        names = list(data["profiles"])
    else:
        name = profile or data.get("current")
        if not name or name not in data["profiles"]:
            fail(f"profile: no profile {name!r} in {profiles_path()}")
        names = [name]
    for name in names:
        data["profiles"].pop(name, None)
    if data.get("current") in names:
        data["current"] = None
    write_profiles(data)
    out.print(f"logged out: {', '.join(names) or 'no profile'}", highlight=False)
