"""``phloem`` commands.

    phloem up --deploy examples/hello-python
    phloem functions deploy todos --path examples/hello-python --entry main:app
    phloem functions get todos --output json
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from phloem import __version__
from phloem.gateway.proxies import parse_networks
from phloem.project.client import Client, ClientError, load_credentials
from phloem.runtimes.registry import choose
from phloem.system.ai_providers import parse_ai_providers
from phloem.system.limits import FunctionLimits
from phloem.system.settings import ACME_DIRECTORY, Settings, default_data_dir
from phloem.system.validation import InvalidInput, check_token

if TYPE_CHECKING:
    from phloem.server.running import Running

app = typer.Typer(help="phloem: long-running serverless functions that branch with "
                       "their Postgres database.", no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]})
functions_app = typer.Typer(help="Deploy and manage functions.", no_args_is_help=True)
app.add_typer(functions_app, name="functions")
branches_app = typer.Typer(help="Create, inspect, reset and delete database branches.",
                           no_args_is_help=True)
app.add_typer(branches_app, name="branches")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class OutputFormat(StrEnum):
    text = "text"
    json = "json"


class TlsMode(StrEnum):
    off = "off"
    self_signed = "self-signed"
    files = "files"
    acme = "acme"


DataDirOpt = Annotated[Path, typer.Option(
    "--data-dir", envvar="PHLOEM_DATA_DIR", help="Where phloem keeps its state.",
    default_factory=default_data_dir, show_default="/var/lib/phloem as root, else the "
    "user data dir")]
def linked_branch(value: str) -> str:
    """An explicit branch, else the one the project in the working directory is linked
    to ('phloem link'), else main."""
    if value:
        return value
    from phloem.project.plan import find_root, read_link

    root = find_root(Path.cwd())
    return (read_link(root).get("branch") if root else None) or "main"


BranchOpt = Annotated[str, typer.Option(
    "--branch", "-b", envvar="PHLOEM_BRANCH", callback=linked_branch,
    help="Branch name or id [default: the linked branch, else main].", show_default=False)]
OutputOpt = Annotated[OutputFormat, typer.Option("--output", "-o", envvar="PHLOEM_OUTPUT",
                                                 help="Output format.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def api_errors(*also: type[Exception], what: str = "") -> Iterator[None]:
    """An API call's failure (a ``ClientError``, or one of ``also``) raised in the block
    becomes the CLI's ``error: <reason>`` on stderr and exit code 1 (:func:`fail`); one
    place for what every command that calls the API does with it.

        with api_errors():
            rows = client_for(data_dir).list_keys()
        with api_errors(PackError):                # a packing error likewise
            dep = client.deploy(...)
        with api_errors(what=f"login to {url}"):   # error: login to <url>: <reason>
            me = client.my_key()
    """
    errors: tuple[type[Exception], ...] = (ClientError, *also)
    try:
        yield
    except errors as exc:
        fail(f"{what}: {exc}" if what else str(exc))


@dataclass
class Remote:
    """The root's ``--api/--key/--profile``, for every verb's client (set per run)."""

    api: str | None = None
    key: str | None = None
    profile: str | None = None


REMOTE = Remote()


def client_for(data_dir: Path) -> Client:
    """The platform the flags name (``--api/--key``, then ``PHLOEM_API_URL/KEY``, then
    ``--profile``/``PHLOEM_PROFILE`` or the current profile), else ``data_dir``'s."""
    with api_errors():
        return Client(load_credentials(REMOTE.api, REMOTE.key, data_dir, REMOTE.profile))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Show the version.")] = False,
    api: Annotated[str | None, typer.Option(
        "--api", envvar="PHLOEM_API_URL", help="URL of the platform's API to talk to "
        "(e.g. https://phloem.example.com:9443).", show_default="the profile's, else the "
        "data dir's platform")] = None,
    key: Annotated[str | None, typer.Option(
        "--key", envvar="PHLOEM_API_KEY", help="API key sent to --api.",
        show_default="the profile's, else the data dir's")] = None,
    profile: Annotated[str | None, typer.Option(
        "--profile", envvar="PHLOEM_PROFILE", help="Profile saved by 'phloem login' to use "
        "(where --api/--key are not given).",
        show_default="the current profile, else none")] = None,
) -> None:
    # --api/--key win over PHLOEM_API_URL/PHLOEM_API_KEY (typer reads them as their
    # defaults), which win over the profile, which wins over the data dir's credentials.
    REMOTE.api, REMOTE.key, REMOTE.profile = api, key, profile
    if version:
        out.print(__version__)
        raise typer.Exit()


# -- up ------------------------------------------------------------------------
@app.command()
def up(
    data_dir: DataDirOpt,
    api_host: Annotated[str, typer.Option(envvar="PHLOEM_API_HOST",
                                          help="Address of the control API.")] = "127.0.0.1",
    api_port: Annotated[int, typer.Option(envvar="PHLOEM_API_PORT",
                                          help="Port of the control API.")] = 8788,
    api_listen: Annotated[str | None, typer.Option(
        envvar="PHLOEM_API_LISTEN", help="ADDR:PORT where the control API is also served "
        "for remote clients (phloem login; scoped keys from phloem keys create), over TLS "
        "with the gateway's certificate unless --tls off.", show_default="none")] = None,
    gateway_host: Annotated[str, typer.Option(
        "--gateway-host", "--listen", envvar="PHLOEM_GATEWAY_HOST",
        help="Address functions are served on: the gateway port, and with --tls the HTTPS "
        "and redirect ports (0.0.0.0 or :: for every interface: a public service).")]
    = "127.0.0.1",
    gateway_port: Annotated[int, typer.Option(envvar="PHLOEM_GATEWAY_PORT",
                                              help="Port functions are served on (plain "
                                              "HTTP; with --tls see --https-port).")]
    = 8787,
    tls: Annotated[TlsMode, typer.Option(
        "--tls", envvar="PHLOEM_TLS", help="Serve functions over HTTPS: 'self-signed' makes "
        "a local CA in the data dir (its path is printed: curl --cacert it), 'files' serves "
        "--tls-cert/--tls-key (reloaded when they change), 'acme' obtains a certificate "
        "per function host by ACME HTTP-01 when it is deployed (the local CA's is served "
        "until then). TLS 1.2/1.3, HTTP/1.1 only.")]
    = TlsMode.off,
    tls_cert: Annotated[Path | None, typer.Option(
        envvar="PHLOEM_TLS_CERT", help="PEM certificate chain, leaf first (--tls files).",
        show_default="none")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        envvar="PHLOEM_TLS_KEY", help="PEM private key of --tls-cert (--tls files).",
        show_default="none")] = None,
    acme_directory: Annotated[str, typer.Option(
        envvar="PHLOEM_ACME_DIRECTORY", help="--tls acme: directory URL of the ACME CA "
        "(its HTTP-01 validation reaches the plain HTTP port as port 80).")]
    = ACME_DIRECTORY,
    acme_email: Annotated[str | None, typer.Option(
        envvar="PHLOEM_ACME_EMAIL", help="--tls acme: contact e-mail of the ACME account.",
        show_default="none")] = None,
    acme_ca_bundle: Annotated[Path | None, typer.Option(
        envvar="PHLOEM_ACME_CA_BUNDLE", help="--tls acme: PEM CA certificates trusted for "
        "the directory's HTTPS (a test CA's).", show_default="the system's CAs")] = None,
    acme_renew_fraction: Annotated[float, typer.Option(
        envvar="PHLOEM_ACME_RENEW_FRACTION", help="--tls acme: renew a certificate once "
        "this fraction of its lifetime has passed.", show_default="2/3")] = 2 / 3,
    acme_dns_hook: Annotated[str | None, typer.Option(
        envvar="PHLOEM_ACME_DNS_HOOK", help="--tls acme: a command run as 'CMD present|"
        "cleanup <record> <value>' that publishes (and removes) a DNS TXT record and "
        "returns once it is visible; with it one wildcard *.<domain> certificate is "
        "obtained by DNS-01 instead of one per function host.", show_default="none")]
    = None,
    https_port: Annotated[int | None, typer.Option(
        envvar="PHLOEM_HTTPS_PORT", min=1, max=65535, help="Port functions are served on "
        "with --tls (443 needs root or CAP_NET_BIND_SERVICE).",
        show_default="443 with --tls acme or files, else 8443")] = None,
    http_port: Annotated[int | None, typer.Option(
        envvar="PHLOEM_HTTP_PORT", min=1, max=65535, help="With --tls: plain HTTP port "
        "that only redirects to https (308 for GET/HEAD, else 400) and answers ACME "
        "HTTP-01 challenges (--tls acme; the CA always validates on port 80); 80 needs "
        "root or CAP_NET_BIND_SERVICE.",
        show_default="80 with --tls acme or files, else the gateway port")] = None,
    api_domain: Annotated[str | None, typer.Option(
        envvar="PHLOEM_API_DOMAIN", help="DNS name remote clients reach --api-listen at; "
        "with --tls acme a certificate is obtained for it at start.",
        show_default="api.<domain>")] = None,
    domain: Annotated[str, typer.Option(envvar="PHLOEM_DOMAIN",
                                        help="Domain of invocation URLs.")] = "fn.localhost",
    public_port: Annotated[int | None, typer.Option(
        envvar="PHLOEM_PUBLIC_PORT", help="Port shown in invocation URLs "
        "[default: the gateway port, with --tls the https port]")] = None,
    pg_port_base: Annotated[int, typer.Option(envvar="PHLOEM_PG_PORT_BASE",
                                              help="First TCP port for branch databases.")]
    = 25432,
    service_user: Annotated[str, typer.Option(
        envvar="PHLOEM_SERVICE_USER", help="Unprivileged user PostgreSQL runs as (root "
        "only).")] = "phloem",
    isolate_uid_base: Annotated[int, typer.Option(
        envvar="PHLOEM_ISOLATE_UID_BASE", help="As root, isolates run as this uid + the "
        "function's number, builds as this uid - 1; two platforms on one machine need "
        "different bases.")] = 1_500_000,
    firewall: Annotated[bool, typer.Option(
        "--firewall/--no-firewall", envvar="PHLOEM_FIREWALL",
        help="As root, install nftables rules so isolates reach only their branch's "
        "databases, the gateway and the outside world, and builds no local port.")] = True,
    isolate_python: Annotated[str | None, typer.Option(
        envvar="PHLOEM_ISOLATE_PYTHON", help="Interpreter for Python isolates [default: "
        "phloem's, or /usr/bin/pythonX.Y as root]")] = None,
    zygote: Annotated[bool, typer.Option(
        "--zygote/--no-zygote", envvar="PHLOEM_ZYGOTE",
        help="Start isolates from pre-started processes (fast cold starts): Python forks "
        "from a pre-imported zygote, Node activates a standby process.")] = True,
    sandbox: Annotated[bool, typer.Option(
        "--sandbox/--no-sandbox", envvar="PHLOEM_SANDBOX",
        help="Run isolates and builds in sandboxes (own mount, PID and IPC namespaces, "
        "read-only system, private /tmp, no capabilities, seccomp); needs root.")] = True,
    grace: Annotated[float, typer.Option(envvar="PHLOEM_EVICTION_GRACE",
                                         help="Seconds between SIGINT and SIGKILL for "
                                              "isolates.")] = 10.0,
    deploy: Annotated[list[Path] | None, typer.Option(
        "--deploy", envvar="PHLOEM_DEPLOY", help="Deploy this directory as a function on "
        "branch main once up (slug from the directory name; repeatable).")] = None,
    limit: Annotated[list[str] | None, typer.Option(
        "--limit", envvar="PHLOEM_LIMITS", help="NAME=VALUE default limit for every "
        "function (repeatable; space-separated in the variable): ttfb_timeout_s=900 "
        "silence_timeout_s=900 wait_until_s=900 idle_timeout_s=300 memory_mb=2048 "
        "target_inflight=64 max_isolates=<cores> max_body_bytes=104857600 pids_max=512 "
        "cpu_millicores=0 (no quota) tmp_mb=256 nofile=65536")] = None,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        "--trusted-proxy", envvar="PHLOEM_TRUSTED_PROXIES", help="Address or CIDR network "
        "of a proxy in front of the gateway: its X-Forwarded-* headers are passed on "
        "(X-Forwarded-For appended to); every other client's are replaced (repeatable; "
        "space- or comma-separated in the variable).",
        show_default="none")] = None,
    proxy_protocol: Annotated[bool, typer.Option(
        envvar="PHLOEM_PROXY_PROTOCOL", help="Gateway connections start with a PROXY "
        "protocol header (v1 or v2, read before TLS) naming the client; only --trusted-proxy "
        "peers may then connect.")] = False,
    metrics_token: Annotated[str | None, typer.Option(
        envvar="PHLOEM_METRICS_TOKEN", help="Bearer token that may read /metrics besides "
        "any API key, for a scraper (16-512 characters).",
        show_default="none, API keys only")] = None,
    head_timeout: Annotated[float, typer.Option(
        envvar="PHLOEM_HEAD_TIMEOUT", help="Seconds a client connection (gateway or API) "
        "has to send a complete request head, the first one from connecting, a later one "
        "from its first byte; then 408 and close. A real client sends a head at once; this "
        "bounds slow or idle connections.")] = 10.0,
    max_connections_per_peer: Annotated[int, typer.Option(
        envvar="PHLOEM_MAX_CONNECTIONS_PER_PEER", min=0, help="Client connections one "
        "address may keep open on the gateway, and on the API (0: no cap). Above what a "
        "browser opens in all (Chrome 256, Firefox 900); --trusted-proxy peers are exempt "
        "on the gateway (their clients are limited by the proxy).")] = 1024,
    max_connections: Annotated[int, typer.Option(
        envvar="PHLOEM_MAX_CONNECTIONS", min=0, help="Gateway client connections open at "
        "once; when full, the one waiting longest for a request head is closed to admit a "
        "new one.", show_default="auto: half the descriptor limit less the API's and a "
        "reserve")] = 0,
    api_max_connections: Annotated[int, typer.Option(
        envvar="PHLOEM_API_MAX_CONNECTIONS", min=1, help="Control API client connections "
        "open at once (descriptors of its own, apart from the gateway's).")] = 256,
    keep_deployments: Annotated[int, typer.Option(
        envvar="PHLOEM_KEEP_DEPLOYMENTS", min=0, help="Replaced deployments of each "
        "function kept built on disk: what 'phloem functions rollback' can switch back "
        "to without a rebuild.")] = 3,
    ai_provider: Annotated[list[str] | None, typer.Option(
        "--ai-provider", envvar="PHLOEM_AI_PROVIDERS", help="An upstream of the AI Gateway: "
        "KIND=URL[,key-env=VAR], KIND 'openai' (any OpenAI-compatible server) or "
        "'anthropic', URL its versioned base (https://api.openai.com/v1), VAR the variable "
        "of this process holding its key, which functions never see (repeatable; "
        "space-separated in the variable).", show_default="none")] = None,
) -> None:
    """Start the platform in the foreground: system database, branch 'main', API and
    gateway. Ctrl-C stops everything; a second Ctrl-C forces exit.

    Example: phloem up --deploy examples/hello-python
    """
    try:
        limits = FunctionLimits().merged(parse_pairs("limit", limit or []))
        if metrics_token is not None:
            check_token("metrics_token", metrics_token)
        proxies = tuple(str(n) for n in parse_networks(trusted_proxy or []))
        ai_providers = parse_ai_providers(ai_provider or [])
        if not 0 < head_timeout < float("inf"):
            raise ValueError(f"head_timeout: must be a positive number of seconds "
                             f"(got {head_timeout})")
    except (InvalidInput, ValueError) as exc:
        fail(str(exc))
    try:
        settings = Settings(
            tls=tls.value, tls_cert=tls_cert.absolute() if tls_cert else None,
            tls_key=tls_key.absolute() if tls_key else None,
            https_port=https_port if https_port is not None else 0, api_domain=api_domain,
            http_port=http_port, acme_directory=acme_directory, acme_email=acme_email,
            acme_ca_bundle=acme_ca_bundle.absolute() if acme_ca_bundle else None,
            acme_renew_fraction=acme_renew_fraction, acme_dns_hook=acme_dns_hook,
            function_limits=limits,
            data_dir=data_dir.absolute(), api_host=api_host, api_port=api_port,
            api_listen=api_listen,
            gateway_host=gateway_host, gateway_port=gateway_port, domain=domain,
            public_port=public_port, pg_port_base=pg_port_base, service_user=service_user,
            isolate_python=isolate_python, eviction_grace_s=grace, zygote=zygote,
            sandbox=sandbox, isolate_uid_base=isolate_uid_base, firewall=firewall,
            trusted_proxies=proxies, proxy_protocol=proxy_protocol,
            metrics_token=metrics_token,
            head_timeout_s=head_timeout, max_connections_per_peer=max_connections_per_peer,
            max_connections=max_connections, api_max_connections=api_max_connections,
            keep_deployments=keep_deployments, ai_providers=ai_providers,
        )
        if settings.tls == "files":
            _check_tls_files(settings)
    except ValueError as exc:
        fail(str(exc))
    from phloem.server.platform import Platform  # the platform's modules load only for `up`

    deploy_dirs = [p.absolute() for p in deploy or []]

    async def deploy_once_up(_: Running) -> None:
        await asyncio.to_thread(_deploy_dirs, settings, deploy_dirs)

    raise typer.Exit(Platform(settings).run(deploy_once_up if deploy_dirs else None))


def _check_tls_files(settings: Settings) -> None:
    """--tls files: refuse a certificate or key that does not load before anything
    starts (TlsError is a ValueError naming the option)."""
    from phloem.gateway.tls import server_context

    assert settings.tls_cert is not None and settings.tls_key is not None
    server_context(settings.tls_cert, settings.tls_key)


def _deploy_dirs(settings: Settings, dirs: list[Path]) -> None:
    client = Client.local(settings.data_dir)  # this platform, not a profile's
    for d in dirs:
        slug = "".join(c for c in d.name.lower() if c.isalnum())[:20] or "fn"
        try:
            runtime, entry = choose(d, None, None)
            dep = client.deploy("main", slug, d, entry, runtime=runtime.family,
                                progress=lambda line: err.print(f"  [dim]{escape(line)}[/]"))
            fn = client.get_function("main", slug)
        except (ClientError, InvalidInput) as exc:
            err.print(f"[bold red]deploy of {d} failed:[/] {escape(str(exc))}")
            continue
        if dep["status"] != "ready":
            err.print(f"[bold red]deploy of {d} failed:[/] {escape(str(dep['error']))}")
            continue
        _print_invocation(fn, settings)


def _print_invocation(fn: dict[str, Any], settings: Settings) -> None:
    url = fn["invocation_url"]
    host = url.split("://", 1)[1]
    out.print(f"  [bold]{fn['slug']}[/]  {url}  {fn['status']}")
    if not settings.tls_on:
        out.print(f"    curl {url}/        [dim](browsers and curl resolve *.localhost)[/]")
        out.print(f"    curl -H 'Host: {host}' "
                  f"http://{settings.gateway_host}:{settings.gateway_port}/")
        return
    ca = (f"--cacert {settings.data_dir / 'tls' / 'ca.pem'} "
          if settings.tls == TlsMode.self_signed else "")
    out.print(f"    curl {ca}{url}/")


# -- status --------------------------------------------------------------------
@app.command()
def status(data_dir: DataDirOpt, output: OutputOpt = OutputFormat.text) -> None:
    """Report each component of a running platform, probed now: system database, API,
    gateway, supervisor, firewall, TLS (with acme: certificates issued, pending, failed),
    every branch's database and pooler, and the isolates.

    Exit status: 0 when nothing is down; 1 when a component, a branch's database or its
    pooler is down (they are named on stderr), or the platform cannot be reached.
    A database that does not answer within 2 s counts as down.
    """
    with api_errors():
        data = client_for(data_dir).status()
    down: list[str] = data.get("down", [])
    if output is OutputFormat.json:
        print_json(data)
    else:
        _print_status(data)
    if down:
        fail("down: " + ", ".join(down))


def _print_status(data: dict[str, Any]) -> None:
    out.print(f"phloem {data['version']}  data dir {data['data_dir']}", highlight=False)
    for name, comp in data["components"].items():
        state = comp if isinstance(comp, str) else comp["state"]
        extra = "" if isinstance(comp, str) else "  ".join(
            f"{k}={v}" for k, v in comp.items() if k != "state")
        out.print(f"  {name:<16} {state:<8} {escape(extra)}", highlight=False)
    if data.get("branches_listed") == "cache":
        out.print("  (branches as last listed: the system database does not answer)")
    for b in data["branches"]:
        why = [b[f"{part}_probe"]["error"] for part in ("database", "pooler")
               if b.get(f"{part}_probe", {}).get("error")]
        out.print(f"  branch {b['name']:<9} {b['database']:<8} {b['id']}  port {b['port']}"
                  f"  pooler {b['pooler']} {b['pooler_port'] or ''}"
                  + (f"  ({escape('; '.join(why))})" if why else ""), highlight=False)
    for i in data["isolates"]:
        out.print(f"  isolate {i['id']} {i['function']} {i['state']} pid {i['pid']} "
                  f"in-flight {i['inflight']}", highlight=False)


# -- branches ------------------------------------------------------------------
def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _emit_branch(b: dict[str, Any], output: OutputFormat) -> None:
    if output is OutputFormat.json:
        print_json(b)
    else:
        _print_branch(b)


def _print_branch(b: dict[str, Any]) -> None:
    for key in ("id", "name", "parent_id", "state", "created_at"):
        out.print(f"{key:<13} {b[key]}", highlight=False)
    out.print(f"{'size':<13} {_human_bytes(b.get('logical_size_bytes'))}")
    if b.get("copy_method"):
        out.print(f"{'copied':<13} {_human_bytes(b['copy_bytes'])} by {b['copy_method']} "
                  f"in {b['copy_ms']:.0f} ms")


@branches_app.command("create")
def branches_create(
    data_dir: DataDirOpt,
    name: Annotated[str | None, typer.Option("--name", help="[A-Za-z0-9._/-]{1,64}, e.g. "
                                             "preview/login [default: the new id]")] = None,
    parent: Annotated[str | None, typer.Option("--parent", envvar="PHLOEM_PARENT",
                                               help="Parent branch name or id "
                                                    "[default: main]")] = None,
    copy_functions: Annotated[bool, typer.Option(
        "--copy-functions", help="Also deploy the parent's active functions.")] = False,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Create a branch: a copy-on-write clone of the parent's data as it is now.

    Example: phloem branches create --name preview/login --parent main
    """
    client = client_for(data_dir)
    with api_errors(), err.status(f"branching {parent or 'main'}"):
        b = client.create_branch(name, parent, copy_functions)
    _emit_branch(b, output)


@branches_app.command("list")
def branches_list(data_dir: DataDirOpt, output: OutputOpt = OutputFormat.text) -> None:
    """List branches as a tree, with sizes."""
    with api_errors():
        rows = client_for(data_dir).list_branches()
    if output is OutputFormat.json:
        print_json(rows)
        return
    from rich.tree import Tree

    children: dict[str | None, list[dict[str, Any]]] = {}
    for b in rows:
        children.setdefault(b["parent_id"], []).append(b)

    def label(b: dict[str, Any]) -> str:
        return (f"[bold]{escape(b['name'])}[/]  {b['id']}  "
                f"{_human_bytes(b.get('logical_size_bytes'))}  {b['state']}")

    def add(node: Tree, b: dict[str, Any]) -> None:
        for c in children.get(b["id"], []):
            add(node.add(label(c)), c)

    for root in children.get(None, []):
        tree = Tree(label(root))
        add(tree, root)
        out.print(tree)


@branches_app.command("get")
def branches_get(ref: Annotated[str, typer.Argument(help="Branch name or id.")],
                 data_dir: DataDirOpt, output: OutputOpt = OutputFormat.text) -> None:
    """Show one branch."""
    with api_errors():
        b = client_for(data_dir).get_branch(ref)
    _emit_branch(b, output)


@branches_app.command("reset")
def branches_reset(ref: Annotated[str, typer.Argument(help="Branch name or id.")],
                   data_dir: DataDirOpt, output: OutputOpt = OutputFormat.text) -> None:
    """Re-clone a branch from its parent, keeping its id, URLs and credentials; its
    functions restart against the reset data."""
    with api_errors(), err.status(f"resetting {ref}"):
        b = client_for(data_dir).reset_branch(ref)
    _emit_branch(b, output)


@branches_app.command("delete")
def branches_delete(
    ref: Annotated[str, typer.Argument(help="Branch name or id.")],
    data_dir: DataDirOpt,
    recursive: Annotated[bool, typer.Option("--recursive", "-r",
                                            help="Also delete its children.")] = False,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Delete a branch: its database, pooler, functions and files."""
    with api_errors():
        deleted = client_for(data_dir).delete_branch(ref, recursive)
    if output is OutputFormat.json:
        print_json({"deleted": deleted})
    else:
        out.print(f"deleted {', '.join(deleted)}")


@app.command("connection-string")
def connection_string(
    data_dir: DataDirOpt,
    branch: BranchOpt = "",
    pooled: Annotated[bool, typer.Option("--pooled/--unpooled", envvar="PHLOEM_POOLED",
                                         help="Through the pooler, or direct.")] = True,
) -> None:
    """Print the branch's database URL.

    Example: psql "$(phloem connection-string --unpooled)"
    """
    with api_errors():
        sys.stdout.write(client_for(data_dir).connection_string(branch, pooled) + "\n")


# -- functions -----------------------------------------------------------------
def parse_pairs(field: str, pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(field, f"expected KEY=VALUE (got {pair!r})")
        out[key] = value
    return out


def main() -> None:
    app()


if __name__ == "__main__":
    main()
