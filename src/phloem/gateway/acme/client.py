"""One ACME (RFC 8555) account and its orders, HTTP-01 only, on the ``acme`` library.
Blocking (``requests`` underneath): the manager runs it in a worker thread.

    account = AcmeAccount.load_or_create(directory_url, secrets / "account.json",
                                         email="ops@example.com", ca_bundle=None)
    chain_pem, key_pem = account.issue(["a.fn.example.com"], challenges)
    chain_pem, key_pem = account.issue(["*.fn.example.com"], challenges, dns_hook=hook)

``challenges`` is a dict the plain-HTTP listener reads (token -> key authorization):
an order's tokens are in it exactly while the CA may fetch them. A wildcard needs
DNS-01: ``dns_hook(action, record, value)`` publishes (``present``) and removes
(``cleanup``) the TXT record ``record`` (``_acme-challenge.<domain>``). A ``badNonce`` answer
(the server refused a nonce; pebble refuses 5% on purpose) is retried with backoff
by the network layer, so one order does not fail on it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

__all__ = ["AcmeAccount", "AcmeError", "DnsHook", "write_private"]

#: ``hook(action, record, value)``: ``present`` or ``cleanup`` a TXT record (DNS-01).
DnsHook = Callable[[str, str, str], None]

logger = logging.getLogger("phloem.gateway.acme")

#: Attempts of one signed request refused with ``badNonce`` (each with a fresh nonce).
NONCE_ATTEMPTS = 6
#: Seconds one order may take from creation to certificate.
ORDER_TIMEOUT_S = 120
NETWORK_TIMEOUT_S = 30


class AcmeError(RuntimeError):
    """An order or registration failed; the message says why (the CA's problem text)."""


class _Network(acme_client.ClientNetwork):
    """acme's network layer retries ``badNonce`` once; a CA may refuse several in a row."""

    def post(self, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(NONCE_ATTEMPTS):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as exc:
                if exc.code != "badNonce" or attempt == NONCE_ATTEMPTS - 1:
                    raise
                logger.debug("acme: badNonce, retrying (%d)", attempt + 1)
                time.sleep(0.05 * 2 ** attempt)
        raise AssertionError("unreachable")


def write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, errors.ValidationError):
        problems = [str(ch.error) for authz in exc.failed_authzrs
                    for ch in authz.body.challenges if ch.error is not None]
        return "validation failed: " + "; ".join(problems)
    if isinstance(exc, errors.TimeoutError):
        return f"the CA did not finish the order within {ORDER_TIMEOUT_S} s"
    return f"{type(exc).__name__}: {exc}"


class AcmeAccount:
    """An account key (EC P-256, 0600 in the secrets area) registered at one directory."""

    def __init__(self, client: acme_client.ClientV2, key: JWKEC) -> None:
        self._client = client
        self._key = key

    @classmethod
    def load_or_create(cls, directory_url: str, path: Path, *, email: str | None,
                       ca_bundle: Path | None) -> AcmeAccount:
        """The account stored at ``path`` for this directory, else a new one registered
        (and stored). Raises :class:`AcmeError` when the directory cannot be reached."""
        stored: dict[str, Any] = {}
        if path.exists():
            stored = json.loads(path.read_text())
        if stored.get("key"):
            key = cast(JWKEC, JWK.json_loads(json.dumps(stored["key"])))
        else:
            key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        net = _Network(key, alg=ES256, user_agent="phloem",
                       timeout=NETWORK_TIMEOUT_S)
        if ca_bundle is not None:
            # requests takes a CA bundle path where acme's annotation says bool.
            net.verify_ssl = cast(bool, str(ca_bundle))
        try:
            directory = acme_client.ClientV2.get_directory(directory_url, net)
            client = acme_client.ClientV2(directory, net)
            uri = stored.get("uri") if stored.get("directory") == directory_url else None
            if uri:
                net.account = messages.RegistrationResource(body=messages.Registration(),
                                                            uri=uri)
            else:
                reg = messages.NewRegistration.from_data(email=email,
                                                         terms_of_service_agreed=True)
                try:
                    uri = client.new_account(reg).uri
                except errors.ConflictError as exc:  # this key has an account there
                    uri = str(exc)
                    net.account = messages.RegistrationResource(
                        body=messages.Registration(), uri=uri)
                write_private(path, json.dumps({
                    "directory": directory_url, "uri": uri,
                    "key": json.loads(key.json_dumps())}).encode())
                logger.warning("acme: registered account %s at %s", uri, directory_url)
        except (errors.Error, messages.Error, OSError, ValueError) as exc:
            raise AcmeError(f"acme_directory: {directory_url}: {_describe(exc)}") from None
        return cls(client, key)

    def issue(self, names: list[str], pending: dict[str, str],
              dns_hook: DnsHook | None = None) -> tuple[bytes, bytes]:
        """A new key and the certificate chain (PEM, leaf first) for ``names``: HTTP-01,
        each token put in ``pending`` (token -> key authorization) while the CA
        validates; DNS-01 through ``dns_hook`` for a wildcard. Raises :class:`AcmeError`."""
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        key_pem = leaf_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        csr = crypto_util.make_csr(key_pem, names)
        tokens: list[str] = []
        records: list[tuple[str, str]] = []
        try:
            order = self._client.new_order(csr)
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # validated recently: the CA reuses it
                domain = authz.body.identifier.value
                kind: type[acme_challenges.KeyAuthorizationChallenge] = (
                    acme_challenges.DNS01 if authz.body.wildcard else acme_challenges.HTTP01)
                challb = next((c for c in authz.body.challenges
                               if isinstance(c.chall, kind)), None)
                if challb is None:
                    raise AcmeError(f"{domain}: the CA offers no {kind.typ} challenge")
                response, validation = challb.response_and_validation(self._key)
                if kind is acme_challenges.DNS01:
                    if dns_hook is None:
                        raise AcmeError(f"*.{domain}: a wildcard needs DNS-01: "
                                        "set acme_dns_hook")
                    record = challb.chall.validation_domain_name(domain)
                    dns_hook("present", record, validation)
                    records.append((record, validation))
                else:
                    token = challb.chall.encode("token")
                    pending[token] = validation
                    tokens.append(token)
                self._client.answer_challenge(challb, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT_S)
            done = self._client.poll_and_finalize(order, deadline)
        except AcmeError:
            raise
        except (errors.Error, messages.Error, OSError, ValueError) as exc:
            raise AcmeError(_describe(exc)) from None
        finally:
            for token in tokens:
                pending.pop(token, None)
            for record, value in records:
                try:
                    if dns_hook is not None:
                        dns_hook("cleanup", record, value)
                except AcmeError as exc:
                    logger.error("acme: %s", exc)
        return done.fullchain_pem.encode(), key_pem
