"""TLS for the gateway: the server ``ssl.SSLContext``, certificates chosen by SNI, files
reloaded when they change, and a local CA for ``--tls self-signed``.

    store = CertificateStore()
    store.add_files(Path("cert.pem"), Path("key.pem"))     # names read from the cert
    ctx = store.server_context()                          # give it to the listener
    ...
    ca = LocalCA.ensure(data_dir / "tls")                 # made once, key 0600
    cert, key = ca.issue(data_dir / "tls", ["fn.localhost", "*.fn.localhost", "localhost"])

Every context speaks TLS 1.2 and 1.3 only (ECDHE with AEAD ciphers on 1.2), offers ALPN
``http/1.1`` only (the gateway does not speak HTTP/2), refuses renegotiation and issues
session tickets, so clients resume without a full handshake. Tickets are sealed with the
keys of the context the listener holds (OpenSSL's session context), whichever
certificate's context SNI switched to, so resumption works across certificates.

The SNI callback is synchronous and runs inside the handshake: it only looks names up in
memory (exact name, then ``*.`` + the parent). Certificates are added ahead of time: the
ACME manager (:mod:`phloem.gateway.acme`) puts what it obtained with
:meth:`CertificateStore.put_files`; a name without one gets the default (the fallback).
A pair added from files is checked again (stat, at most once a second, on a handshake)
and reloaded when either file changed; a new pair that does not load keeps the old one
and is logged once.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateStore", "LocalCA", "TlsError", "cert_names", "server_context"]

logger = logging.getLogger("phloem.gateway.tls")

#: Seconds between two checks of a files pair (on a handshake; never on a timer).
RELOAD_CHECK_S = 1.0
#: TLS 1.2 suites: forward secret, authenticated encryption (1.3 has only such suites).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
CA_DAYS = 3650
LEAF_DAYS = 365


class TlsError(ValueError):
    """A certificate or key that cannot be used; the message names the field."""


class _DirectSSLObject(ssl.SSLObject):
    """An ``SSLObject`` whose ``read``, ``write`` and ``pending`` are the C object's own
    methods: the event loop's TLS protocol (uvloop's, asyncio's) calls them for every
    record, and ``SSLObject``'s Python wrappers only pass the arguments on (a frame per
    call: about 1 us of the 16 us TLS costs the gateway per small request here, measured
    with memory BIOs). The loops always pass ``read`` a size."""

    @classmethod
    def _create(cls, *args: object, **kwargs: object) -> _DirectSSLObject:
        self: _DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        raw = self._sslobj  # type: ignore[attr-defined]
        # Instance attributes shadow the wrappers (the loops bind them once per connection).
        self.read, self.write, self.pending = raw.read, raw.write, raw.pending  # type: ignore[method-assign]
        return self


def server_context(cert: Path, key: Path, *, field_name: str = "tls_cert") -> ssl.SSLContext:
    """A server context serving ``cert`` (a PEM chain, leaf first) with ``key``.

        ctx = server_context(Path("cert.pem"), Path("key.pem"))
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = _DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_NO_TICKET  # resumption by session tickets
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsError(f"{field_name}: no such file: {exc.filename}") from None
    except PermissionError as denied:
        raise TlsError(f"{field_name}: not readable: {denied.filename}") from None
    except ssl.SSLError as unusable:
        # getattr: typeshed says str, but OpenSSL errors without a reason carry None (and
        # the compiled module checks declared types).
        reason = getattr(unusable, "reason", None) or unusable
        raise TlsError(f"{field_name}: {cert} with key {key} cannot be used: "
                       f"{reason} (a PEM certificate chain and its private key "
                       "are expected)") from None
    return ctx


def cert_names(cert: Path) -> list[str]:
    """The DNS names and IP addresses the first certificate in ``cert`` is for."""
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names: list[str] = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


@dataclass
class _FilesPair:
    """A certificate and key on disk, with what they looked like when loaded."""

    cert: Path
    key: Path
    names: list[str]
    context: ssl.SSLContext
    seen: tuple[object, ...]
    failed: tuple[object, ...] | None = None  # a signature that did not load (logged)
    #: False: its owner replaces it (put_files); handshakes do not check the files.
    watch: bool = True


def _signature(*paths: Path) -> tuple[object, ...]:
    sig: list[object] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            sig.append(None)
            continue
        sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sig)


@dataclass
class CertificateStore:
    """Certificates by server name (exact or ``*.parent``); the first one added is the
    default, served to a client that sends no name or a name no certificate has."""

    _by_name: dict[str, ssl.SSLContext] = field(default_factory=dict)
    _pairs: list[_FilesPair] = field(default_factory=list)
    _default: ssl.SSLContext | None = None
    _front: ssl.SSLContext | None = None
    _checked: float = 0.0

    def add_files(self, cert: Path, key: Path, names: Sequence[str] | None = None) -> list[str]:
        """Serve ``cert``/``key`` for ``names`` (default: the names in the certificate);
        reloaded when the files change. Raises :class:`TlsError` if they do not load."""
        ctx = server_context(cert, key)
        chosen = [n.lower() for n in (names if names is not None else cert_names(cert))]
        pair = _FilesPair(cert, key, chosen, ctx, _signature(cert, key))
        self._pairs.append(pair)
        self._install(pair)
        return chosen

    def put_files(self, cert: Path, key: Path, names: Sequence[str]) -> None:
        """Serve ``cert``/``key`` for ``names`` from the next handshake on, replacing
        what was served from ``cert`` before (an ACME renewal); not checked on
        handshakes. Raises :class:`TlsError` if they do not load."""
        ctx = server_context(cert, key)
        chosen = [n.lower() for n in names]
        for pair in self._pairs:
            if pair.cert == cert:
                self._replace(pair, ctx, _signature(cert, key))
                pair.names = chosen
                self._install(pair)
                return
        pair = _FilesPair(cert, key, chosen, ctx, _signature(cert, key), watch=False)
        self._pairs.append(pair)
        self._install(pair)

    def discard(self, name: str) -> None:
        """Stop serving a certificate of its own for ``name`` (a wildcard or the default
        serves it); a pair left without names goes, the default stays."""
        n = name.lower()
        self._by_name.pop(n, None)
        for pair in list(self._pairs):
            if n in pair.names:
                pair.names.remove(n)
                if not pair.names and pair is not self._pairs[0]:
                    self._pairs.remove(pair)

    def covers(self, server_name: str) -> datetime.datetime | None:
        """The expiry of the certificate served for ``server_name`` when one is for
        that name (exact or wildcard; not the default for unknown names), else None."""
        name = server_name.lower().rstrip(".")
        ctx = self._by_name.get(name) or self._by_name.get("*." + name.partition(".")[2])
        pair = next((p for p in self._pairs if p.context is ctx), None)
        if pair is None:
            return None
        try:
            leaf = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        except (OSError, ValueError):
            return None
        return leaf.not_valid_after_utc

    def _replace(self, pair: _FilesPair, ctx: ssl.SSLContext,
                 sig: tuple[object, ...]) -> None:
        """Drop ``pair``'s names (their new context comes with _install)."""
        for name in pair.names:
            if self._by_name.get(name) is pair.context:
                del self._by_name[name]
        if self._default is pair.context:
            self._default = ctx
        pair.context, pair.seen, pair.failed = ctx, sig, None

    def _install(self, pair: _FilesPair) -> None:
        first = self._default is None or (self._pairs and self._pairs[0] is pair)
        for name in pair.names:
            self._by_name[name] = pair.context
        if first:
            self._default = pair.context

    def lookup(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for ``server_name``: exact, then the wildcard one label up, then
        the default."""
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self._by_name.get(name)
            if ctx is not None:
                return ctx
            _, dot, parent = name.partition(".")
            if dot:
                ctx = self._by_name.get("*." + parent)
                if ctx is not None:
                    return ctx
        return self._default

    def server_context(self) -> ssl.SSLContext:
        """The context the listener serves with: the default certificate, switched per
        handshake by SNI to the one for the name asked for."""
        if self._front is None:
            if not self._pairs:
                raise TlsError("tls: no certificate to serve")
            first = self._pairs[0]
            front = server_context(first.cert, first.key)
            front.sni_callback = self._on_sni
            self._front = front
        return self._front

    def _on_sni(self, sslobj: ssl.SSLObject, server_name: str | None,
                _ctx: ssl.SSLContext) -> int | None:
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_S:
            self._checked = now
            self.reload_changed()
        ctx = self.lookup(server_name)
        if ctx is not None and ctx is not sslobj.context:
            sslobj.context = ctx
        return None

    def reload_changed(self) -> list[Path]:
        """Reload every pair whose files changed since loaded; the certificates reloaded.
        A pair that does not load keeps serving the previous one (logged once)."""
        reloaded: list[Path] = []
        for pair in self._pairs:
            if not pair.watch:
                continue
            sig = _signature(pair.cert, pair.key)
            if sig == pair.seen or sig == pair.failed:
                continue
            try:
                ctx = server_context(pair.cert, pair.key)
            except TlsError as exc:
                pair.failed = sig
                logger.error("tls: kept the certificate loaded before: %s", exc)
                continue
            self._replace(pair, ctx, sig)
            with contextlib.suppress(ValueError, OSError):  # else keep the names it had
                pair.names = cert_names(pair.cert)
            self._install(pair)
            reloaded.append(pair.cert)
            logger.warning("tls: reloaded %s (names %s)", pair.cert, ", ".join(pair.names))
        return reloaded


# -- the local CA of --tls self-signed ---------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class LocalCA:
    """A certificate authority of this platform alone: ``ca.pem`` is what clients trust
    (``curl --cacert``), ``ca-key.pem`` (0600) signs the gateway's certificates."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def ensure(cls, directory: Path, name: str = "phloem local CA") -> LocalCA:
        """The CA in ``directory``, made on first use (and again if it expired)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            if (isinstance(key, ec.EllipticCurvePrivateKey)
                    and cert.not_valid_after_utc > _now() + datetime.timedelta(days=30)):
                return cls(cert_path, key_path, cert, key)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "phloem")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, encipher_only=False,
                    decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert_path, key_path, cert, key)

    def issue(self, directory: Path, names: Iterable[str],
              stem: str = "gateway") -> tuple[Path, Path]:
        """``<stem>.pem`` (leaf + CA) and ``<stem>-key.pem`` (0600) for ``names`` (DNS
        names, ``*.`` wildcards, IP addresses); kept while it is for the same names, signed
        by this CA and has more than a third of its lifetime left."""
        wanted = list(dict.fromkeys(n.lower() for n in names))
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        if cert_path.exists() and key_path.exists() and self._still_good(cert_path, wanted):
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for n in wanted:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        _write_private(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM)
                      + self.cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def _still_good(self, cert_path: Path, wanted: list[str]) -> bool:
        try:
            leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            return False
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        try:
            leaf.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return (sorted(cert_names(cert_path)) == sorted(wanted)
                and leaf.not_valid_after_utc - _now() > lifetime / 3)
