"""The gateway's certificates as the settings ask (``--tls``): what the platform gives its
gateway, and what ``phloem up`` tells the user.

    setup = gateway_tls(settings)   # None with --tls off
    GatewayConfig(..., tls=setup.context)
    print(setup.ca)                 # self-signed: curl --cacert <this>

With ``--tls acme``, ``setup.acme`` obtains a certificate per name the platform ensures
(``setup.certificates.ensure(host)`` when a function's deployment goes live), puts it in
``setup.store`` and answers HTTP-01 challenges through ``GatewayConfig.acme_challenge``;
the local CA's certificate is served meanwhile (and for any other name). With
``api_listen``, the remote API's name (``settings.remote_api_name``) is ensured at start.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from phloem.gateway.acme import (
    AcmeConfig,
    CertificateManager,
    Certificates,
    StaticCertificates,
)
from phloem.gateway.acme.manager import check_name
from phloem.gateway.tls import CertificateStore, LocalCA, TlsError
from phloem.system.paths import DataPaths
from phloem.system.settings import Settings

__all__ = ["GatewayTls", "acme_dir", "gateway_tls", "tls_dir"]


@dataclass(frozen=True)
class GatewayTls:
    store: CertificateStore
    context: ssl.SSLContext
    #: The local CA's certificate clients should trust (self-signed mode), else None.
    ca: Path | None
    #: The certificate files served by default.
    cert: Path
    #: What other features ask for certificates (ensure, forget, status).
    certificates: Certificates
    #: ``--tls acme``: the manager (started once the plain listener is up), else None.
    acme: CertificateManager | None = None


def tls_dir(data_dir: Path) -> Path:
    """Where the gateway's own keys and certificates live (0700, keys 0600)."""
    return data_dir / "tls"


def acme_dir(data_dir: Path) -> Path:
    """The ACME account key and certificates: in the secrets area (root's, 0700)."""
    return DataPaths(data_dir).secrets / "acme"


def self_signed_names(settings: Settings) -> list[str]:
    """The platform domain and its one-label wildcard, localhost, loopback, and the
    gateway's address when it is a specific one."""
    names = [settings.domain, f"*.{settings.domain}", "localhost", "127.0.0.1", "::1"]
    if settings.api_listen is not None:
        names.append(settings.remote_api_name)
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
    context = store.server_context()
    if settings.tls != "acme":
        return GatewayTls(store, context, ca, cert, StaticCertificates(store, settings.tls))
    try:  # every function host is <branch_id>-<slug>.<domain>: a name ACME can validate
        check_name(f"x.{settings.domain}")
    except ValueError:
        raise TlsError(f"domain: --tls acme needs a DNS name of one or more labels "
                       f"(got {settings.domain!r})") from None
    if settings.api_listen is not None:
        try:  # the remote API's certificate is ordered at start (Platform._start)
            check_name(settings.remote_api_name)
        except ValueError:
            raise TlsError(f"api_domain: --tls acme needs a DNS name of two or more labels "
                           f"for the remote API (got {settings.remote_api_name!r})") from None
    bundle = settings.acme_ca_bundle
    if bundle is not None and not bundle.is_file():
        raise TlsError(f"acme_ca_bundle: no such file: {bundle}")
    manager = CertificateManager(store, acme_dir(settings.data_dir), AcmeConfig(
        settings.acme_directory, settings.acme_email, bundle,
        settings.acme_renew_fraction, dns_hook=settings.acme_dns_hook,
        wildcard_for=settings.domain))
    # The local CA's certificate is only the fallback: not announced as the one to trust.
    return GatewayTls(store, context, None, cert, manager, manager)
