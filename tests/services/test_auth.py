"""Neon Auth on a real platform: Better Auth per branch over plain HTTP (as its docs show),
JWTs verified by a deployed Node function with jose, users copied by a branch create and
restored by a reset, and each branch its own issuer. One platform for the module."""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from phloem.testing import PlatformProcess, host_of, platform_process, processes_mentioning

APP = Path(__file__).parent / "apps" / "auth-verify"
PASSWORD = "correct horse battery"


@dataclass
class Setup:
    p: PlatformProcess
    main_id: str
    #: The verifying function's host on main, and main's direct connection string.
    fn_host: str
    main_url: str
    env: dict[str, str]


NEON_TS = """
import { defineConfig } from "@neondatabase/config/v1";
export default defineConfig({
  auth: true,
  preview: { functions: { authcheck: { name: "auth check", source: "index.mjs" } } },
});
"""


@pytest.fixture(scope="module")
def auth_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A platform whose main branch has auth on and the verifying function deployed, by
    a project whose neon.ts says ``auth: true`` (as with-realtime-chat's does)."""
    root = tmp_path_factory.mktemp("authproj") / "proj"
    shutil.copytree(APP, root)
    (root / "neon.ts").write_text(NEON_TS)
    with platform_process() as p:
        p.cli("link", "--branch", "main", cwd=root)
        p.cli_json_in(root, "deploy")
        assert services(p, "main")["services"] == {"auth": {}}
        fn = p.cli_json("functions", "get", "authcheck")
        assert fn["status"] == "ready", fn
        fn_host = host_of(fn["invocation_url"])
        with p.gateway(fn_host) as gw:
            env = gw.get("/env").json()
        main_url = p.cli("connection-string", "--branch", "main", "--unpooled").stdout
        yield Setup(p, p.cli_json("branches", "get", "main")["id"], fn_host,
                    main_url.strip(), env)


def services(p: PlatformProcess, branch: str, wanted: dict[str, Any] | None = None) -> Any:
    url = f"http://127.0.0.1:{p.api_port}/api/v1/branches/{branch}/services"
    headers = {"Authorization": f"Bearer {p.credentials['api_key']}"}
    res = (httpx.get(url, headers=headers, timeout=60) if wanted is None else
           httpx.put(url, headers=headers, json={"services": wanted}, timeout=600))
    assert res.status_code == 200, res.text
    return res.json()


class Auth:
    """Plain HTTP to one branch's auth server through the gateway."""

    def __init__(self, p: PlatformProcess, base_url: str) -> None:
        self.base_url = base_url
        origin, _, self.path = base_url.partition("://")[2].partition("/")
        self.client = p.gateway(origin, timeout=60)
        self.path = "/" + self.path

    def post(self, route: str, body: dict[str, Any], token: str | None = None) -> httpx.Response:
        return self.client.post(self.path + route, json=body, headers=bearer(token))

    def get(self, route: str, token: str | None = None) -> httpx.Response:
        return self.client.get(self.path + route, headers=bearer(token))

    def sign_up(self, email: str) -> tuple[str, str]:
        """(user id, session token)"""
        res = self.post("/sign-up/email", {"email": email, "password": PASSWORD,
                                           "name": email.split("@")[0]})
        assert res.status_code == 200, res.text
        body = res.json()
        return body["user"]["id"], body["token"]

    def sign_in(self, email: str) -> httpx.Response:
        return self.post("/sign-in/email", {"email": email, "password": PASSWORD})

    def jwt(self, session_token: str) -> str:
        # Few sign-ins: Better Auth allows 3 per 10 s per client and route.
        res = self.get("/token", session_token)
        assert res.status_code == 200, res.text
        token: str = res.json()["token"]
        return token


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def claims(jwt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def part(s: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
        return data
    header, payload, _ = jwt.split(".")
    return part(header), part(payload)


def verify(setup: Setup, token: str) -> httpx.Response:
    """The deployed function's verdict on ``token`` (jose, main's JWKS and issuer)."""
    with setup.p.gateway(setup.fn_host) as gw:
        return gw.get("/", headers=bearer(token))


def sql(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        return conn.execute(query.encode(), params).fetchall()


def email() -> str:
    return f"u-{uuid.uuid4().hex[:8]}@example.com"


def test_sign_up_sign_in_session_and_a_jwt_a_function_verifies(auth_platform: Setup) -> None:
    setup, p, env = auth_platform, auth_platform.p, auth_platform.env
    origin = f"http://{setup.main_id}--auth.fn.localhost:{p.gateway_port}"
    database = urlsplit(setup.main_url).path.lstrip("/")
    assert env["NEON_AUTH_BASE_URL"] == f"{origin}/{database}/auth"
    assert env["NEON_AUTH_JWKS_URL"] == env["NEON_AUTH_BASE_URL"] + "/.well-known/jwks.json"
    auth = Auth(p, env["NEON_AUTH_BASE_URL"])
    alice = email()
    user_id, _ = auth.sign_up(alice)

    signed_in = auth.sign_in(alice)
    assert signed_in.status_code == 200, signed_in.text
    assert "__Secure-neon-auth.session_token=" in signed_in.headers["set-cookie"]
    session = auth.get("/get-session", signed_in.json()["token"])
    assert session.json()["user"]["email"] == alice
    assert auth.sign_in(alice.replace("u-", "nobody-")).status_code == 401

    jwt = auth.jwt(signed_in.json()["token"])
    header, payload = claims(jwt)
    assert payload["sub"] == user_id and payload["iss"] == origin
    keys = auth.get("/.well-known/jwks.json").json()["keys"]
    assert header["kid"] in [k["kid"] for k in keys]
    verdict = verify(setup, jwt)
    assert verdict.status_code == 200, verdict.text
    assert verdict.json() == {"sub": user_id, "email": alice, "iss": origin}
    forged = jwt[:-4] + ("AAAA" if not jwt.endswith("AAAA") else "BBBB")
    assert verify(setup, forged).status_code == 401

    # What @neondatabase/auth's proxy sends (with-realtime-chat's /api/auth/token): the
    # session cookie and the web app's origin, trusted for local development; a foreign
    # origin is refused, and a browser on a trusted one gets CORS with credentials.
    cookie = {"Cookie": signed_in.headers["set-cookie"].split(";")[0]}
    app = {"Origin": "http://localhost:3000"}
    by_cookie = auth.client.get(auth.path + "/token", headers={**cookie, **app})
    assert by_cookie.status_code == 200 and claims(by_cookie.json()["token"])[1]["sub"] == user_id
    foreign = auth.client.post(auth.path + "/sign-out",
                               headers={**cookie, "Origin": "http://evil.example"})
    assert foreign.status_code == 403, foreign.text
    preflight = auth.client.options(auth.path + "/sign-in/email", headers={
        **app, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == app["Origin"]
    assert preflight.headers["access-control-allow-credentials"] == "true"

    # Development mail goes to the branch's log.
    log = p.data_dir / "branches" / setup.main_id / "services" / "auth" / "auth.log"
    assert f'"email":"{alice}","url":"{env["NEON_AUTH_BASE_URL"]}/verify-email?token=' \
        in log.read_text()
    # The tables are the branch's, in neon_auth only.
    tables = sql(setup.main_url, "SELECT table_schema, table_name FROM "
                 "information_schema.tables WHERE table_name IN "
                 "('user', 'session', 'account', 'verification', 'jwks')")
    assert sorted(tables) == [("neon_auth", t) for t in
                              ("account", "jwks", "session", "user", "verification")]
    assert sql(setup.main_url, 'SELECT id FROM neon_auth."user" WHERE email = %s',
               (alice,)) == [(user_id,)]


def test_users_branch_with_the_data_and_each_branch_is_its_own_issuer(
        auth_platform: Setup) -> None:
    setup, p = auth_platform, auth_platform.p
    parent = Auth(p, setup.env["NEON_AUTH_BASE_URL"])
    before = email()
    before_id, _ = parent.sign_up(before)

    name = f"auth-{uuid.uuid4().hex[:6]}"
    child_id = p.cli_json("branches", "create", "--name", name, "--parent", "main")["id"]
    assert services(p, name)["services"] == {"auth": {}}
    child_base = parent.base_url.replace(setup.main_id, child_id)
    child = Auth(p, child_base)
    # The parent's user, password and keys are on the child: it signs in there.
    on_child = child.sign_in(before)
    assert on_child.status_code == 200, on_child.text
    assert on_child.json()["user"]["id"] == before_id
    # A user made on the child is not on the parent.
    later = email()
    _, later_session = child.sign_up(later)
    assert parent.sign_in(later).status_code == 401
    assert sql(setup.main_url, 'SELECT 1 FROM neon_auth."user" WHERE email = %s',
               (later,)) == []

    # Same keys (copied with the data), another issuer: the parent's check refuses it.
    child_jwt = child.jwt(later_session)
    header, payload = claims(child_jwt)
    assert payload["iss"] == child_base.rsplit("/", 2)[0]
    parent_kids = [k["kid"] for k in parent.get("/.well-known/jwks.json").json()["keys"]]
    assert header["kid"] in parent_kids
    refused = verify(setup, child_jwt)
    assert refused.status_code == 401
    assert refused.json()["error"] == "ERR_JWT_CLAIM_VALIDATION_FAILED"

    # A reset brings the child's users back to the parent's.
    p.cli("branches", "reset", name)
    assert child.sign_in(later).status_code == 401
    assert child.sign_in(before).status_code == 200

    # Its server runs as the unprivileged auth user, and goes with the branch.
    [(pid, _)] = processes_mentioning(f"{child_id}--auth")
    ids = {line.split(":")[0]: line.split()[1:] for line in
           Path(f"/proc/{pid}/status").read_text().splitlines()
           if line.startswith(("Uid:", "Gid:"))}
    assert "0" not in ids["Uid"] + ids["Gid"], ids
    p.cli("branches", "delete", name)
    assert processes_mentioning(f"{child_id}--auth") == []


def test_a_bad_config_is_refused_naming_the_field(auth_platform: Setup) -> None:
    p = auth_platform.p
    url = f"http://127.0.0.1:{p.api_port}/api/v1/branches/main/services"
    headers = {"Authorization": f"Bearer {p.credentials['api_key']}"}
    for config, field in (({"trusted_origins": ["ftp://x.example"]},
                           "services.auth.trusted_origins[0]"),
                          ({"trusted_origins": "https://x.example"},
                           "services.auth.trusted_origins"),
                          ({"providers": ["github"]}, "services.auth.providers")):
        res = httpx.put(url, headers=headers, json={"services": {"auth": config}}, timeout=60)
        assert res.status_code == 400, res.text
        assert res.json()["error"]["field"] == field
    # Nothing changed: main still has auth on as before.
    assert services(p, "main")["services"] == {"auth": {}}


def test_a_failed_provision_is_a_503_naming_why_and_leaves_nothing(
        auth_platform: Setup) -> None:
    """The auth server of a branch whose neon_auth tables it cannot use does not start:
    the API says so (503, the service and the database's error) and the branch keeps
    the services it had, with no server left running. ~30 s (a branch create)."""
    p = auth_platform.p
    name = f"authfail-{uuid.uuid4().hex[:6]}"
    branch_id = p.cli_json("branches", "create", "--name", name, "--parent", "main")["id"]
    try:
        services(p, name, {"storage": {"buckets": {"keep": {}}}})
        url = p.cli("connection-string", "--branch", name, "--unpooled").stdout.strip()
        # A settings table of the wrong type: its secret cannot be stored.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE neon_auth.phloem_settings")
            conn.execute("CREATE TABLE neon_auth.phloem_settings "
                         "(name text PRIMARY KEY, value integer)")
        res = httpx.put(f"http://127.0.0.1:{p.api_port}/api/v1/branches/{name}/services",
                        headers={"Authorization": f"Bearer {p.credentials['api_key']}"},
                        json={"services": {"storage": {"buckets": {"keep": {}}}, "ai": {},
                                           "auth": {}}}, timeout=600)
        assert res.status_code == 503, res.text
        error = res.json()["error"]
        assert (error["code"], error["field"]) == ("service_unavailable", "services.auth")
        assert error["message"].startswith(
            f"Neon Auth (auth) could not be provisioned on branch {name!r}: the server "
            "exited with 1 before it listened: error: invalid input syntax for type "
            "integer"), error
        # As it was: the AI Gateway added by the same request is gone again.
        assert services(p, name)["services"] == {"storage": {"buckets": {"keep": {}}}}
        assert processes_mentioning(f"{branch_id}--auth") == []
        directory = p.data_dir / "branches" / branch_id / "services" / "auth"
        assert not (directory / "http.sock").exists()
        assert "invalid input syntax for type integer" in (directory / "auth.log").read_text()
    finally:
        p.cli("branches", "delete", name, check=False)
