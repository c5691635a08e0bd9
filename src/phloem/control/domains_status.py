"""What ``phloem domains get`` says of a custom domain: does its name resolve to this
host, and is a certificate issued for it.

    dns = await dns_status("api.example.com", timeout=2.0)
    dns.ok, dns.addresses, dns.reason    # False, [], "does not resolve: Name or service ..."

    certs = TlsModeCertificates("self-signed", tls_dir, store)
    certs.ensure("api.example.com")      # self-signed: a leaf from the local CA, served by SNI
    certs.status("api.example.com")      # CertStatus(True, None, not_after)
    certs.forget("api.example.com")      # no longer served; its files go

Certificates come through the one :class:`~phloem.gateway.acme.Certificates` protocol
(``ensure``/``forget``/``status``, synchronous, on the loop): with ``--tls acme`` the
platform's ``CertificateManager`` answers it, otherwise :class:`TlsModeCertificates`
from the ``--tls`` mode.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from phloem.gateway.acme import CertStatus
from phloem.gateway.tls import CertificateStore, LocalCA, TlsError, cert_names

__all__ = ["DnsStatus", "TlsModeCertificates", "dns_status",
           "is_local_address"]

#: Seconds the system resolver gets per name.
DNS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DnsStatus:
    #: The name resolves to at least one address of this host.
    ok: bool
    addresses: list[str] = field(default_factory=list)
    #: Why not (None when ok).
    reason: str | None = None


def is_local_address(ip: str) -> bool:
    """An address this host has: binding a socket to it succeeds (the kernel's own
    answer, interfaces and loopback alike)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, 0))
        except OSError:
            return False
    return True


async def dns_status(name: str, timeout: float = DNS_TIMEOUT_S) -> DnsStatus:
    """Resolve ``name`` with the system resolver (``getaddrinfo``: /etc/hosts, then DNS)
    within ``timeout`` seconds and say whether it points at this host."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), timeout)
    except TimeoutError:
        return DnsStatus(False, [], f"the resolver did not answer within {timeout:g} s")
    except socket.gaierror as exc:
        return DnsStatus(False, [], f"does not resolve: {exc.strerror}")
    addresses = sorted({str(info[4][0]) for info in infos})
    local = [a for a in addresses if is_local_address(a)]
    if local:
        return DnsStatus(True, addresses)
    return DnsStatus(False, addresses,
                     f"resolves to {', '.join(addresses)}, none of them an address of this "
                     "host (point an A/AAAA or CNAME record here; behind NAT or a balancer "
                     "this check cannot see the public address)")


class TlsModeCertificates:
    """Custom domains' certificates as the platform's ``--tls`` mode gives them when it
    is not ``acme``.

    ``off``: none (``tls off``). ``self-signed``: a leaf from the platform's local CA
    for each domain, made on :meth:`ensure` (a key and a signature: milliseconds, on the
    loop) and served by SNI. ``files``: whatever the user's ``--tls-cert`` names."""

    def __init__(self, mode: str, directory: Path | None = None,
                 store: CertificateStore | None = None, cert: Path | None = None) -> None:
        self.mode = mode
        self.directory = directory
        self.store = store
        self.cert = cert
        self._served: set[str] = set()

    def _paths(self, name: str) -> tuple[Path, Path] | None:
        if self.directory is None:
            return None
        base = self.directory / "domains"
        return base / f"{name}.pem", base / f"{name}-key.pem"

    def ensure(self, name: str) -> None:
        if self.mode != "self-signed" or self.directory is None or self.store is None:
            return
        ca = LocalCA.ensure(self.directory)
        domains = self.directory / "domains"
        domains.mkdir(mode=0o700, exist_ok=True)
        cert, key = ca.issue(domains, [name], stem=name)
        if name not in self._served:
            self.store.add_files(cert, key)
            self._served.add(name)

    def forget(self, name: str) -> None:
        paths = self._paths(name)
        if self.mode != "self-signed" or paths is None or self.store is None:
            return
        self.store.discard(name)
        self._served.discard(name)
        for path in paths:
            path.unlink(missing_ok=True)

    def status(self, name: str) -> CertStatus:
        if self.mode == "off":
            return CertStatus(False, "tls off: the gateway serves plain HTTP "
                              "(phloem up --tls ...)", None)
        if self.mode == "self-signed":
            paths = self._paths(name)
            if paths is not None and paths[0].exists() and name in cert_names(paths[0]):
                return CertStatus(True, None, _not_after(paths[0]))
            return CertStatus(False, "self-signed: not issued yet", None)
        if self.cert is None:
            return CertStatus(False, f"tls {self.mode}: no certificate", None)
        try:
            names = cert_names(self.cert)
        except (OSError, ValueError, TlsError) as exc:
            return CertStatus(False, f"--tls-cert {self.cert} cannot be read: {exc}", None)
        parent = name.partition(".")[2]
        if name in names or f"*.{parent}" in names:
            return CertStatus(True, None, _not_after(self.cert))
        return CertStatus(False, f"files: --tls-cert {self.cert} does not name it (it "
                          f"names {', '.join(names) or 'nothing'})", None)


def _not_after(cert: Path) -> datetime.datetime | None:
    try:
        return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return None
