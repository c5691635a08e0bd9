"""Custom domains on one real platform serving HTTPS (``--tls self-signed``): their
lifecycle over the API and the CLI, the rules a name must follow, routing by the custom
Host (what the function sees), HSTS only when asked and only over TLS, no inheritance by
a child branch, and neon.ts ``customDomains`` through ``phloem deploy``."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from phloem.control.domains_status import dns_status, is_local_address
from phloem.testing import PlatformProcess, free_port, host_of, platform_process
from tests.test_neon import HELLO, write

APP = Path(__file__).parent.parent / "apps" / "tlsecho"


class DomainsPlatform:
    def __init__(self, p: PlatformProcess, https_port: int, ca: Path) -> None:
        self.p, self.https_port, self.ca = p, https_port, ca

    def https(self, name: str, path: str = "/", sni: str | None = None) -> httpx.Response:
        """GET over TLS to 127.0.0.1 with ``name`` as Host and SNI (its certificate is
        checked against it), or ``sni``."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with httpx.Client(verify=ctx, timeout=60) as client:
            return client.get(f"https://127.0.0.1:{self.https_port}{path}",
                              headers={"Host": f"{name}:{self.https_port}"},
                              extensions={"sni_hostname": sni or name})


@pytest.fixture(scope="module")
def dp() -> Iterator[DomainsPlatform]:
    https_port = free_port()
    with platform_process(["--tls", "self-signed", "--https-port", str(https_port)]) as p:
        fn = p.deploy("echo", APP)
        assert fn["status"] == "ready", fn
        yield DomainsPlatform(p, https_port, p.data_dir / "tls" / "ca.pem")


@pytest.fixture(scope="module")
def kid(dp: DomainsPlatform) -> Iterator[str]:
    """A child of main, made without main's functions."""
    name = f"kid-{uuid.uuid4().hex[:6]}"
    with dp.p.api() as api:
        made = api.post("/branches", json={"name": name})
        assert made.status_code in (200, 201), made.text
        yield name
        api.delete(f"/branches/{name}")


def add(api: httpx.Client, hostname: str, function: str = "echo", **extra: Any,
        ) -> httpx.Response:
    return api.post("/domains", json={"hostname": hostname, "function": function, **extra})


def test_lifecycle_over_api_and_cli(dp: DomainsPlatform) -> None:
    """~3 s: add, get, list, remove through both; status fields with their reasons."""
    p = dp.p
    with p.api() as api:
        made = add(api, "Shop.Example.com.")
        assert made.status_code == 201, made.text
        row = made.json()
        assert (row["hostname"], row["branch"], row["function"], row["hsts"], row["owner"]) \
            == ("shop.example.com", "main", "echo", False, None)
        assert row["url"] == f"https://shop.example.com:{dp.https_port}"
        status = row["status"]
        # The test machine's resolver does not know the name: not ok, and it says why.
        assert status["dns"]["ok"] is False and status["dns"]["reason"]
        assert status["certificate"]["issued"] is True
        assert status["certificate"]["reason"] is None
        assert status["certificate"]["not_after"] is not None  # the local CA's leaf
        listed = api.get("/domains").json()
        assert [d["hostname"] for d in listed] == ["shop.example.com"]
        assert listed[0]["status"] is None
        assert api.get("/domains", params={"status": "true"}).json()[0]["status"] is not None
    text = p.cli("domains", "get", "shop.example.com").stdout
    assert "certificate  issued until 20" in text, text
    added = p.cli_json("domains", "add", "cli.example.com", "--function", "echo", "--hsts")
    assert (added["hostname"], added["hsts"]) == ("cli.example.com", True)
    assert [d["hostname"] for d in p.cli_json("domains", "list")] == \
        ["cli.example.com", "shop.example.com"]
    assert p.cli_json("domains", "remove", "shop.example.com")["hostname"] == \
        "shop.example.com"
    assert "removed cli.example.com" in p.cli("domains", "remove", "cli.example.com").stdout
    with p.api() as api:
        assert api.get("/domains").json() == []
        assert api.get("/domains/shop.example.com").json()["error"]["code"] == \
            "domain_not_found"


@pytest.mark.parametrize(("hostname", "status", "code"), [
    ("localhost", 400, "invalid_hostname"),
    ("127.0.0.1", 400, "invalid_hostname"),
    ("*.example.com", 400, "invalid_hostname"),
    ("under_score.example.com", 400, "invalid_hostname"),
    ("a" * 64 + ".example.com", 400, "invalid_hostname"),
    ("x.fn.localhost", 400, "hostname_reserved"),
])
def test_hostname_rules(dp: DomainsPlatform, hostname: str, status: int, code: str) -> None:
    """Each bad name gets a 400 naming the field and the rule."""
    with dp.p.api() as api:
        resp = add(api, hostname)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["field"]) == (code, "hostname")
    assert err["message"].startswith("hostname: ")


def test_conflicts_and_unknown_function(dp: DomainsPlatform) -> None:
    """A name is unique platform-wide (409); the function must exist (404)."""
    p = dp.p
    with p.api() as api:
        assert add(api, "dup.example.com").status_code == 201
        again = add(api, "DUP.example.com")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "domain_exists"
        assert "on branch main" in again.json()["error"]["message"]
        missing = add(api, "nofn.example.com", function="nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "function_not_found"
        nobranch = add(api, "nob.example.com", branch="no-such-branch")
        assert nobranch.json()["error"]["code"] == "branch_not_found"
    cli = p.cli("domains", "add", "dup.example.com", "--function", "echo", check=False)
    assert cli.returncode == 1 and "dup.example.com is registered already" in cli.stderr
    p.cli("domains", "remove", "dup.example.com")


def test_routing_and_hsts_only_when_asked_and_over_tls(dp: DomainsPlatform) -> None:
    """~2 s: the custom Host reaches the function with X-Forwarded-Host/-Proto/-For;
    Strict-Transport-Security comes with the HSTS domain over TLS, never otherwise."""
    p = dp.p
    with p.api() as api:
        assert add(api, "secure.example.com", hsts=True).status_code == 201
        assert add(api, "lax.example.com").status_code == 201
    try:
        secure = dp.https("secure.example.com", "/where")
        assert secure.status_code == 200, secure.text
        seen = secure.json()
        assert seen["path"] == "/where"
        assert seen["headers"]["x-forwarded-host"] == f"secure.example.com:{dp.https_port}"
        assert seen["headers"]["x-forwarded-proto"] == "https"
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert secure.headers["strict-transport-security"] == "max-age=31536000"
        # Again, now that an idle upstream connection is pooled (the callback path).
        assert dp.https("secure.example.com").headers["strict-transport-security"] == \
            "max-age=31536000"
        lax = dp.https("lax.example.com")
        assert lax.status_code == 200 and "strict-transport-security" not in lax.headers
        # The function's own name: no HSTS either.
        own = host_of(p.cli_json("functions", "get", "echo")["invocation_url"])
        plain_own = dp.https(own.split(":")[0])
        assert plain_own.status_code == 200
        assert "strict-transport-security" not in plain_own.headers
        # Plain HTTP only redirects, without HSTS (browsers ignore it there).
        with p.gateway("secure.example.com") as gw:
            redirect = gw.get("/where")
        assert redirect.status_code == 308
        assert redirect.headers["location"].startswith("https://secure.example.com")
        assert "strict-transport-security" not in redirect.headers
        # Unknown names still 404 (over the default certificate's name).
        assert dp.https("nobody.example.com", sni="localhost").status_code == 404
    finally:
        p.cli("domains", "remove", "secure.example.com")
        p.cli("domains", "remove", "lax.example.com")
    # Removed: its own certificate is no longer served (the default is), and no route.
    with pytest.raises(httpx.ConnectError, match=r"not valid for 'secure\.example\.com'"):
        dp.https("secure.example.com")
    assert dp.https("secure.example.com", sni="localhost").status_code == 404


def test_not_inherited_by_a_child_branch(dp: DomainsPlatform, kid: str) -> None:
    """~3 s: a child of main gets none of main's domains, and cannot take one main
    holds."""
    p = dp.p
    with p.api() as api:
        assert add(api, "parent.example.com").status_code == 201
    try:
        assert p.cli_json("domains", "list", "--branch", kid) == []
        taken = p.cli("domains", "add", "parent.example.com", "--function", "echo",
                      "--branch", kid, check=False)
        assert taken.returncode == 1 and "on branch main" in taken.stderr
        with p.api() as api:
            assert [d["branch"] for d in api.get("/domains").json()] == ["main"]
        assert dp.https("parent.example.com").status_code == 200
    finally:
        p.cli("domains", "remove", "parent.example.com")


def test_neon_ts_custom_domains_deploy_and_child_skip(dp: DomainsPlatform, kid: str,
                                                      tmp_path: Path) -> None:
    """~25 s: a function's customDomains are added by deploy on the default branch; on a
    child the closure's list applies, skipping (and saying so) main's name; a name no
    longer declared is removed; deleting the child takes its domain and certificate."""
    p = dp.p
    root = write(tmp_path / "proj", {
        "neon.ts": """import { defineConfig } from "@neon/config/v1";
export default defineConfig({
  functions: { web: { name: "web", source: "a.ts",
    customDomains: (process.env.NEON_DOMAINS ?? "").split(",").filter(Boolean) } },
  branch: (b) => b.isDefault ? {} :
    { functions: { web: { customDomains: ["neon.example.com", "kid.example.com"] } } },
});
""", "a.ts": HELLO, ".env": "NEON_DOMAINS=neon.example.com\n"})
    p.cli("link", "--branch", "main", "--no-env-pull", cwd=root)
    applied = p.cli_json_in(root, "deploy", "--yes")
    assert [r["ok"] for r in applied["results"]] == [True], applied
    owner = json.loads((root / ".phloem" / "link.json").read_text())["project_id"]
    assert [(d["hostname"], d["owner"]) for d in applied["domains"]["domains"]] == \
        [("neon.example.com", owner)]
    assert dp.https("neon.example.com").text == "hi "

    plan = p.cli_json_in(root, "config", "plan", "--branch", kid)
    assert plan["domains"]["add"] == ["kid.example.com"]
    assert "belongs to branch main" in plan["domains"]["skip"]["neon.example.com"]
    out = p.cli("deploy", "--branch", kid, "--yes", cwd=root).stdout
    assert "skipped domain neon.example.com: belongs to branch main" in out, out
    assert "ok domain kid.example.com -> web" in out, out
    with p.api() as api:
        assert [(d["hostname"], d["branch"]) for d in api.get("/domains").json()] == \
            [("kid.example.com", kid), ("neon.example.com", "main")]
    # No longer declared: deploy removes it (this project's own, on this branch).
    (root / ".env").write_text("NEON_DOMAINS=\n")
    plan = p.cli_json_in(root, "config", "plan")
    assert plan["domains"]["remove"] == ["neon.example.com"]
    p.cli("deploy", "--yes", cwd=root)
    assert dp.https("kid.example.com").status_code == 200
    leaf = p.data_dir / "tls" / "domains" / "kid.example.com.pem"
    assert leaf.exists()
    with p.api() as api:
        assert api.get("/domains/neon.example.com").status_code == 404
        # Deleting the branch takes its domains: routes, rows, served certificates.
        assert api.delete(f"/branches/{kid}").status_code == 200
        assert api.get("/domains/kid.example.com").status_code == 404
    with pytest.raises(httpx.ConnectError, match=r"not valid for 'kid\.example\.com'"):
        dp.https("kid.example.com")
    assert not leaf.exists()


def test_dns_status_uses_the_system_resolver() -> None:
    """/etc/hosts names localhost: it resolves to this host; an unknown name does not."""
    import asyncio

    assert is_local_address("127.0.0.1") and not is_local_address("192.0.2.1")
    local = asyncio.run(dns_status("localhost"))
    assert local.ok and "127.0.0.1" in local.addresses and local.reason is None
    nowhere = asyncio.run(dns_status("no-such-name.invalid"))
    assert not nowhere.ok and nowhere.reason is not None
