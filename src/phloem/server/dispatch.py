"""The gateway's router: Host header -> active deployment -> leased isolate connection.

    ``br-quiet-moon-3f9a2c-todos.fn.localhost:8787`` -> branch ``br-quiet-moon-3f9a2c``,
    function ``todos``.
    ``api.example.com`` (a custom domain, see phloem.control.domains) -> the branch and
    function it was added for.

The function sees the Host it was asked for in ``X-Forwarded-Host`` (the custom domain),
``X-Forwarded-Proto`` and ``X-Forwarded-For`` (set by the gateway). A custom domain with
HSTS on gets ``Strict-Transport-Security`` on its responses when the gateway serves TLS
(never over plain HTTP, where browsers ignore it and it could only mislead).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import replace

from phloem.control.logs import FunctionLogs
from phloem.control.routes import DomainRoute, RoutingTable
from phloem.gateway.record import RequestRecord
from phloem.gateway.routing import Limits, RouteError, Upstream
from phloem.server.metrics import Metrics
from phloem.services.registry import ServiceRegistry
from phloem.supervisor import IsolateFailed, IsolateSpec, Supervisor

_LABEL_RE = re.compile(r"^(br-[a-z]+-[a-z]+-[0-9a-f]{6})-([a-z0-9]{1,20})$")
#: One year, the value browsers' preload lists ask for; not includeSubDomains: the
#: domain's other names are not ours to promise.
HSTS = b"Strict-Transport-Security: max-age=31536000\r\n"


@functools.lru_cache(maxsize=4096)
def parse_host(host: str, domain: str) -> tuple[str, str] | None:
    """``(branch_id, slug)`` for a function host name, else ``None``. Cached: the router
    and the request observer both ask for every request."""
    name = host.strip().lower()
    if name.startswith("["):
        return None
    name = name.rsplit(":", 1)[0] if ":" in name else name
    suffix = "." + domain.lower()
    if not name.endswith(suffix):
        return None
    m = _LABEL_RE.match(name[: -len(suffix)])
    return (m.group(1), m.group(2)) if m else None


@functools.lru_cache(maxsize=4096)
def host_name(host: str) -> str:
    """A Host header's name: lowercase, without port or trailing dot."""
    name = host.strip().lower()
    if name.startswith("["):
        return name
    return (name.rsplit(":", 1)[0] if ":" in name else name).removesuffix(".")


def route_of(host: str, domain: str, routes: RoutingTable) -> tuple[str, str] | None:
    """``(branch_id, slug)`` a Host header is served by: a function host name, else a
    custom domain; ``None``: neither."""
    key = parse_host(host, domain)
    if key is not None:
        return key
    route = routes.domain(host_name(host))
    return (route.branch_id, route.slug) if route is not None else None


class _HeaderLease:
    """A lease whose limits add response headers (a custom domain's HSTS); the rest is
    the supervisor's lease's."""

    __slots__ = ("_limits", "inner", "reader", "writer")

    def __init__(self, inner: Upstream, limits: Limits) -> None:
        self.inner = inner
        self.reader = inner.reader
        self.writer = inner.writer
        self._limits = limits

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def replay_safe(self) -> bool:
        return self.inner.replay_safe

    def mark_stream(self) -> None:
        self.inner.mark_stream()

    def release(self, *, reusable: bool) -> None:
        self.inner.release(reusable=reusable)


class PlatformRouter:
    """Reads ``routes`` (the table the deployer writes; the router never sees the
    deployer) on every request. ``hsts``: the gateway serves TLS, so custom domains with
    HSTS on get the header.

        router = PlatformRouter(deployer.routes, supervisor, "fn.localhost", hsts=True)
    """

    def __init__(self, routes: RoutingTable, supervisor: Supervisor, domain: str, *,
                 hsts: bool = False, services: ServiceRegistry | None = None) -> None:
        self.routes = routes
        self.supervisor = supervisor
        self.domain = domain
        self.hsts = hsts
        #: Branch services answer at ``<branch_id>--<service>.<domain>``.
        self.services = services
        # A route's limits with HSTS added, made once per limits object (the gateway's
        # fast path recognises a route's limits by identity).
        self._with_hsts: dict[int, tuple[Limits | None, Limits]] = {}

    def _find(self, host: str) -> tuple[IsolateSpec | None, DomainRoute | None]:
        key = parse_host(host, self.domain)
        if key is not None:
            return self.routes.get(key), None
        route = self.routes.domain(host_name(host))
        if route is None:
            return None, None
        return self.routes.get((route.branch_id, route.slug)), route

    def _dress(self, lease: Upstream, route: DomainRoute | None) -> Upstream:
        if route is None or not route.hsts or not self.hsts:
            return lease
        base = lease.limits
        cached = self._with_hsts.get(id(base))
        if cached is None or cached[0] is not base:
            cached = (base, replace(base or Limits(), response_headers=HSTS))
            self._with_hsts[id(base)] = cached
        return _HeaderLease(lease, cached[1])

    async def acquire(self, host: str) -> Upstream:
        spec, route = self._find(host)
        if spec is None and route is None and self.services is not None:
            lease = await self.services.acquire(host)
            if lease is not None:
                return lease
        if spec is None:
            raise RouteError(404, "unknown_host",
                             f"no function is deployed at host {host!r}")
        try:
            lease = await self.supervisor.acquire(spec)
        except IsolateFailed as exc:
            raise RouteError(502, "isolate_failed", str(exc)) from exc
        return self._dress(lease, route)

    def acquire_nowait(self, host: str) -> Upstream | None:
        """The gateway's fast path (see gateway.routing): an idle pooled connection to a
        ready isolate of the host's deployment, or ``None`` (then :meth:`acquire`)."""
        key = parse_host(host, self.domain)
        if key is not None:  # the common case first: one cached parse, one lookup
            spec = self.routes.get(key)
            return self.supervisor.acquire_nowait(spec) if spec is not None else None
        spec, route = self._find(host)
        if spec is None:
            return None
        lease = self.supervisor.acquire_nowait(spec)
        return self._dress(lease, route) if lease is not None else None


def request_observer(domain: str, routes: RoutingTable, metrics: Metrics,
                     logs: FunctionLogs) -> Callable[[RequestRecord], None]:
    """The gateway's ``on_request``: metrics and one access line per request."""
    def observe(record: RequestRecord) -> None:
        # Runs for every request on the gateway's path: keep it to lookups and one format.
        # Only label with routes that exist: any client can send any Host.
        key = route_of(record.host, domain, routes)
        if key is None:
            return
        spec = routes.get(key)
        if spec is None:
            return
        metrics.observe_request(record, key[0], key[1])
        logs.access(spec.log_path, record)
    return observe
