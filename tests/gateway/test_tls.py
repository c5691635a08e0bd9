"""HTTPS on the gateway (`phloem up --tls`): real platforms, real clients (curl, httpx,
websockets, Python's ssl), and the certificate store behind a real TLS socket."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from cryptography import x509

from phloem.gateway.tls import CertificateStore, LocalCA
from phloem.system.settings import Settings
from phloem.testing import (
    PHLOEM,
    PlatformProcess,
    free_port,
    host_of,
    platform_process,
    refused_start,
    wait_for,
)

APP = Path(__file__).parent.parent / "apps" / "tlsecho"


class TlsPlatform:
    def __init__(self, p: PlatformProcess, https_port: int, ca: Path, host: str) -> None:
        self.p, self.https_port, self.ca, self.host = p, https_port, ca, host

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def deploy_echo(p: PlatformProcess, slug: str) -> dict[str, Any]:
    fn: dict[str, Any] = p.deploy(slug, APP)
    assert fn["status"] == "ready", fn
    return fn


@pytest.fixture(scope="module")
def tls_platform() -> Iterator[TlsPlatform]:
    https_port = free_port()
    with platform_process(["--tls", "self-signed", "--https-port", str(https_port)]) as p:
        line = next(x for x in p.output if "tls CA" in x)
        ca = Path(line.split()[2])
        assert ca == p.data_dir / "tls" / "ca.pem" and ca.is_file()
        assert (ca.parent / "ca-key.pem").stat().st_mode & 0o777 == 0o600
        assert (ca.parent / "gateway-key.pem").stat().st_mode & 0o777 == 0o600
        assert ca.parent.stat().st_mode & 0o777 == 0o700
        fn = deploy_echo(p, "echo")
        yield TlsPlatform(p, https_port, ca, host_of(fn["invocation_url"]).split(":")[0])


def handshake(port: int, server_name: str | None, ctx: ssl.SSLContext) -> tuple[str, str | None,
                                                                             x509.Certificate]:
    """TLS version, ALPN protocol and the server's certificate of one handshake."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return str(tls.version()), tls.selected_alpn_protocol(), \
            x509.load_der_x509_certificate(der)


def names_of(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n) for n in san.get_values_for_type(x509.DNSName)]


# -- one platform with --tls self-signed ---------------------------------------------------


def test_https_invocation_url_answers_through_curl(tls_platform: TlsPlatform) -> None:
    fn = tls_platform.p.cli_json("functions", "get", "echo")
    url = fn["invocation_url"]
    assert url == f"https://{tls_platform.host}:{tls_platform.https_port}"
    # curl verifies the name against the wildcard leaf, signed by the printed CA.
    res = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(tls_platform.ca), "--resolve",
         f"{tls_platform.host}:{tls_platform.https_port}:127.0.0.1", f"{url}/hello"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen["path"] == "/hello"
    assert seen["headers"]["x-forwarded-proto"] == "https"


def test_httpx_verifies_against_the_ca(tls_platform: TlsPlatform) -> None:
    with httpx.Client(base_url=f"https://127.0.0.1:{tls_platform.https_port}",
                      verify=tls_platform.client_context(), timeout=60,
                      headers={"Host": tls_platform.host}) as client:
        res = client.get("/x")
        assert res.status_code == 200 and res.json()["path"] == "/x"
        assert res.http_version == "HTTP/1.1"
    # Without the CA the certificate is not trusted.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), \
            httpx.Client(verify=True, timeout=10) as untrusting:
        untrusting.get(f"https://127.0.0.1:{tls_platform.https_port}/")


def test_protocol_versions_and_alpn(tls_platform: TlsPlatform) -> None:
    ctx = tls_platform.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    version, alpn, _ = handshake(tls_platform.https_port, tls_platform.host, ctx)
    assert (version, alpn) == ("TLSv1.3", "http/1.1")
    ctx12 = tls_platform.client_context()
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(tls_platform.https_port, tls_platform.host, ctx12)[0] == "TLSv1.2"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point of the test
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    # The server refuses the 1.1 ClientHello (asyncio's TLS drops the connection without
    # flushing its alert); our client failing to offer 1.1 (NO_PROTOCOLS_AVAILABLE) fails.
    with pytest.raises((ssl.SSLError, ConnectionResetError)) as refused:
        handshake(tls_platform.https_port, tls_platform.host, old)
    if isinstance(refused.value, ssl.SSLError):
        assert refused.value.reason in ("TLSV1_ALERT_PROTOCOL_VERSION",
                                        "UNEXPECTED_EOF_WHILE_READING"), refused.value


def test_sni_wildcard_and_ip(tls_platform: TlsPlatform) -> None:
    ctx = tls_platform.client_context()
    _, _, leaf = handshake(tls_platform.https_port, tls_platform.host, ctx)
    assert "*.fn.localhost" in names_of(leaf)
    # No SNI at all (a client connecting by address): the default certificate, valid for
    # 127.0.0.1 too.
    _, _, by_ip = handshake(tls_platform.https_port, "127.0.0.1", ctx)
    assert by_ip.serial_number == leaf.serial_number


def test_session_resumption(tls_platform: TlsPlatform) -> None:
    ctx = tls_platform.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # 1.2: the session is known at once
    with socket.create_connection(("127.0.0.1", tls_platform.https_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=tls_platform.host) as first:
        session = first.session
    assert session is not None and session.has_ticket
    with socket.create_connection(("127.0.0.1", tls_platform.https_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=tls_platform.host, session=session) as again:
        assert again.session_reused


async def test_wss_echo_and_sse(tls_platform: TlsPlatform) -> None:
    async with websockets.connect(f"wss://{tls_platform.host}/ws", host="127.0.0.1",
                                  port=tls_platform.https_port, open_timeout=60,
                                  ssl=tls_platform.client_context()) as ws:
        for text in ("one", "two"):
            await ws.send(text)
            assert await asyncio.wait_for(ws.recv(), 10) == f"echo:{text}"
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{tls_platform.https_port}",
                                 verify=tls_platform.client_context(), timeout=60,
                                 headers={"Host": tls_platform.host}) as client, \
            client.stream("GET", "/sse") as res:
        assert res.headers["content-type"] == "text/event-stream"
        events = [line async for line in res.aiter_lines() if line.startswith("data:")]
    assert events == ["data: 0", "data: 1", "data: 2", "data: end"]


def test_plain_port_redirects(tls_platform: TlsPlatform) -> None:
    p = tls_platform.p
    with httpx.Client(base_url=f"http://127.0.0.1:{p.gateway_port}", timeout=30,
                      headers={"Host": tls_platform.host}) as plain:
        res = plain.get("/a/b?c=1")
        assert res.status_code == 308
        assert res.headers["location"] == (f"https://{tls_platform.host}:"
                                           f"{tls_platform.https_port}/a/b?c=1")
        head = plain.head("/")
        assert head.status_code == 308 and head.content == b""
        post = plain.post("/", content=b"secret")
        assert post.status_code == 400 and "redirects to https" in post.text
    with httpx.Client(timeout=30) as no_host:
        bare = no_host.get(f"http://127.0.0.1:{p.gateway_port}/",
                           headers={"Host": "bad host!"})
        assert bare.status_code == 400


# -- --tls files, reloaded when the files change --------------------------------------------


def test_files_mode_reloads_a_replaced_pair(tmp_path: Path) -> None:
    ca = LocalCA.ensure(tmp_path / "ca")
    names = ["fn.localhost", "*.fn.localhost", "127.0.0.1"]
    cert, key = ca.issue(tmp_path, names, stem="served")
    https_port, http_port = free_port(), free_port()
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    # (files mode serves 443 and 80 unless told: a public service's ports)
    with platform_process(["--tls", "files", "--tls-cert", str(cert), "--tls-key", str(key),
                           "--listen", "127.0.0.1", "--https-port", str(https_port),
                           "--http-port", str(http_port)]) as p:
        assert not any("tls CA" in line for line in p.output)
        assert any(f"https 127.0.0.1:{https_port}  (TLS files; http 127.0.0.1:{http_port} "
                   "redirects to https)" in line for line in p.output), p.output
        first = handshake(https_port, "a.fn.localhost", ctx)[2].serial_number
        # A pair that does not match (another leaf's key) is logged and not served.
        other_cert, other_key = ca.issue(tmp_path, ["other.test"], stem="other")
        os.replace(other_key, key)
        wait_for(lambda: handshake(https_port, "a.fn.localhost", ctx) and any(
            "kept the certificate loaded before" in line for line in p.output), 20,
            "the bad pair to be logged")
        assert handshake(https_port, "a.fn.localhost", ctx)[2].serial_number == first
        # A good new pair is served from the next handshake after the check.
        new_cert, new_key = ca.issue(tmp_path, names, stem="renewed")
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        renewed = wait_for(
            lambda: (s := handshake(https_port, "a.fn.localhost", ctx)[2].serial_number)
            != first and s, 20, "the renewed certificate")
        assert renewed == x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
        assert other_cert.exists()


def test_default_mode_is_plain_http(platform: PlatformProcess) -> None:
    fn = deploy_echo(platform, "plainecho")
    assert fn["invocation_url"] == f"http://{host_of(fn['invocation_url'])}"
    assert fn["invocation_url"].endswith(f":{platform.gateway_port}")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        res = gw.get("/p")
        assert res.status_code == 200
        assert res.json()["headers"]["x-forwarded-proto"] == "http"


def test_bad_tls_options_are_refused(tmp_path: Path) -> None:
    assert "tls_cert, tls_key: both are required" in refused_start({"PHLOEM_TLS": "files"})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    out = refused_start({"PHLOEM_TLS": "files", "PHLOEM_TLS_CERT": str(junk),
                         "PHLOEM_TLS_KEY": str(junk)})
    assert "tls_cert:" in out and "cannot be used" in out
    same = refused_start({"PHLOEM_TLS": "self-signed", "PHLOEM_HTTPS_PORT": "18443",
                          "PHLOEM_HTTP_PORT": "18443"})
    assert "https_port: must differ from the plain HTTP port 18443" in same


def test_public_modes_serve_443_and_80_unless_told(tmp_path: Path) -> None:
    # acme and files are a public service's modes: HTTPS on 443, the redirect and HTTP-01
    # on 80 (the only port a CA validates on); self-signed keeps a laptop's ports.
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    public = [Settings(data_dir=tmp_path, tls="acme"),
              Settings(data_dir=tmp_path, tls="files", tls_cert=cert, tls_key=key)]
    for s in public:
        assert (s.https_port, s.plain_port, s.url_port) == (443, 80, 443), s.tls
        assert dataclasses.replace(s, domain="fn.example.com").https_port == 443
    local = Settings(data_dir=tmp_path, tls="self-signed", gateway_port=8787)
    assert (local.https_port, local.plain_port) == (8443, 8787)
    told = Settings(data_dir=tmp_path, tls="acme", https_port=9443, http_port=9080)
    assert (told.https_port, told.plain_port) == (9443, 9080)
    assert Settings(data_dir=tmp_path).serving_port == 8787  # --tls off: unchanged
    helped = subprocess.run([PHLOEM, "up", "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, timeout=60).stdout
    assert "--gateway-host,--listen" in helped.replace(" ", "") and "443 with --tls" in helped


# -- the store: SNI picks among certificates -------------------------------------------------


async def test_sni_picks_the_certificate_for_the_name(tmp_path: Path) -> None:
    ca = LocalCA.ensure(tmp_path / "ca")
    store = CertificateStore()
    store.add_files(*ca.issue(tmp_path, ["fn.example.test", "*.fn.example.test"], "main"))
    store.add_files(*ca.issue(tmp_path, ["api.custom.test"], "custom"))
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                        ssl=store.server_context())
    port = server.sockets[0].getsockname()[1]
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    try:
        for name, expected in (("x-1.fn.example.test", "*.fn.example.test"),
                               ("api.custom.test", "api.custom.test"),
                               ("API.Custom.test", "api.custom.test")):
            _, _, cert = await asyncio.to_thread(handshake, port, name, ctx)
            assert expected in names_of(cert), (name, names_of(cert))
        # A name no certificate has gets the default one (and fails verification).
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(handshake, port, "unknown.test", ctx)
    finally:
        server.close()
    assert (tmp_path / "main-key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
