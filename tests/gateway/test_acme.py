"""`phloem up --tls acme` against a real ACME server: Debian's pebble, validating HTTP-01
for real (its validation is never switched off) through pebble-challtestsrv resolving
the test names to 127.0.0.1. One pebble and one platform for the module; pebble issues
60-second certificates and the platform renews at a quarter of their lifetime, so
renewals happen within the module."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from phloem.gateway.acme import AcmeConfig, CertificateManager, StaticCertificates
from phloem.gateway.acme.manager import RETRY_FIRST_S, OrderBucket
from phloem.gateway.tls import CertificateStore, LocalCA, TlsError
from phloem.runtimes.node.provision import ensure_node
from phloem.server.https import gateway_tls
from phloem.system.settings import Settings
from phloem.testing import (
    PlatformProcess,
    free_port,
    host_of,
    platform_process,
    refused_start,
    wait_for,
    wait_for_async,
)

APP = Path(__file__).parent.parent / "apps" / "tlsecho"
NOT_ASGI = Path(__file__).parent.parent / "apps" / "notasgi"
DOMAIN = "fn.acme.test"
LIFETIME_S = 60

class Output:
    """A process's output lines, read by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))


@dataclass
class Acme:
    p: PlatformProcess
    directory: str
    pebble_ca: Path  # what pebble's own HTTPS is signed by
    root: Path  # pebble's issuing root, new at every start
    pebble: Output
    https_port: int
    plain_port: int
    host: str
    extra: list[str]  # phloem up's arguments
    dns_admin: int  # pebble-challtestsrv's management port (TXT records)
    work: Path

    def orders_at_pebble(self) -> int:
        return sum("Added order" in line for line in self.pebble.lines)

    def orders_by_platform(self) -> list[str]:
        return [line.rsplit(" ", 1)[1] for line in self.p.output
                if "acme: ordering a certificate for" in line]

    def orders_match(self) -> int:
        """The orders pebble saw, once they are exactly those the platform made (an order
        being made is logged by the platform first)."""
        n = len(self.orders_by_platform())
        wait_for(lambda: self.orders_at_pebble() == n, 60, "pebble's orders")
        return n

    def trusting(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root))


def ordered(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The names this process's certificate managers sent an order for, from the line
    each order logs (what an operator sees; ``orders_by_platform`` reads the same line
    from a platform's output)."""
    prefix = "acme: ordering a certificate for "
    return [r.getMessage()[len(prefix):] for r in caplog.records
            if r.getMessage().startswith(prefix)]


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, env=env)


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Acme]:
    if shutil.which("pebble") is None:
        pytest.skip("Debian's pebble is not installed (scripts/install installs it)")
    work = tmp_path_factory.mktemp("pebble")
    ca = LocalCA.ensure(work / "ca")
    cert, key = ca.issue(work, ["localhost", "127.0.0.1"], stem="pebble")
    plain, https, api, mgmt, dns, dns_admin = (free_port() for _ in range(6))
    (work / "config.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{api}", "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(cert), "privateKey": str(key),
        # Where pebble validates: the platform's plain and https ports.
        "httpPort": plain, "tlsPort": https,
        "ocspResponderURL": "", "externalAccountBindingRequired": False,
        "certificateValidityPeriod": LIFETIME_S}}))
    # No random validation delay (validation itself stays on); nonces still rejected 5%.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
    env["PEBBLE_VA_NOSLEEP"] = "1"
    procs = [_spawn(["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                     "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "",
                     "-tlsalpn01", "", "-management", f"127.0.0.1:{dns_admin}"], env)]
    try:
        procs.append(_spawn(["pebble", "-config", str(work / "config.json"),
                             "-dnsserver", f"127.0.0.1:{dns}"], env))
        pebble = Output(procs[1])
        directory = f"https://127.0.0.1:{api}/dir"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca.cert_path)),
                          timeout=10) as client:
            wait_for(lambda: _answers(client, directory), 30, "pebble's directory")
            root = work / "root.pem"
            root.write_text(client.get(f"https://127.0.0.1:{mgmt}/roots/0").text)
        extra = ["--tls", "acme", "--domain", DOMAIN, "--https-port", str(https),
                 "--http-port", str(plain), "--acme-directory", directory,
                 "--acme-ca-bundle", str(ca.cert_path), "--acme-email", "ops@acme.test",
                 "--acme-renew-fraction", "0.25"]
        with platform_process(extra) as p:
            fn = p.deploy("echo", APP)
            assert fn["status"] == "ready", fn
            host = host_of(fn["invocation_url"]).split(":")[0]
            assert fn["invocation_url"] == f"https://{host}:{https}"
            yield Acme(p, directory, ca.cert_path, root, pebble, https, plain, host, extra,
                       dns_admin, work)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False


def served(port: int, name: str, ctx: ssl.SSLContext | None = None) -> x509.Certificate:
    """The certificate the gateway serves for SNI ``name`` (unverified unless ``ctx``)."""
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def names_in(cert: x509.Certificate) -> list[str]:
    return [str(n.value) for n in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value]


def issuer(cert: x509.Certificate) -> str:
    return cert.issuer.rfc4514_string()


def test_deployed_host_gets_a_certificate_by_http01(acme: Acme) -> None:
    cert = wait_for(lambda: (c := served(acme.https_port, acme.host))
                    and "Pebble" in issuer(c) and c, 60, "the ACME certificate")
    assert names_in(cert) == [acme.host]
    assert acme.orders_by_platform()[0] == acme.host
    # Real clients verify it with pebble's root alone.
    url = f"https://{acme.host}:{acme.https_port}/hello"
    res = subprocess.run(["curl", "-sS", "--fail", "--cacert", str(acme.root), "--resolve",
                          f"{acme.host}:{acme.https_port}:127.0.0.1", url],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["headers"]["x-forwarded-proto"] == "https"
    with httpx.Client(verify=acme.trusting(), timeout=60) as client:
        got = client.get(f"https://127.0.0.1:{acme.https_port}/x",
                         headers={"Host": acme.host}, extensions={"sni_hostname": acme.host})
        assert got.status_code == 200 and got.json()["path"] == "/x"
    # Account key and certificate: 0600 in 0700 directories of the secrets area.
    secrets = acme.p.data_dir / "secrets" / "acme"
    for path in (secrets, secrets / "certs"):
        assert path.stat().st_mode & 0o777 == 0o700, path
    for path in (secrets / "account.json", secrets / "certs" / f"{acme.host}.pem",
                 secrets / "certs" / f"{acme.host}-key.pem"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (acme.p.data_dir / "secrets").stat().st_mode & 0o777 == 0o700


FETCH = """
import tls from "node:tls";
const [url, host] = process.argv.slice(2);
// Node 24 has no public undici to make an Agent from, and fetch has no --resolve. Loading
// fetch's undici (a Request does) puts its Agent in the global-dispatcher slot undici
// shares across copies; an Agent of that class with `connect.lookup` maps the function's
// name alone to 127.0.0.1, and the TLS name check stays the real one.
new Request(url);
const Agent = globalThis[Symbol.for("undici.globalDispatcher.1")].constructor;
const chain = [];
const dispatcher = new Agent({ connect: {
  lookup(name, options, callback) {
    if (name !== host) return callback(Object.assign(new Error(name), { code: "ENOTFOUND" }));
    if (options.all) return callback(null, [{ address: "127.0.0.1", family: 4 }]);
    callback(null, "127.0.0.1", 4);
  },
  // Called only for a chain that verified: record it, then check the name as Node does.
  checkServerIdentity(name, cert) {
    for (let c = cert; c && !chain.includes(c.fingerprint256); c = c.issuerCertificate)
      chain.push(c.fingerprint256, c.subject.CN, c.issuer.CN);
    return tls.checkServerIdentity(name, cert);
  },
} });
try {
  const res = await fetch(url, { dispatcher });
  console.log(JSON.stringify({ node: process.version, status: res.status,
                               body: await res.json(), chain }));
} catch (e) {
  console.log(JSON.stringify({ error: e.cause?.code ?? String(e), chain }));
}
"""


@pytest.fixture(scope="module")
def node24(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Node 24 as the function runtime gets it: the machine's if it is 24, else the pinned
    build (cached in $PHLOEM_TEST_NODE_TOOLS, like tests/runtimes/test_node.py's)."""
    cached = os.environ.get("PHLOEM_TEST_NODE_TOOLS")
    return ensure_node(Path(cached) if cached else tmp_path_factory.mktemp("node"),
                       lambda _line: None)


def node_fetch(acme: Acme, node: Path, path: str, ca: Path | None) -> dict[str, Any]:
    script = acme.work / "fetch.mjs"
    script.write_text(FETCH)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NODE_") and "proxy" not in k.lower()}
    if ca is not None:
        env["NODE_EXTRA_CA_CERTS"] = str(ca)
    res = subprocess.run([str(node), str(script), f"https://{acme.host}:{acme.https_port}"
                          f"{path}", acme.host], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    got: dict[str, Any] = json.loads(res.stdout)
    return got


def test_node_fetch_verifies_the_acme_certificate(acme: Acme, node24: Path) -> None:
    _verified(acme, acme.host)
    got = node_fetch(acme, node24, "/from-node", acme.root)
    assert got.get("status") == 200 and got["node"].startswith("v24."), got
    assert got["body"]["path"] == "/from-node"
    assert got["body"]["headers"]["x-forwarded-proto"] == "https"
    # The chain Node verified: the function's leaf, pebble's intermediate, pebble's root
    # (the file given in NODE_EXTRA_CA_CERTS).
    root = x509.load_pem_x509_certificate(acme.root.read_bytes())
    fingerprint = ":".join(f"{b:02X}" for b in root.fingerprint(hashes.SHA256()))
    assert len(got["chain"]) == 9, got["chain"]
    leaf, intermediate, anchor = (got["chain"][i:i + 3] for i in range(0, 9, 3))
    assert leaf[1] == acme.host and leaf[2] == intermediate[1]
    assert intermediate[1].startswith("Pebble Intermediate")
    assert intermediate[2] == anchor[1] and anchor[0] == fingerprint
    # Without pebble's root Node's own trust store refuses the same certificate.
    refused = node_fetch(acme, node24, "/from-node", None)
    assert refused == {"error": "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "chain": []}, refused


async def test_wss_echo_through_the_acme_certificate(acme: Acme) -> None:
    await asyncio.to_thread(_verified, acme, acme.host)
    async with websockets.connect(f"wss://{acme.host}:{acme.https_port}/ws",
                                  host="127.0.0.1", port=acme.https_port, open_timeout=60,
                                  ssl=acme.trusting()) as ws:
        issuer_of = dict(x[0] for x in ws.transport.get_extra_info("peercert")["issuer"])
        assert issuer_of["commonName"].startswith("Pebble Intermediate"), issuer_of
        await ws.send("acme")
        assert await asyncio.wait_for(ws.recv(), 10) == "echo:acme"
    # Python's default trust store (no pebble root) refuses the handshake.
    with pytest.raises(ssl.SSLCertVerificationError):
        async with websockets.connect(f"wss://{acme.host}:{acme.https_port}/ws",
                                      host="127.0.0.1", port=acme.https_port,
                                      open_timeout=60, ssl=ssl.create_default_context()):
            pass


def test_unknown_name_gets_the_fallback(acme: Acme) -> None:
    local_ca = acme.p.data_dir / "tls" / "ca.pem"
    # A name under the platform domain that maps to nothing: the local CA's wildcard.
    fallback = served(acme.https_port, f"nobody.{DOMAIN}",
                      ssl.create_default_context(cafile=str(local_ca)))
    assert "phloem local CA" in issuer(fallback)
    assert "phloem local CA" in issuer(served(acme.https_port, "evil.example.org"))
    with pytest.raises(ssl.SSLCertVerificationError):
        served(acme.https_port, f"nobody.{DOMAIN}", acme.trusting())
    # The plain port answers no unknown challenge token: it redirects like anything else.
    with httpx.Client(timeout=30) as plain:
        res = plain.get(f"http://127.0.0.1:{acme.plain_port}/.well-known/acme-challenge/x",
                        headers={"Host": acme.host})
    assert res.status_code == 308
    assert res.headers["location"].startswith(f"https://{acme.host}:")


def test_renewal_replaces_the_certificate_without_downtime(acme: Acme) -> None:
    first = served(acme.https_port, acme.host, acme.trusting())
    failures: list[str] = []
    rounds = [0]
    stop = threading.Event()

    def hammer() -> None:
        # The live name must verify at every handshake; names that map to nothing keep
        # getting the fallback, and must never cause an order.
        while not stop.is_set():
            try:
                served(acme.https_port, acme.host, acme.trusting())
                served(acme.https_port, f"unknown-{rounds[0]}.{DOMAIN}")
            except (OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))
            rounds[0] += 1

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        renewed = wait_for(
            lambda: (c := served(acme.https_port, acme.host, acme.trusting())).serial_number
            != first.serial_number and c, LIFETIME_S + 30, "the renewed certificate")
    finally:
        stop.set()
        thread.join(30)
    assert failures == [] and rounds[0] > 10, (failures, rounds[0])
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    on_disk = x509.load_pem_x509_certificate(
        (acme.p.data_dir / "secrets" / "acme" / "certs" / f"{acme.host}.pem").read_bytes())
    assert on_disk.serial_number == renewed.serial_number
    # Every order was for the deployed host, and pebble saw no other.
    orders = acme.orders_by_platform()
    assert len(orders) >= 2 and set(orders) == {acme.host}, orders
    assert acme.orders_match() >= 2


async def test_stored_certificates_are_served_at_start_without_an_order(
        acme: Acme, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="phloem.gateway.acme")
    # What a restart does: a manager on the stored files (a copy: the platform runs on).
    shutil.copytree(acme.p.data_dir / "secrets" / "acme", tmp_path / "acme",
                    ignore=shutil.ignore_patterns("*.tmp"))  # a renewal being written
    stored = x509.load_pem_x509_certificate(
        (tmp_path / "acme" / "certs" / f"{acme.host}.pem").read_bytes())
    before = acme.orders_match()
    local = LocalCA.ensure(tmp_path / "ca")
    store = CertificateStore()
    store.add_files(*local.issue(tmp_path, [DOMAIN], "fallback"))
    manager = CertificateManager(store, tmp_path / "acme", AcmeConfig(
        acme.directory, ca_bundle=acme.pebble_ca, renew_fraction=0.99))
    # Ensured before start, as the platform does with custom domains: it stays wanted.
    manager.ensure(acme.host)
    await manager.start()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                        ssl=store.server_context())
    try:
        assert manager.counts() == {"issued": 1, "pending": 0, "failed": 0}
        status = manager.status(acme.host)
        assert status.issued and status.reason is None
        assert status.not_after == stored.not_valid_after_utc
        port = server.sockets[0].getsockname()[1]
        got = await asyncio.to_thread(served, port, acme.host, acme.trusting())
        assert got.serial_number == stored.serial_number
        assert manager.status("other.example.org") == (
            False, "not requested: the name is not served here", None)
        # --tls self-signed|files answer the same protocol from what they serve.
        static = StaticCertificates(store, "files")
        static.ensure(acme.host)
        assert static.status(DOMAIN).issued
        assert static.status(f"x.{DOMAIN}") == (
            False, "tls is files: the served certificate is not for this name", None)
    finally:
        server.close()
        await manager.stop()
    # Pebble saw no order but the platform's own (renewals go on meanwhile).
    assert ordered(caplog) == []
    assert acme.orders_match() >= before


def _fallback(port: int, name: str) -> bool:
    return "phloem local CA" in issuer(served(port, name))


def _verified(acme: Acme, name: str) -> x509.Certificate:
    """Wait (60 s) until ``name``'s certificate verifies with pebble's root alone."""
    def issued() -> x509.Certificate | None:
        cert = served(acme.https_port, name)
        return cert if "Pebble" in issuer(cert) else None

    try:
        cert = wait_for(issued, 60, f"the ACME certificate of {name}")
    except AssertionError as exc:
        raise AssertionError("\n".join([str(exc), *acme.p.output[-40:]])) from None
    verified = served(acme.https_port, name, acme.trusting())
    assert names_in(verified) == [name] and verified.serial_number == cert.serial_number
    return verified


def test_custom_domains_and_branch_services_get_acme_certificates(acme: Acme) -> None:
    # After the renewal test (it wants the function's orders alone) and before the DNS
    # hook's restart (which wants no other name stored): everything added is removed.
    certs = acme.p.data_dir / "secrets" / "acme" / "certs"
    name = "shop.custom.test"
    with acme.p.api() as api:
        added = api.post("/domains", json={"hostname": name, "function": "echo"})
        assert added.status_code == 201, added.text
        cert = _verified(acme, name)
        # The function answers the custom name over HTTPS, verified by httpx.
        with httpx.Client(verify=acme.trusting(), timeout=60) as client:
            got = client.get(f"https://127.0.0.1:{acme.https_port}/d",
                             headers={"Host": name}, extensions={"sni_hostname": name})
        assert got.status_code == 200 and got.json()["path"] == "/d"
        status = api.get(f"/domains/{name}").json()["status"]["certificate"]
        assert status["issued"] is True and status["reason"] is None, status
        assert status["not_after"] is not None
        # A branch service's host: ensured when it is provisioned (declare) ...
        main = api.get("/branches/main").json()["id"]
        ai = f"{main}--ai.{DOMAIN}"
        put = api.put("/branches/main/services", json={"services": {"ai": {}}})
        assert put.status_code == 200, put.text
        _verified(acme, ai)
        # ... and on a child, when branch create copies it.
        child = api.post("/branches", json={"name": "acme-child", "parent": "main"})
        assert child.status_code in (200, 201), child.text
        child_ai = f"{child.json()['id']}--ai.{DOMAIN}"
        _verified(acme, child_ai)
        tls = api.get("/status").json()["components"]["tls"]
        assert tls["state"] == "acme" and tls["issued"] >= 4 and tls["failed"] == 0, tls
        text = acme.p.cli("status").stdout
        assert re.search(r"tls +acme +issued=\d+ +pending=0 +failed=0", text), text
        got = acme.p.cli("domains", "get", name).stdout
        assert "certificate  issued until 20" in got, got
        # Removed: its certificate is no longer served (the fallback is), nor stored.
        assert api.delete("/branches/acme-child").status_code == 200
        assert _fallback(acme.https_port, child_ai)
        assert api.put("/branches/main/services",
                       json={"services": {}}).status_code == 200
        assert _fallback(acme.https_port, ai)
        assert api.delete(f"/domains/{name}").status_code == 200
        assert _fallback(acme.https_port, name)
        with pytest.raises(ssl.SSLCertVerificationError):
            served(acme.https_port, name, acme.trusting())
        assert not (certs / f"{name}.pem").exists()
        assert not (certs / f"{ai}-key.pem").exists()
    assert cert.not_valid_after_utc > cert.not_valid_before_utc


def test_bad_acme_options_are_refused(tmp_path: Path) -> None:
    # Through phloem up's variables once; the rules themselves in-process.
    out = refused_start({"PHLOEM_TLS": "acme", "PHLOEM_HTTPS_PORT": str(free_port()),
                         "PHLOEM_ACME_EMAIL": "nobody"})
    assert "acme_email: must be an e-mail address (got 'nobody')" in out
    refused: list[tuple[dict[str, Any], str]] = [
        ({"acme_renew_fraction": 1.5}, "acme_renew_fraction: must be between 0 and 1"),
        ({"acme_directory": "ftp://ca.test/dir"}, "acme_directory: must be an http(s):// URL")]
    for fields, said in refused:
        with pytest.raises(ValueError, match=re.escape(said)):
            Settings(data_dir=tmp_path, tls="acme", **fields)
    unusable: list[tuple[dict[str, Any], str]] = [
        ({"acme_ca_bundle": tmp_path / "none.pem"},
         f"acme_ca_bundle: no such file: {tmp_path / 'none.pem'}"),
        ({"domain": "localhost:80"}, "domain: --tls acme needs a DNS name")]
    for fields, said in unusable:
        with pytest.raises(TlsError, match=re.escape(said)):
            gateway_tls(Settings(data_dir=tmp_path, tls="acme", **fields))


async def test_a_failed_order_is_retried_with_backoff(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="phloem.gateway.acme")
    # A directory nobody serves: the order fails at once; the reason and the retry show.
    local = LocalCA.ensure(tmp_path / "ca")
    store = CertificateStore()
    store.add_files(*local.issue(tmp_path, [DOMAIN], "fallback"))
    manager = CertificateManager(store, tmp_path / "acme", AcmeConfig(
        f"https://127.0.0.1:{free_port()}/dir"))
    await manager.start()
    try:
        manager.ensure(f"a.{DOMAIN}")
        with pytest.raises(ValueError, match="not a DNS name"):
            manager.ensure("*.example.org")
        status = await wait_for_async(
            lambda: (s := manager.status(f"a.{DOMAIN}")).reason
            and "retried" in s.reason and s, 30, "the failed order")
    finally:
        await manager.stop()
    assert not status.issued and "acme_directory:" in status.reason
    retry = re.search(r"\(retried in (\d+) s\)", status.reason)
    assert retry is not None and 0 < int(retry.group(1)) <= RETRY_FIRST_S, status.reason
    assert ordered(caplog) == [f"a.{DOMAIN}"]


def test_orders_are_rate_limited() -> None:
    bucket = OrderBucket(per_hour=2)  # a burst of 2, then one every 30 minutes
    assert [bucket.wait_s(), bucket.wait_s()] == [0.0, 0.0]
    assert 1790 < bucket.wait_s() <= 1800
    bucket.at -= 1800  # half an hour later
    assert bucket.wait_s() == 0.0


HOOK = """#!/bin/sh
# A DNS-01 hook: TXT records in pebble-challtestsrv, which answers pebble's DNS.
echo "$1 $2" >> "{log}"
case "$1" in
  present) exec curl -sSf -X POST -d "{{\\"host\\":\\"$2.\\",\\"value\\":\\"$3\\"}}" \\
             http://127.0.0.1:{port}/set-txt ;;
  cleanup) exec curl -sSf -X POST -d "{{\\"host\\":\\"$2.\\"}}" \\
             http://127.0.0.1:{port}/clear-txt ;;
esac
exit 2
"""


def test_a_deploy_whose_build_fails_orders_nothing(acme: Acme) -> None:
    # A certificate is for a live function: none for one whose first build fails.
    broken = acme.host.replace("-echo.", "-broken.")
    failed = acme.p.cli("functions", "deploy", "broken", "--path", str(NOT_ASGI),
                        "--entry", "main:app", check=False)
    assert failed.returncode == 1, failed.stdout
    # Orders go out one after another: once a function deployed after it has its
    # certificate, an order for the failed one would have been made before.
    late = host_of(acme.p.deploy("late", APP)["invocation_url"]).split(":")[0]
    wait_for(lambda: "Pebble" in issuer(served(acme.https_port, late)), 60,
             "the late function's certificate")
    orders = acme.orders_by_platform()
    assert late in orders and broken not in orders, orders
    assert "Pebble" not in issuer(served(acme.https_port, broken))


def test_remote_api_gets_its_certificate_at_start(acme: Acme) -> None:
    # Restarted with --api-listen: its name (--api-domain, api.<domain> by default) is
    # ordered at start, and clients verify the API with the CA's root alone.
    api_port, name = free_port(), f"api.{DOMAIN}"
    acme.p.stop()
    acme.p.launch([*acme.extra, "--api-listen", f"127.0.0.1:{api_port}"])
    acme.p.wait_ready()
    assert any(f"https://{name}:{api_port}/api/v1" in line for line in acme.p.output)
    cert = wait_for(lambda: (c := served(api_port, name)) and "Pebble" in issuer(c) and c,
                    60, "the remote API's certificate")
    assert names_in(cert) == [name]
    key = acme.p.credentials["api_key"]
    with httpx.Client(verify=acme.trusting(), timeout=60) as client:
        got = client.get(f"https://127.0.0.1:{api_port}/api/v1/branches",
                         headers={"Host": name, "Authorization": f"Bearer {key}"},
                         extensions={"sni_hostname": name})
        assert got.status_code == 200 and [b["name"] for b in got.json()] == ["main"]
    assert name in acme.orders_by_platform()


def test_restart_with_a_dns_hook_serves_one_wildcard(acme: Acme) -> None:
    # Last in the module: it restarts the platform, now with a DNS-01 hook. (Orders are
    # no longer compared with pebble's: one may be cut short by the stop.)
    log, hook = acme.work / "hook.log", acme.work / "hook.sh"
    hook.write_text(HOOK.format(log=log, port=acme.dns_admin))
    hook.chmod(0o700)
    acme.p.stop()
    acme.p.launch([*acme.extra, "--acme-dns-hook", str(hook)])
    acme.p.wait_ready()
    wildcard = f"*.{DOMAIN}"
    try:
        cert = wait_for(lambda: (c := served(acme.https_port, f"any-name.{DOMAIN}"))
                        and "Pebble" in issuer(c) and c, 60, "the wildcard certificate")
    except AssertionError as exc:
        raise AssertionError("\n".join([str(exc), *acme.p.output])) from None
    assert names_in(cert) == [wildcard]
    # It serves the function's host too (its own certificate of before is dropped), and
    # verifies with pebble's root.
    assert names_in(served(acme.https_port, acme.host, acme.trusting())) == [wildcard]
    with httpx.Client(verify=acme.trusting(), timeout=60) as client:
        got = client.get(f"https://127.0.0.1:{acme.https_port}/w",
                         headers={"Host": acme.host}, extensions={"sni_hostname": acme.host})
        assert got.status_code == 200 and got.json()["path"] == "/w"
    # One order in this run, the wildcard's, validated through the hook's TXT record.
    orders = acme.orders_by_platform()
    assert orders and set(orders) == {wildcard}, orders
    calls = log.read_text().splitlines()
    assert calls[:2] == [f"present _acme-challenge.{DOMAIN}",
                         f"cleanup _acme-challenge.{DOMAIN}"], calls
    stored = acme.p.data_dir / "secrets" / "acme" / "certs" / f"_.{DOMAIN}.pem"
    assert stored.stat().st_mode & 0o777 == 0o600
