"""Custom domains: a host name of the user's (``api.example.com``) served by one function
of one branch, besides its ``<branch>-<slug>.<domain>`` name.

A domain belongs to one branch: a child branch does not inherit it (branch create copies
none), deleting the branch deletes it, and the name is unique platform-wide. This class
keeps the system database (:class:`~phloem.metadata.domains.DomainStore`) and the
gateway's routing table (:class:`~phloem.control.routes.RoutingTable`) in step.

    domains = Domains(DomainStore(pool), store, routes, settings, certificates)
    await domains.load()                                   # at start: every route
    row = await domains.add("api.example.com", branch, "todos", hsts=True)
    await domains.status(row)   # {"dns": {...}, "certificate": {...}}
    await domains.remove("api.example.com")
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from phloem.control.deployer import NotFound
from phloem.control.domains_status import dns_status
from phloem.control.errors import ApiError
from phloem.control.routes import DomainRoute, RoutingTable
from phloem.gateway.acme import Certificates
from phloem.metadata.domains import DomainExists, DomainRow, DomainSpec, DomainStore
from phloem.metadata.store import BranchRow, Store
from phloem.system.hostnames import hostname_problem, normalize_hostname, under_domain
from phloem.system.settings import Settings

__all__ = ["Domains"]

log = logging.getLogger("phloem.domains")


class Domains:
    def __init__(self, domains: DomainStore, store: Store, routes: RoutingTable,
                 settings: Settings, certificates: Certificates) -> None:
        self.domains = domains
        self.store = store
        self.routes = routes
        self.settings = settings
        self.certificates = certificates

    async def load(self) -> None:
        """Route every registered domain (and have its certificate) after a start."""
        rows = await self.domains.list_domains()
        self.routes.set_domains({r.hostname: _route(r) for r in rows})
        for row in rows:
            await self._certificate(row.hostname)

    def check(self, hostname: str, field: str = "hostname") -> str:
        """The normalized name, or a 400 naming ``field`` and the rule it breaks."""
        problem = hostname_problem(hostname)
        if problem is not None:
            raise ApiError(400, "invalid_hostname", f"{field}: {problem}", field)
        name = normalize_hostname(hostname)
        if under_domain(name, self.settings.domain):
            raise ApiError(400, "hostname_reserved",
                           f"{field}: {name!r} is under the platform's own function domain "
                           f"{self.settings.domain!r}, whose names the platform gives out",
                           field)
        return name

    async def add(self, hostname: str, branch: BranchRow, slug: str, *, hsts: bool = False,
                  owner: str | None = None) -> DomainRow:
        name = self.check(hostname)
        held = await self.domains.get(name)
        if held is not None:
            raise self._exists(name, await self._branch_name(held.branch_id))
        if await self.store.get_function(branch.id, slug) is None:
            raise NotFound("function", f"{slug} (branch {branch.name})")
        try:
            row = await self.domains.add(name, branch.id, slug, hsts=hsts, owner=owner)
        except DomainExists as exc:  # added meanwhile
            raise self._exists(name, await self._branch_name(exc.branch_id)) from None
        self.routes.put_domain(name, _route(row))
        await self._certificate(name)
        return row

    async def _certificate(self, name: str) -> None:
        # A registered domain maps to a function, so issuance is allowed (--tls acme:
        # the CertificateManager orders it in the background; until then the fallback).
        try:
            self.certificates.ensure(name)
        except Exception as exc:  # the domain stays; its status says what is missing
            log.warning("domains: no certificate for %s: %s", name, exc)

    def _forget(self, name: str) -> None:
        try:
            self.certificates.forget(name)
        except Exception as exc:  # the route is gone already: only the files may stay
            log.warning("domains: forgetting the certificate of %s: %s", name, exc)

    async def get(self, hostname: str) -> DomainRow:
        row = await self.domains.get(normalize_hostname(hostname))
        if row is None:
            raise NotFound("domain", normalize_hostname(hostname))
        return row

    async def remove(self, hostname: str) -> DomainRow:
        row = await self.get(hostname)
        if await self.domains.remove(row.hostname):
            self.routes.remove_domain(row.hostname)
            self._forget(row.hostname)
        return row

    async def drop_branch(self, branch: BranchRow) -> None:
        """The branch is being deleted: its domains stop being routed and their
        certificates served (the rows go with the branch by cascade)."""
        for name in self.routes.domains():
            route = self.routes.domain(name)
            if route is not None and route.branch_id == branch.id:
                self.routes.remove_domain(name)
                self._forget(name)

    async def list_domains(self, branch_id: str | None = None) -> list[DomainRow]:
        rows = await self.domains.list_domains(branch_id)
        if branch_id is None:
            # Domains of deleted branches went with them (ON DELETE CASCADE): drop their
            # routes and certificates too, which otherwise stay until the next start.
            for gone in set(self.routes.domains()) - {r.hostname for r in rows}:
                self._forget(gone)
            self.routes.set_domains({r.hostname: _route(r) for r in rows})
        return rows

    async def replace(self, branch: BranchRow, declared: dict[str, tuple[str, bool]],
                      owner: str | None) -> tuple[list[DomainRow], list[DomainRow]]:
        """Make ``owner``'s domains on ``branch`` exactly ``declared`` (hostname ->
        (function slug, hsts)); a name another branch holds is skipped and returned."""
        specs: dict[str, DomainSpec] = {}
        for hostname, (slug, hsts) in declared.items():
            name = self.check(hostname, f"domains.{hostname}")
            if name in specs:
                raise ApiError(400, "invalid_input", f"domains.{hostname}: {name} is "
                               "declared twice", f"domains.{hostname}")
            specs[name] = DomainSpec(name, slug, hsts)
        before = {r.hostname for r in await self.domains.list_domains(branch.id)}
        rows, skipped = await self.domains.replace(branch.id, list(specs.values()), owner)
        for gone in before - {r.hostname for r in rows}:
            self.routes.remove_domain(gone)
            self._forget(gone)
        for row in rows:
            self.routes.put_domain(row.hostname, _route(row))
            if row.hostname not in before:
                await self._certificate(row.hostname)
        return rows, skipped

    def url(self, row: DomainRow) -> str:
        s = self.settings
        default = 443 if s.public_scheme == "https" else 80
        port = "" if s.url_port == default else f":{s.url_port}"
        return f"{s.public_scheme}://{row.hostname}{port}"

    async def status(self, row: DomainRow) -> dict[str, Any]:
        """``dns`` (does the name resolve to this host) and ``certificate``, each with
        the reason when not."""
        dns = await dns_status(row.hostname)
        cert = self.certificates.status(row.hostname)
        return {"dns": asdict(dns), "certificate": cert._asdict()}

    @staticmethod
    def _exists(name: str, branch: str) -> ApiError:
        return ApiError(409, "domain_exists", f"hostname: {name} is registered already, on "
                        f"branch {branch}; a name serves one branch (remove it there first)",
                        "hostname")

    async def _branch_name(self, branch_id: str) -> str:
        branch = await self.store.get_branch(branch_id)
        return branch.name if branch is not None else branch_id


def _route(row: DomainRow) -> DomainRoute:
    return DomainRoute(row.branch_id, row.function_slug, row.hsts)
