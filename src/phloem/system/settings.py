"""Platform settings: everything `phloem up` can be told, in one object.

    settings = Settings(data_dir=Path("/var/lib/phloem"), gateway_port=8787)
    async with running_platform(settings) as platform:
        ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from phloem.system.ai_providers import AiProvider
from phloem.system.limits import FunctionLimits

#: ``--tls`` values.
TLS_MODES = ("off", "self-signed", "files", "acme")
#: TLS modes of a service exposed to the world: HTTPS on 443 and HTTP on 80 by default.
PUBLIC_TLS_MODES = ("files", "acme")
#: Let's Encrypt's production directory: ``--acme-directory`` by default.
ACME_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"


def default_data_dir() -> Path:
    """``$PHLOEM_DATA_DIR``, else ``/var/lib/phloem`` for root (the unprivileged service
    user cannot traverse ``/root``), else the user's data directory."""
    env = os.environ.get("PHLOEM_DATA_DIR")
    if env:
        return Path(env).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/phloem")
    return Path(platformdirs.user_data_dir("phloem"))


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    api_host: str = "127.0.0.1"
    api_port: int = 8788
    #: ``ADDR:PORT`` (``[v6]:PORT``) where the control API is also served, for remote
    #: clients with scoped keys: over TLS (the gateway's certificate) unless ``tls`` is
    #: off. None: only on ``api_host:api_port``.
    api_listen: str | None = None
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8787
    #: Functions are reached at ``<scheme>://<branch_id>-<slug>.<domain>:<public_port>``.
    domain: str = "fn.localhost"
    public_port: int | None = None
    #: HTTPS on the gateway (docs/architecture.md, "Serving HTTPS"): ``off`` (plain HTTP
    #: on ``gateway_port``), ``self-signed`` (a local CA in the data dir) or ``files``
    #: (``tls_cert``/``tls_key``, reloaded when they change).
    tls: str = "off"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: With TLS: functions are served on ``https_port``; ``http_port`` only redirects to
    #: it (and answers ACME HTTP-01 challenges). Unset (0 / None): a public service's 443
    #: and 80 with ``tls`` acme or files, else 8443 and ``gateway_port`` (a laptop's).
    https_port: int = 0
    http_port: int | None = None
    #: The DNS name remote clients reach ``api_listen`` at: with ``tls`` acme a
    #: certificate is obtained for it. None: ``api.<domain>``.
    api_domain: str | None = None
    #: ``--tls acme``: the CA's directory URL, the account's contact e-mail, a CA bundle
    #: trusted for the directory's HTTPS (None: the system's), and the fraction of a
    #: certificate's lifetime after which it is renewed.
    acme_directory: str = ACME_DIRECTORY
    acme_email: str | None = None
    acme_ca_bundle: Path | None = None
    acme_renew_fraction: float = 2 / 3
    #: A command publishing DNS-01 TXT records (``CMD present|cleanup <record> <value>``):
    #: with it, ``*.<domain>`` is one wildcard certificate instead of one per host.
    acme_dns_hook: str | None = None
    #: The unprivileged user PostgreSQL runs as when phloem runs as root.
    service_user: str = "phloem"
    #: Isolates run as ``isolate_uid_base + n`` (one uid per function) when root, builds
    #: as ``isolate_uid_base - 1``. Two platforms on one machine need different bases.
    isolate_uid_base: int = 1_500_000
    #: Interpreter for Python isolates; must be the same major.minor as phloem's own.
    isolate_python: str | None = None
    #: First TCP port tried for branch clusters (and their poolers); below the usual
    #: ephemeral range (32768-60999) so outgoing connections never take ours.
    pg_port_base: int = 25432
    #: Fork Python isolates from a pre-imported zygote (else spawn each interpreter).
    zygote: bool = True
    #: Run isolates and builds in sandboxes (namespaces, seccomp) when root.
    sandbox: bool = True
    #: Seconds an isolate gets between SIGINT and SIGKILL.
    eviction_grace_s: float = 10.0
    #: Seconds a shutdown waits for in-flight requests.
    drain_timeout_s: float = 30.0
    #: Per-function limits unless a deployment overrides them (see system/limits.py).
    function_limits: FunctionLimits = field(default_factory=FunctionLimits)
    #: Seconds an isolate may take to become ready before its requests get 502.
    isolate_start_timeout_s: float = 900.0
    #: As root, nftables rules keep isolates and builds off local ports that are not
    #: theirs (the control API, other branches' databases).
    firewall: bool = True
    #: Networks (CIDR) of proxies in front of the gateway whose ``X-Forwarded-*`` headers
    #: are passed on (``X-Forwarded-For`` appended to); from any other peer they are
    #: replaced by what the gateway itself sees.
    trusted_proxies: tuple[str, ...] = ()
    #: Gateway connections start with a PROXY protocol header (v1/v2) naming the client;
    #: only ``trusted_proxies`` may connect then (``phloem.gateway.proxy_protocol``).
    proxy_protocol: bool = False
    #: A bearer token that may read ``/metrics`` besides any API key (for a scraper that
    #: must not hold an API key).
    metrics_token: str | None = None
    #: Seconds a client connection (gateway or API) has to send a complete request head:
    #: the first from accept, a later one from its first byte; then 408 and close.
    head_timeout_s: float = 10.0
    #: Client connections open at once from one address, per listener (0: no cap);
    #: trusted proxies are exempt on the gateway.
    max_connections_per_peer: int = 1024
    #: Gateway client connections open at once; 0: from the descriptor limit
    #: (``phloem.gateway.admission.plan_connections``).
    max_connections: int = 0
    #: Control API client connections open at once (its own share of descriptors).
    api_max_connections: int = 256
    #: Ready deployments of each function kept built on disk besides the active one:
    #: what ``phloem functions rollback`` can switch back to without a rebuild.
    keep_deployments: int = 3
    #: The AI Gateway's upstreams (``--ai-provider``); their keys stay in phloem's env.
    ai_providers: tuple[AiProvider, ...] = ()
    #: The npm registry that ``/npm/`` passes other ``@neon``/``@neondatabase`` packages
    #: through to (``PHLOEM_NPM_UPSTREAM``); None: what ``npm config get registry`` says.
    npm_upstream: str | None = field(
        default_factory=lambda: os.environ.get("PHLOEM_NPM_UPSTREAM") or None)

    def __post_init__(self) -> None:
        public = self.tls in PUBLIC_TLS_MODES
        if self.https_port == 0:  # frozen: the resolved default is set once, here
            object.__setattr__(self, "https_port", 443 if public else 8443)
        if self.http_port is None and public:
            object.__setattr__(self, "http_port", 80)
        if self.api_listen is not None:
            self.api_listen_address  # noqa: B018  (raises naming the field)
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls: must be one of {', '.join(TLS_MODES)} (got {self.tls!r})")
        if self.tls == "files" and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("tls_cert, tls_key: both are required with --tls files")
        if self.tls != "files" and (self.tls_cert is not None or self.tls_key is not None):
            raise ValueError("tls_cert, tls_key: only used with --tls files "
                             f"(tls is {self.tls})")
        if not self.acme_directory.startswith(("https://", "http://")):
            raise ValueError("acme_directory: must be an http(s):// URL "
                             f"(got {self.acme_directory!r})")
        if self.acme_email is not None and "@" not in self.acme_email.strip("@"):
            raise ValueError(f"acme_email: must be an e-mail address (got {self.acme_email!r})")
        if not 0 < self.acme_renew_fraction < 1:
            raise ValueError("acme_renew_fraction: must be between 0 and 1, exclusive "
                             f"(got {self.acme_renew_fraction})")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol: needs --trusted-proxy (the balancers' "
                             "addresses): only they may send PROXY headers")
        if self.tls != "off" and self.https_port == self.plain_port:
            raise ValueError(f"https_port: must differ from the plain HTTP port "
                             f"{self.plain_port} (http_port, default the gateway port)")

    @property
    def api_listen_address(self) -> tuple[str, int] | None:
        """``api_listen`` as (host, port)."""
        if self.api_listen is None:
            return None
        host, sep, port = self.api_listen.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"api_listen: must be ADDR:PORT, e.g. 0.0.0.0:8789 or "
                             f"[::]:8789 (got {self.api_listen!r})")
        return host, int(port)

    @property
    def remote_api_name(self) -> str:
        """The name of the remote API (``api_listen``): ``api_domain`` or ``api.<domain>``."""
        return self.api_domain or f"api.{self.domain}"

    @property
    def tls_on(self) -> bool:
        return self.tls != "off"

    @property
    def public_scheme(self) -> str:
        return "https" if self.tls_on else "http"

    @property
    def plain_port(self) -> int:
        """The port of plain HTTP: the gateway without TLS, its redirects with TLS."""
        return self.http_port if self.http_port is not None else self.gateway_port

    @property
    def serving_port(self) -> int:
        """The port functions are served on: ``https_port`` with TLS."""
        return self.https_port if self.tls_on else self.gateway_port

    @property
    def url_port(self) -> int:
        return self.public_port if self.public_port is not None else self.serving_port

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"
