"""What a branch service is: its host name, its hooks, and what the platform gives it.

A service answers at ``<branch_id>--<service>.<domain>`` on the gateway's listener. The
double hyphen keeps the name apart from functions' ``<branch_id>-<slug>`` (a slug has no
hyphen). Labels in front of it are the service's own (S3's virtual-hosted buckets):

    service_host("br-quiet-moon-3f9a2c", "storage", "fn.localhost")
    # 'br-quiet-moon-3f9a2c--storage.fn.localhost'
    parse_service_host("img.br-quiet-moon-3f9a2c--storage.fn.localhost:8787", "fn.localhost")
    # ServiceHost(branch_id='br-quiet-moon-3f9a2c', service='storage', prefix='img')
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from phloem.gateway.routing import Upstream
from phloem.metadata.store import BranchRow
from phloem.system.paths import DataPaths
from phloem.system.settings import Settings

#: The services phloem provides, by the name neon.ts's keys map to.
SERVICES = ("auth", "ai", "storage")

_SERVICE_LABEL_RE = re.compile(r"^(br-[a-z]+-[a-z]+-[0-9a-f]{6})--([a-z]+)$")


@dataclass(frozen=True, slots=True)
class ServiceHost:
    branch_id: str
    service: str
    #: The labels before the service's own, e.g. a virtual-hosted bucket; "" if none.
    prefix: str = ""


def service_host(branch_id: str, service: str, domain: str) -> str:
    """The host name a branch's service answers at (no port)."""
    return f"{branch_id}--{service}.{domain}"


@functools.lru_cache(maxsize=4096)
def parse_service_host(host: str, domain: str) -> ServiceHost | None:
    """The branch and service a Host header names, else ``None`` (a function's host, or
    anything else). The port, if any, is ignored."""
    name = host.strip().lower()
    if name.startswith("["):
        return None
    name = name.rsplit(":", 1)[0] if ":" in name else name
    suffix = "." + domain.lower()
    if not name.endswith(suffix):
        return None
    prefix, _, label = name[: -len(suffix)].rpartition(".")
    m = _SERVICE_LABEL_RE.match(label)
    if m is None or m.group(2) not in SERVICES:
        return None
    return ServiceHost(m.group(1), m.group(2), prefix)


class ServiceUnavailable(Exception):
    """A service could not be provisioned for a reason of its own (its server did not
    start, a tool did not install), not the config's; the service has cleaned up. The
    API answers it 503 ``service_unavailable`` naming the service and ``reason``.

        raise ServiceUnavailable("auth", "the server exited with 1 before it listened: ...")
    """

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"{service}: {reason}")
        self.service, self.reason = service, reason


@dataclass(frozen=True)
class ServiceContext:
    """What the platform gives a service when it starts."""

    paths: DataPaths
    #: The system database's pool (``psycopg_pool.AsyncConnectionPool``), for a service's
    #: own metadata; ``store`` for branches and secrets.
    pool: Any
    store: Any
    domain: str
    #: ``http`` or ``https``, and the port, as in functions' invocation URLs.
    scheme: str
    port: int
    #: Secrets sealed at rest (``phloem.metadata.secrets.SecretBox``).
    secret_box: Any
    #: The branch's database URLs (``phloem.branches.manager.ConnectionStrings``).
    connection_strings: Callable[[BranchRow], Any]
    #: The platform's settings (the AI Gateway's upstreams); None in a bare context.
    settings: Settings | None = None

    def base_url(self, branch_id: str, service: str) -> str:
        """``scheme://<branch_id>--<service>.<domain>[:port]``: where functions (and, in
        dev, local processes) reach the service."""
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{service_host(branch_id, service, self.domain)}{port}"

    def branch_dir(self, branch_id: str, service: str) -> Path:
        """The service's directory for one branch (made 0700 on first use), inside the
        branch's own directory: deleted with the branch."""
        path = self.paths.branch_dir(branch_id) / "services" / service
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path


class BranchService(Protocol):
    """One service. The registry calls the hooks; none is called concurrently for the same
    branch. ``config`` is what neon.ts declared for it (``{}`` for ``auth: true``)."""

    name: str

    async def start(self, ctx: ServiceContext) -> None:
        """Platform start: open what the service needs across branches."""

    async def stop(self) -> None:
        """Platform stop (after the gateway stopped accepting)."""

    def env(self, branch: BranchRow, config: dict[str, Any]) -> dict[str, str]:
        """The variables injected into every function of a branch with the service on."""
        ...

    async def acquire(self, host: ServiceHost) -> Upstream:
        """A lease on a connection to the service's HTTP server for ``host.branch_id``
        (see :mod:`phloem.services.upstream`); raise ``RouteError`` when it cannot."""
        ...

    async def provision(self, branch: BranchRow, config: dict[str, Any]) -> None:
        """neon.ts turned the service on for the branch, or changed its config; raise
        :class:`ServiceUnavailable` (after cleaning up) when it cannot be provided."""

    async def unprovision(self, branch: BranchRow) -> None:
        """neon.ts no longer declares the service on the branch."""

    async def copy(self, parent: BranchRow, child: BranchRow) -> None:
        """Branch create: right after the database copy, before the child opens to
        functions; the child gets the parent's state."""

    async def reset(self, branch: BranchRow, parent: BranchRow) -> None:
        """Branch reset: the branch's state becomes its parent's again."""

    async def delete(self, branch: BranchRow) -> None:
        """Branch delete, before its directory goes (which holds ``branch_dir``)."""
