"""ACME (RFC 8555) certificates for the gateway: :mod:`.client` speaks to the CA,
:mod:`.manager` decides what to issue and when (docs/architecture.md, "Serving HTTPS")."""

from __future__ import annotations

from phloem.gateway.acme.manager import (
    AcmeConfig,
    CertificateManager,
    Certificates,
    CertStatus,
    StaticCertificates,
)

__all__ = ["AcmeConfig", "CertStatus", "CertificateManager", "Certificates",
           "StaticCertificates"]
