"""Certificates on demand for names the platform serves (``--tls acme``).

Issued at deploy time, never from a handshake: the platform calls :meth:`ensure` when a
name becomes live (a function's invocation host when it is deployed, a custom domain when
it is registered, a branch service's host when it is provisioned) and :meth:`forget` when
it goes (its certificate is no longer served, renewed or kept). Python's SNI callback is
synchronous, so a name without its certificate yet gets the fallback (the local CA's)
until issuance finishes; a handshake for a name nobody ensured never starts an order.

    manager = CertificateManager(store, secrets / "acme", AcmeConfig(directory_url))
    await manager.start()                     # loads stored certificates, no order
    manager.ensure("br-1-todos.fn.example.com")
    manager.status("br-1-todos.fn.example.com")  # CertStatus(issued, reason, not_after)
    manager.challenge(token)                  # what the plain listener answers (HTTP-01)
    await manager.stop()

With a DNS hook (``AcmeConfig.dns_hook``, a command run as ``hook present|cleanup
<record> <value>`` that publishes a TXT record), one wildcard ``*.<domain>`` is ordered
by DNS-01 at start and covers every name one label below the domain: those get no
order of their own.

Orders run one at a time in a worker thread. A certificate is renewed once
``renew_fraction`` (2/3) of its lifetime has passed; a failed order is retried with
exponential backoff; orders are rate-limited (a token bucket, ``orders_per_hour``).
Keys and certificates are 0600 in a 0700 directory of the platform's secrets area
(root's; isolates run as other uids and cannot traverse it). At restart stored
certificates are served again and kept until due, without a new order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from cryptography import x509

from phloem.gateway.acme.client import AcmeAccount, AcmeError, write_private
from phloem.gateway.tls import CertificateStore, TlsError, cert_names

__all__ = ["AcmeConfig", "CertStatus", "CertificateManager", "Certificates",
           "StaticCertificates"]

logger = logging.getLogger("phloem.gateway.acme")

RETRY_FIRST_S = 15.0
RETRY_MAX_S = 6 * 3600.0
#: Seconds a DNS hook may take (publishing and waiting until the record is visible).
HOOK_TIMEOUT_S = 300.0
#: A name is at most this long (RFC 1035), in labels of letters, digits and hyphens.
MAX_NAME = 253


class CertStatus(NamedTuple):
    """Whether a name has a certificate (of its own or a covering wildcard), why not
    (or why its renewal is failing), and until when it is valid."""

    issued: bool
    reason: str | None
    not_after: datetime.datetime | None


class Certificates(Protocol):
    """What other features call: ``ensure`` a name that became live (a deployed
    function's host, a registered custom domain, a branch service's host), ``forget`` it
    when it goes, and ask its ``status``. All three run on the event loop and return at
    once (issuance, when there is any, happens in the background)."""

    def ensure(self, name: str) -> None: ...

    def forget(self, name: str) -> None: ...

    def status(self, name: str) -> CertStatus: ...


@dataclass(frozen=True)
class AcmeConfig:
    directory_url: str
    email: str | None = None
    #: CA certificates trusted for the directory's HTTPS (None: the system's).
    ca_bundle: Path | None = None
    renew_fraction: float = 2 / 3
    orders_per_hour: float = 60.0
    #: With ``dns_hook`` (a command line), ``*.<wildcard_for>`` is ordered by DNS-01.
    dns_hook: str | None = None
    wildcard_for: str | None = None


@dataclass
class _Name:
    name: str
    wanted: bool = True
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    failures: int = 0
    error: str | None = None
    #: Wall-clock time (epoch seconds) of the next order: renewal or retry.
    due: float = 0.0


@dataclass
class OrderBucket:
    """The rate limit of orders: a token bucket of ``per_hour``, bursts of up to 10."""

    per_hour: float
    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = max(1.0, min(self.per_hour, 10.0))  # a burst of up to 10

    def wait_s(self) -> float:
        """0 and one token taken, or the seconds until one is there."""
        now = time.monotonic()
        burst = max(1.0, min(self.per_hour, 10.0))
        self.tokens = min(burst, self.tokens + (now - self.at) * self.per_hour / 3600)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * 3600 / self.per_hour


def check_name(name: str) -> str:
    """``name`` lowercased, or ValueError naming the rule."""
    n = name.lower().rstrip(".")
    labels = n.split(".")
    if (len(n) > MAX_NAME or len(labels) < 2 or not all(
            0 < len(lb) <= 63 and lb.replace("-", "").isalnum() and lb.isascii()
            and not lb.startswith("-") and not lb.endswith("-") for lb in labels)):
        raise ValueError(f"name: {name!r} is not a DNS name of two or more labels "
                         "(letters, digits, hyphens; no wildcard: HTTP-01 cannot)")
    return n


def _file_stem(name: str) -> str:
    # check_name allows only [a-z0-9.-]: safe as a file name; "_" marks the wildcard.
    return "_" + name[1:] if name.startswith("*.") else name


def _name_of(stem: str) -> str:
    return "*" + stem[1:] if stem.startswith("_.") else stem


class CertificateManager:
    """ACME certificates for ensured names, served through ``store`` (module doc)."""

    def __init__(self, store: CertificateStore, directory: Path, config: AcmeConfig) -> None:
        self._store = store
        self._dir = directory
        self._certs = directory / "certs"
        self._config = config
        #: The domain whose one-label names the wildcard covers (DNS-01), else None.
        self._covered = (config.wildcard_for.lower().rstrip(".")
                         if config.dns_hook and config.wildcard_for else None)
        self._names: dict[str, _Name] = {}
        #: HTTP-01 tokens of orders in progress -> key authorization.
        self._pending: dict[str, str] = {}
        self._bucket = OrderBucket(config.orders_per_hour)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._account: AcmeAccount | None = None

    # -- what the platform calls ---------------------------------------------------
    async def start(self) -> None:
        """Serve the stored certificates and start the worker (orders come from
        :meth:`ensure` only)."""
        for d in (self._dir, self._certs):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        await asyncio.to_thread(self._load_stored)
        if self._covered is not None:
            wildcard = f"*.{self._covered}"
            self._names.setdefault(wildcard, _Name(wildcard)).wanted = True
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def ensure(self, name: str) -> None:
        """Have a certificate for ``name`` (issued now if there is no good one stored,
        then renewed). Raises ValueError for a name that cannot be validated."""
        n = check_name(name)
        if self._wildcard_of(n) is not None:
            return  # the wildcard covers it
        entry = self._names.get(n)
        if entry is None:
            self._names[n] = _Name(n)
        elif not entry.wanted:
            entry.wanted = True
        else:
            return
        self._wake.set()

    def forget(self, name: str) -> None:
        """Stop serving and renewing ``name``'s own certificate and delete its files (a
        removed domain must not be served, nor again after a restart); handshakes for
        it get the fallback (or the wildcard that covers it)."""
        n = name.lower().rstrip(".")
        if n.startswith("*."):
            return  # the DNS-01 wildcard is the platform's, never a feature's
        if self._names.pop(n, None) is None:
            return
        self._store.discard(n)
        for path in self._paths(n):
            path.unlink(missing_ok=True)

    def counts(self) -> dict[str, int]:
        """How many ensured names have a valid certificate (``issued``), wait for their
        first one (``pending``) or had their last order fail (``failed``, renewals
        included): ``phloem status``."""
        now = datetime.datetime.now(datetime.UTC)
        out = {"issued": 0, "pending": 0, "failed": 0}
        for entry in self._names.values():
            if not entry.wanted:
                continue
            if entry.error is not None:
                out["failed"] += 1
            elif entry.not_after is not None and entry.not_after > now:
                out["issued"] += 1
            else:
                out["pending"] += 1
        return out

    def status(self, name: str) -> CertStatus:
        n = name.lower().rstrip(".")
        entry = self._names.get(n)
        if entry is None or not entry.wanted:
            entry = self._wildcard_of(n) or entry
        if entry is None:
            return CertStatus(False, "not requested: the name is not served here", None)
        now = datetime.datetime.now(datetime.UTC)
        issued = entry.not_after is not None and entry.not_after > now
        if entry.error is not None:  # a failed first order, or a renewal failing
            wait = max(0, round(entry.due - time.time()))
            failed = "renewal failed: " if issued else ""
            return CertStatus(issued, f"{failed}{entry.error} (retried in {wait} s)",
                              entry.not_after)
        if issued:
            return CertStatus(True, None, entry.not_after)
        return CertStatus(False, "pending: the order is queued or in progress",
                          entry.not_after)

    def challenge(self, token: str) -> str | None:
        """The key authorization for an HTTP-01 ``token`` of an order in progress."""
        return self._pending.get(token)

    # -- inside ----------------------------------------------------------------------
    def _wildcard_of(self, name: str) -> _Name | None:
        """The wildcard's entry when it covers ``name`` (one label below its domain)."""
        if self._covered is None or name.partition(".")[2] != self._covered:
            return None
        return self._names.get(f"*.{self._covered}")

    def _paths(self, name: str) -> tuple[Path, Path]:
        stem = _file_stem(name)
        return self._certs / f"{stem}.pem", self._certs / f"{stem}-key.pem"

    def _load_stored(self) -> None:
        # Names ensured before start (custom domains load first) stay wanted.
        ensured = {n for n, e in self._names.items() if e.wanted}
        for cert in sorted(self._certs.glob("*.pem")):
            if cert.name.endswith("-key.pem"):
                continue
            stem = cert.name[:-len(".pem")]
            name, key = _name_of(stem), cert.with_name(f"{stem}-key.pem")
            try:
                self._install(name, cert, key)
            except (TlsError, ValueError, OSError) as exc:
                logger.error("acme: stored certificate %s not served: %s", cert, exc)
                continue
            self._names[name].wanted = name in ensured  # else until ensured in this run
        wildcard = f"*.{self._covered}"
        if self._covered is not None and wildcard in self._names:
            self._drop_covered(wildcard)

    def _drop_covered(self, wildcard: str) -> None:
        """Names the wildcard covers are served by it, not by certificates of their own
        (those of per-name orders before the DNS hook was set; no longer renewed)."""
        for other in self._names:
            if other != wildcard and other.partition(".")[2] == wildcard[2:]:
                self._store.discard(other)

    def _install(self, name: str, cert: Path, key: Path) -> None:
        """Serve ``cert`` for ``name`` from the next handshake on, and schedule its
        renewal."""
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        if name not in cert_names(cert):
            raise ValueError(f"{cert} is not for {name}")
        self._store.put_files(cert, key, [name])
        if name.startswith("*."):
            self._drop_covered(name)
        entry = self._names.setdefault(name, _Name(name))
        entry.not_before, entry.not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        lifetime = (entry.not_after - entry.not_before).total_seconds()
        entry.due = entry.not_before.timestamp() + lifetime * self._config.renew_fraction
        entry.failures, entry.error = 0, None

    def _next_due(self) -> _Name | None:
        wanted = [e for e in self._names.values() if e.wanted]
        return min(wanted, key=lambda e: e.due, default=None)

    async def _run(self) -> None:
        while True:
            entry = self._next_due()
            wait = None if entry is None else entry.due - time.time()
            if entry is not None and wait is not None and wait <= 0:
                limited = self._bucket.wait_s()
                if limited > 0:
                    wait = limited
                else:
                    await self._order(entry)
                    continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _order(self, entry: _Name) -> None:
        name = entry.name
        logger.warning("acme: ordering a certificate for %s", name)
        try:
            chain, key = await asyncio.to_thread(self._issue, name)
            if self._names.get(name) is not entry:
                return  # forgotten while the order ran: not served, not stored
            cert_path, key_path = self._paths(name)
            await asyncio.to_thread(write_private, key_path, key)
            await asyncio.to_thread(write_private, cert_path, chain)
            self._install(name, cert_path, key_path)
        except Exception as exc:  # one failed order (whatever the CA sent) stops no other
            entry.failures += 1
            backoff = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (entry.failures - 1))
            entry.error, entry.due = str(exc), time.time() + backoff
            logger.error("acme: no certificate for %s: %s; retrying in %d s", name, exc,
                         backoff)
            return
        logger.warning("acme: certificate for %s issued, valid until %s", name,
                       entry.not_after)

    def _issue(self, name: str) -> tuple[bytes, bytes]:
        if self._account is None:
            c = self._config
            self._account = AcmeAccount.load_or_create(
                c.directory_url, self._dir / "account.json", email=c.email,
                ca_bundle=c.ca_bundle)
        hook = self._run_hook if name.startswith("*.") else None
        return self._account.issue([name], self._pending, dns_hook=hook)

    def _run_hook(self, action: str, record: str, value: str) -> None:
        assert self._config.dns_hook is not None
        argv = [*shlex.split(self._config.dns_hook), action, record, value]
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=HOOK_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AcmeError(f"acme_dns_hook: {action} {record}: {exc}") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip()[-500:]
            raise AcmeError(f"acme_dns_hook: {action} {record} exited "
                            f"{done.returncode}: {said}")


class StaticCertificates:
    """:class:`Certificates` of ``--tls self-signed|files``: nothing is issued; a name
    has its certificate when the served one covers it."""

    def __init__(self, store: CertificateStore, mode: str) -> None:
        self._store = store
        self._mode = mode

    def ensure(self, name: str) -> None:
        pass  # nothing to order

    def forget(self, name: str) -> None:
        pass

    def status(self, name: str) -> CertStatus:
        covered = self._store.covers(name)
        if covered is None:
            return CertStatus(False, f"tls is {self._mode}: the served certificate is not "
                              "for this name", None)
        return CertStatus(True, None, covered)
