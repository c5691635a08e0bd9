"""The routing table: which deployment's isolates serve each function of each branch.

The deployer writes it (a deploy or rollback activates a version, a delete removes it);
the gateway's router (:class:`phloem.server.dispatch.PlatformRouter`) reads it on every
request. Neither knows the other: this table is all they share.

    table = RoutingTable()
    table.put("br-quiet-moon-3f9a2c", "todos", spec)      # the active deployment's spec
    table.get(("br-quiet-moon-3f9a2c", "todos"))           # spec, or None: a 404
    table.deployments_of("br-quiet-moon-3f9a2c")          # ["dep-1a2b", ...]
    table.remove("br-quiet-moon-3f9a2c", "todos")

Custom domains (``phloem domains``) are routes too: a host name that stands for one
branch's function, kept here by :class:`phloem.control.domains.Domains`.

    table.put_domain("api.example.com", DomainRoute("br-quiet-moon-3f9a2c", "todos", hsts=True))
    table.domain("api.example.com")                        # DomainRoute, or None
"""

from __future__ import annotations

from dataclasses import dataclass

from phloem.supervisor import IsolateSpec


@dataclass(frozen=True, slots=True)
class DomainRoute:
    """What a custom domain serves: a function of one branch (and whether with HSTS)."""

    branch_id: str
    slug: str
    hsts: bool = False


class RoutingTable:
    """(branch id, function slug) -> the spec of the function's active deployment.

    Lookups take the key as one tuple because that is what the router parses a Host
    header into (:func:`phloem.server.dispatch.parse_host`)."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], IsolateSpec] = {}
        self._domains: dict[str, DomainRoute] = {}
        #: Changes with every write: what readers remember per Host is good while it
        #: stays the same (see phloem.server.dispatch.HostRoutes).
        self.version = 0

    def get(self, key: tuple[str, str]) -> IsolateSpec | None:
        return self._specs.get(key)

    def put(self, branch_id: str, slug: str, spec: IsolateSpec) -> None:
        """Route the function's new requests to ``spec`` from now on."""
        self._specs[(branch_id, slug)] = spec
        self.version += 1

    def remove(self, branch_id: str, slug: str) -> None:
        """Stop routing the function (absent already is fine)."""
        self._specs.pop((branch_id, slug), None)
        self.version += 1

    def deployments_of(self, branch_id: str) -> list[str]:
        """The active deployment ids of a branch's functions."""
        return [spec.deployment_id for (b, _), spec in self._specs.items() if b == branch_id]

    # -- custom domains ----------------------------------------------------------------

    def domain(self, hostname: str) -> DomainRoute | None:
        """The route of a custom domain (lowercase, no port, no trailing dot)."""
        return self._domains.get(hostname)

    def domains(self) -> list[str]:
        """The custom domains routed now."""
        return list(self._domains)

    def put_domain(self, hostname: str, route: DomainRoute) -> None:
        self._domains[hostname] = route
        self.version += 1

    def remove_domain(self, hostname: str) -> None:
        self._domains.pop(hostname, None)
        self.version += 1

    def set_domains(self, routes: dict[str, DomainRoute]) -> None:
        """Replace every custom domain route (at start, from the system database)."""
        self._domains = dict(routes)
        self.version += 1
