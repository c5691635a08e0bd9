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
from dataclasses import replace
from pathlib import Path
from typing import Generic, TypeVar

from phloem.control.logs import FunctionLogs
from phloem.control.routes import DomainRoute, RoutingTable
from phloem.gateway.record import RequestRecord
from phloem.gateway.routing import Limits, RouteError, Upstream
from phloem.server.metrics import FunctionRequests, Metrics
from phloem.services.registry import ServiceRegistry
from phloem.supervisor import IsolateFailed, IsolateSpec, Supervisor

_LABEL_RE = re.compile(r"^(br-[a-z]+-[a-z]+-[0-9a-f]{6})-([a-z0-9]{1,20})$")
#: One year, the value browsers' preload lists ask for; not includeSubDomains: the
#: domain's other names are not ours to promise.
HSTS = b"Strict-Transport-Security: max-age=31536000\r\n"
#: Host names remembered by a PerHost; then it starts over.
MAX_HOSTS = 4096

T = TypeVar("T")


@functools.lru_cache(maxsize=4096)
def parse_host(host: str, domain: str) -> tuple[str, str] | None:
    """``(branch_id, slug)`` for a function host name, else ``None``. (Cached; callers on
    the request path ask :class:`HostRoutes`, which remembers more.)"""
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


class Found:
    """What a Host header is routed to: ``key`` (branch id, slug) and the spec of its
    active deployment (``None``: nothing deployed there), ``route`` when the name is a
    custom domain. ``key`` None: the name routes nowhere."""

    __slots__ = ("key", "route", "spec")

    def __init__(self, key: tuple[str, str] | None, spec: IsolateSpec | None,
                 route: DomainRoute | None) -> None:
        self.key = key
        self.spec = spec
        self.route = route


class PerHost(Generic[T]):
    """Values per Host string, kept until the routing table changes (its ``version``)
    and at most :data:`MAX_HOSTS` of them (any client can send any Host).

        seen: PerHost[int] = PerHost(routes)
        n = seen.get(host)
        if n is None:
            n = seen.put(host, len(host))
    """

    __slots__ = ("_memo", "_routes", "_version")

    def __init__(self, routes: RoutingTable) -> None:
        self._routes = routes
        self._memo: dict[str, T] = {}
        self._version = routes.version

    def get(self, host: str) -> T | None:
        routes = self._routes
        if routes.version != self._version:
            self._memo.clear()
            self._version = routes.version
        return self._memo.get(host)

    def put(self, host: str, value: T) -> T:
        memo = self._memo
        if len(memo) >= MAX_HOSTS:
            memo.clear()
        memo[host] = value
        return value


class HostRoutes:
    """Host header -> :class:`Found`, remembered per Host string (:class:`PerHost`): the
    router and the request observer ask for every request, and one lookup of the Host
    string costs less than parsing it and looking the parts up.

        hosts = HostRoutes(deployer.routes, "fn.localhost")
        hosts.find("br-quiet-moon-3f9a2c-todos.fn.localhost:8787").spec
    """

    __slots__ = ("_domain", "_found", "_routes")

    def __init__(self, routes: RoutingTable, domain: str) -> None:
        self._routes = routes
        self._domain = domain
        self._found: PerHost[Found] = PerHost(routes)

    def find(self, host: str) -> Found:
        found = self._found.get(host)
        if found is None:
            found = self._found.put(host, resolve_host(host, self._domain, self._routes))
        return found


def resolve_host(host: str, domain: str, routes: RoutingTable) -> Found:
    """What a Host header routes to now: a function host name, else a custom domain."""
    key = parse_host(host, domain)
    if key is not None:
        return Found(key, routes.get(key), None)
    route = routes.domain(host_name(host))
    if route is None:
        return Found(None, None, None)
    key = (route.branch_id, route.slug)
    return Found(key, routes.get(key), route)


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
        self._hosts = HostRoutes(routes, domain)
        self.hsts = hsts
        #: Branch services answer at ``<branch_id>--<service>.<domain>``.
        self.services = services
        # A route's limits with HSTS added, made once per limits object (the gateway's
        # fast path recognises a route's limits by identity).
        self._with_hsts: dict[int, tuple[Limits | None, Limits]] = {}

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
        found = self._hosts.find(host)
        spec, route = found.spec, found.route
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
        found = self._hosts.find(host)
        spec = found.spec
        if spec is None:
            return None
        lease = self.supervisor.acquire_nowait(spec)
        if lease is None or found.route is None:
            return lease
        return self._dress(lease, found.route)


class _Observed:
    """Where one Host's requests are counted and logged (``log_path`` None: nowhere)."""

    __slots__ = ("log_path", "series")

    def __init__(self, log_path: Path | None, series: FunctionRequests | None) -> None:
        self.log_path = log_path
        self.series = series


class RequestObserver:
    """The gateway's ``on_request``: metrics and one access line per request, for hosts
    that route to a deployed function (any client can send any Host: only existing routes
    become labels). What a Host resolves to is remembered (:class:`PerHost`).

        gateway = Gateway(router, config, on_request=RequestObserver(domain, routes,
                                                                     metrics, logs))
    """

    __slots__ = ("_domain", "_logs", "_metrics", "_observed", "_routes")

    def __init__(self, domain: str, routes: RoutingTable, metrics: Metrics,
                 logs: FunctionLogs) -> None:
        self._domain = domain
        self._routes = routes
        self._metrics = metrics
        self._logs = logs
        self._observed: PerHost[_Observed] = PerHost(routes)

    def __call__(self, record: RequestRecord) -> None:
        # Runs for every request on the gateway's path: one lookup, one count, one line.
        observed = self._observed.get(record.host)
        if observed is None:
            observed = self._observed.put(record.host, self._resolve(record.host))
        log_path = observed.log_path
        series = observed.series
        if log_path is None or series is None:
            return
        series.observe(record.status, record.duration_s, record.stream)
        self._logs.access(log_path, record)

    def _resolve(self, host: str) -> _Observed:
        # Asked once per Host until the routes change: _observed remembers the answer.
        found = resolve_host(host, self._domain, self._routes)
        if found.key is None or found.spec is None:
            return _Observed(None, None)
        return _Observed(found.spec.log_path,
                         self._metrics.requests_of(found.key[0], found.key[1]))

