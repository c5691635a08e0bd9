"""The gateway's certificates as the settings ask (``--tls``): what the platform gives its
gateway, and what ``phloem up`` tells the user.

    setup = gateway_tls(settings)   # None with --tls off
    GatewayConfig(..., tls=setup.context)
    print(setup.ca)                 # self-signed: curl --cacert <this>

An ACME issuer (a later part) adds the certificates it obtains to ``setup.store`` and
answers HTTP-01 challenges through ``GatewayConfig.acme_challenge``.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from phloem.gateway.tls import CertificateStore, LocalCA
from phloem.system.settings import Settings

__all__ = ["GatewayTls", "gateway_tls", "tls_dir"]


@dataclass(frozen=True)
class GatewayTls:
    store: CertificateStore
    context: ssl.SSLContext
    #: The local CA's certificate clients should trust (self-signed mode), else None.
    ca: Path | None
    #: The certificate files served by default.
    cert: Path


def tls_dir(data_dir: Path) -> Path:
    """Where the gateway's own keys and certificates live (0700, keys 0600)."""
    return data_dir / "tls"


def self_signed_names(settings: Settings) -> list[str]:
    """The platform domain and its one-label wildcard, localhost, loopback, and the
    gateway's address when it is a specific one."""
    names = [settings.domain, f"*.{settings.domain}", "localhost", "127.0.0.1", "::1"]
    try:
        if not ipaddress.ip_address(settings.gateway_host).is_unspecified:
            names.append(settings.gateway_host)
    except ValueError:
        names.append(settings.gateway_host)  # a host name
    return list(dict.fromkeys(n.lower() for n in names))


def gateway_tls(settings: Settings) -> GatewayTls | None:
    """The TLS setup for ``settings.tls``; raises :class:`phloem.gateway.tls.TlsError`
    (naming the setting) when the certificate cannot be used."""
    if not settings.tls_on:
        return None
    store = CertificateStore()
    ca: Path | None = None
    if settings.tls == "files":
        assert settings.tls_cert is not None and settings.tls_key is not None
        cert, key = settings.tls_cert.absolute(), settings.tls_key.absolute()
    else:
        directory = tls_dir(settings.data_dir)
        local = LocalCA.ensure(directory)
        cert, key = local.issue(directory, self_signed_names(settings))
        ca = local.cert_path
    store.add_files(cert, key)
    return GatewayTls(store, store.server_context(), ca, cert)
