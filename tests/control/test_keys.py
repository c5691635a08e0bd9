"""Scoped API keys on one platform serving its API on loopback and, with ``--tls
self-signed``, on ``--api-listen``: scopes (403 ``forbidden_scope``), branch limits,
expiry and revocation (401), secrets never written to a log, every route declaring its
scope, and the CLI run against the TLS listener through ``phloem login`` with a scoped
key."""

from __future__ import annotations

import json
import os
import re
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from phloem.control.api import create_api
from phloem.control.scopes import SCOPE_FIELD, requirement, undeclared
from phloem.metadata.keys import SCOPES
from phloem.testing import PHLOEM, PlatformProcess, free_port, platform_process, wait_for

HELLO = Path(__file__).parents[2] / "examples" / "hello-python"


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[PlatformProcess, int]]:
    port = free_port()
    with platform_process(["--tls", "self-signed", "--https-port", str(free_port()),
                           "--api-listen", f"127.0.0.1:{port}"]) as p:
        yield p, port


@pytest.fixture(scope="module")
def secrets_made() -> list[str]:
    """Every secret the tests made: none may appear in a log file."""
    return []


def make_key(p: PlatformProcess, made: list[str], **body: Any) -> dict[str, Any]:
    with p.api() as api:
        r = api.post("/keys", json={"name": "test", **body})
    assert r.status_code == 201, r.text
    key: dict[str, Any] = r.json()
    assert key["secret"].startswith("phk_") and key["state"] == "active"
    made.append(key["secret"])
    return key


def as_key(p: PlatformProcess, secret: str) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{p.api_port}", timeout=60,
                        headers={"Authorization": f"Bearer {secret}"})


def error(r: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = r.json()
    return body.get("error", body)  # v2: Neon's shape


def test_every_route_declares_its_scope(remote: tuple[PlatformProcess, int]) -> None:
    p, _ = remote
    services = SimpleNamespace(api_key="k", store=SimpleNamespace(pool=None),
                               settings=SimpleNamespace(metrics_token=None))
    app = create_api(services)  # type: ignore[arg-type]
    table = app.state.route_table
    assert len(table) > 70 and undeclared(table) == []  # Neon's v2 routes included
    doc = httpx.get(f"http://127.0.0.1:{p.api_port}/api/v1/openapi.json").json()
    assert "scopes" in doc["components"]["securitySchemes"]["apiKey"]["description"].lower()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            scope = op.get(SCOPE_FIELD)
            assert scope in (*SCOPES, "public", "key"), (method, path)
            if scope in SCOPES:
                assert op["security"] == [{"apiKey": [scope]}], (method, path)
                assert "403" in op["responses"], (method, path)
            # The guard finds the same declaration for a request to it.
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            need = requirement(table, {"type": "http", "method": method.upper(),
                                       "path": concrete})
            assert need is not None and need.scope == scope, (method, path, need)
    assert doc["paths"]["/api/v1/keys"]["post"][SCOPE_FIELD] == "admin"
    assert doc["paths"]["/api/v1/branches"]["post"][SCOPE_FIELD] == "branches"


def test_read_key_cannot_deploy(remote: tuple[PlatformProcess, int],
                                secrets_made: list[str]) -> None:
    p, _ = remote
    key = make_key(p, secrets_made, scopes=["read"])
    with as_key(p, key["secret"]) as api:
        assert api.get("/api/v1/branches").status_code == 200
        r = api.post("/api/v1/branches/main/functions/x/deployments",
                     json={"artifact_sha256": "0" * 64, "entry": "main:app"})
        assert r.status_code == 403, r.text
        assert error(r)["code"] == "forbidden_scope" and "'deploy'" in error(r)["message"]
        r = api.get("/api/v1/keys")
        assert r.status_code == 403 and "'admin'" in error(r)["message"]
        # Neon's face too, in Neon's error shape.
        r = api.post("/api/v2/projects/p/branches", json={})
        assert r.status_code == 403 and error(r)["code"] == "forbidden_scope"


def test_deploy_key_cannot_create_branches(remote: tuple[PlatformProcess, int],
                                           secrets_made: list[str]) -> None:
    p, _ = remote
    key = make_key(p, secrets_made, scopes=["deploy"])
    with as_key(p, key["secret"]) as api:
        r = api.post("/api/v1/branches", json={"name": "nope"})
        assert r.status_code == 403, r.text
        assert error(r)["code"] == "forbidden_scope" and "'branches'" in error(r)["message"]
        assert api.get("/api/v1/branches/main").status_code == 200  # deploy includes read
        r = api.get("/api/v1/branches/main/connection")
        assert r.status_code == 200  # a password is a deploy key's to have


def test_metrics_key_scrapes_and_does_nothing_else(remote: tuple[PlatformProcess, int],
                                                  secrets_made: list[str]) -> None:
    """A key for scrapers: /metrics over the TLS listener, and 403 elsewhere; read does
    not include metrics (only admin includes every scope)."""
    p, port = remote
    key = make_key(p, secrets_made, scopes=["metrics"])
    ca = ssl.create_default_context(cafile=str(p.data_dir / "tls" / "ca.pem"))
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ca, timeout=60,
                      headers={"Authorization": f"Bearer {key['secret']}"}) as api:
        scraped = api.get("/metrics")
        assert scraped.status_code == 200, scraped.text
        assert "# TYPE phloem_requests_total counter" in scraped.text
        for method, path, body, needed in (
                ("GET", "/api/v1/branches", None, "read"),
                ("GET", "/api/v1/branches/main/functions", None, "read"),
                ("POST", "/api/v1/branches/main/functions/x/deployments",
                 {"artifact_sha256": "0" * 64, "entry": "main:app"}, "deploy")):
            r = api.request(method, path, json=body)
            assert r.status_code == 403, (path, r.text)
            assert error(r)["code"] == "forbidden_scope", r.text
            assert error(r)["message"] == (f"{method} {path} needs an api key with scope "
                                           f"'{needed}' (this key has: metrics)"), r.text
    read = make_key(p, secrets_made, scopes=["read"])
    with as_key(p, read["secret"]) as api:
        r = api.get("/metrics")
        assert r.status_code == 403 and "scope 'metrics'" in error(r)["message"], r.text
        assert "phloem_" not in r.text
        assert api.get("/api/v1/branches").status_code == 200


def test_branch_limited_key_sees_only_its_branches(remote: tuple[PlatformProcess, int],
                                                   secrets_made: list[str]) -> None:
    p, _ = remote
    with p.api() as api:
        r = api.post("/branches", json={"name": "kb"})
        assert r.status_code == 201, r.text
        kb = r.json()
        main = api.get("/branches/main").json()
        r = api.post("/keys", json={"name": "x", "scopes": ["admin"], "branches": ["kb"]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "branches"
    key = make_key(p, secrets_made, scopes=["deploy"], branches=["kb"])
    assert key["branches"] == [kb["id"]]
    with as_key(p, key["secret"]) as api:
        assert [b["name"] for b in api.get("/api/v1/branches").json()] == ["kb"]
        assert api.get("/api/v1/branches/kb/functions").status_code == 200
        assert api.get(f"/api/v1/branches/{kb['id']}/functions").status_code == 200
        for ref in ("main", main["id"]):
            r = api.get(f"/api/v1/branches/{ref}/functions")
            assert r.status_code == 403 and error(r)["code"] == "forbidden_branch", r.text
        r = api.get(f"/api/v2/projects/p/branches/{main['id']}/functions")
        assert r.status_code == 403, r.text
        project = api.get("/api/v2/projects").json()["projects"][0]["id"]  # Neon's face
        listed = api.get(f"/api/v2/projects/{project}/branches").json()["branches"]
        assert [b["id"] for b in listed] == [kb["id"]]
        r = api.get("/api/v1/status")  # platform-wide
        assert r.status_code == 403 and error(r)["code"] == "forbidden_branch"
        assert api.get("/api/v1/keys/me").json()["id"] == key["id"]


def test_expired_and_revoked_keys_get_401(remote: tuple[PlatformProcess, int],
                                          secrets_made: list[str]) -> None:
    p, _ = remote
    short = make_key(p, secrets_made, scopes=["read"], expires_in_s=1)
    revoked = make_key(p, secrets_made, scopes=["read"])
    with as_key(p, revoked["secret"]) as api:
        assert api.get("/api/v1/branches").status_code == 200
    with p.api() as admin:
        r = admin.delete(f"/keys/{revoked['id']}")
        assert r.status_code == 200 and r.json()["state"] == "revoked"
        own = admin.get("/keys/me").json()
        assert own["scopes"] == ["admin"]  # the key made by the first `up`
        assert admin.delete(f"/keys/{own['id']}").status_code == 409
        listed = {k["id"]: k for k in admin.get("/keys").json()}
    assert listed[revoked["id"]]["last_used_at"] is not None
    assert all("secret" not in k for k in listed.values())
    with as_key(p, revoked["secret"]) as api:
        r = api.get("/api/v1/branches")
        assert r.status_code == 401 and "revoked" in error(r)["message"], r.text
    with as_key(p, short["secret"]) as api:
        r = wait_for(lambda: (lambda r: r if r.status_code == 401 else None)(
            api.get("/api/v1/branches")), 15, "the 1 s key to expire")
        assert "expired" in error(r)["message"]


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PHLOEM, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_against_the_tls_listener(remote: tuple[PlatformProcess, int],
                                      secrets_made: list[str], tmp_path: Path) -> None:
    p, port = remote
    read = make_key(p, secrets_made, scopes=["read"])
    # Nothing local to fall back on: the profile is the only way to the platform.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PHLOEM_API", "PHLOEM_PROFILE", "PHLOEM_CA"))}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), PHLOEM_DATA_DIR=str(tmp_path),
               NO_COLOR="1", COLUMNS="200")
    url, ca = f"https://127.0.0.1:{port}", str(p.data_dir / "tls" / "ca.pem")
    refused = run_cli(env, "login", "--api", url, "--key", read["secret"])
    assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    done = run_cli(env, "login", "--api", url, "--key", read["secret"], "--ca-cert", ca,
                   "--profile", "remote")
    assert done.returncode == 0, done.stderr
    assert read["secret"] not in done.stdout + done.stderr
    profiles = tmp_path / "config" / "phloem" / "profiles.json"
    assert stat.S_IMODE(profiles.stat().st_mode) == 0o600
    listed = run_cli(env, "branches", "get", "main", "--output", "json")
    assert listed.returncode == 0 and '"name": "main"' in listed.stdout, listed.stderr
    deploy = run_cli(env, "functions", "deploy", "hello", "--path", str(HELLO),
                     "--entry", "main:app")
    assert deploy.returncode == 1 and "scope 'deploy'" in deploy.stderr, deploy.stderr
    refused = run_cli(env, "keys", "list")
    assert refused.returncode == 1 and "scope 'admin'" in refused.stderr, refused.stderr
    # The variables win over the profile: the admin key through them.
    admin = {**env, "PHLOEM_API_URL": p.credentials["api_url"],
             "PHLOEM_API_KEY": p.credentials["api_key"]}
    made = run_cli(admin, "keys", "create", "--name", "cli", "--scope", "read", "--scope",
                   "deploy", "--branch", "main", "--expires-in", "30d", "--output", "json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    secrets_made.append(created["secret"])
    listed = run_cli(admin, "keys", "list", "--output", "json")
    assert listed.returncode == 0 and created["secret"] not in listed.stdout
    row = next(k for k in json.loads(listed.stdout) if k["id"] == created["id"])
    assert row["scopes"] == ["deploy", "read"] and len(row["branches"]) == 1
    assert row["expires_at"] is not None and "secret" not in row
    out = run_cli(env, "logout")
    assert out.returncode == 0 and "remote" in out.stdout
    gone = run_cli(env, "branches", "list")
    assert gone.returncode == 1 and "no API credentials" in gone.stderr


def test_global_flags_choose_the_platform(remote: tuple[PlatformProcess, int],
                                         secrets_made: list[str], tmp_path: Path) -> None:
    """--api/--key/--profile on the root, before any verb: flags > PHLOEM_API_URL/KEY >
    the profile > the data dir's credentials."""
    p, port = remote
    read = make_key(p, secrets_made, scopes=["read"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PHLOEM_API", "PHLOEM_PROFILE", "PHLOEM_CA"))}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), PHLOEM_DATA_DIR=str(tmp_path),
               NO_COLOR="1", COLUMNS="200")
    helped = run_cli(env, "--help")
    for flag, var in (("--api", "PHLOEM_API_URL"), ("--key", "PHLOEM_API_KEY"),
                      ("--profile", "PHLOEM_PROFILE")):
        assert flag in helped.stdout and var in helped.stdout, helped.stdout
    assert "[default: (the current profile, else none)]" in helped.stdout, helped.stdout
    admin_url, admin_key = p.credentials["api_url"], p.credentials["api_key"]
    # The flags alone reach the platform (no variables, no profile, an empty data dir).
    alone = run_cli(env, "--api", admin_url, "--key", admin_key, "keys", "list",
                    "--output", "json")
    assert alone.returncode == 0, alone.stderr
    assert read["id"] in {k["id"] for k in json.loads(alone.stdout)}
    # A flag wins over its variable: the read key given by --key cannot list keys.
    as_admin = {**env, "PHLOEM_API_URL": admin_url, "PHLOEM_API_KEY": admin_key}
    flagged = run_cli(as_admin, "--key", read["secret"], "keys", "list")
    assert flagged.returncode == 1 and "scope 'admin'" in flagged.stderr, flagged.stderr
    # --profile picks a saved profile; the variables win over it.
    ca = str(p.data_dir / "tls" / "ca.pem")
    saved = run_cli(env, "login", "--api", f"https://127.0.0.1:{port}", "--key",
                    read["secret"], "--ca-cert", ca, "--profile", "reader")
    assert saved.returncode == 0, saved.stderr
    saved = run_cli(env, "login", "--api", admin_url, "--key", admin_key,
                    "--profile", "admin")
    assert saved.returncode == 0, saved.stderr
    assert run_cli(env, "keys", "list").returncode == 0  # the current profile: admin
    chosen = run_cli(env, "--profile", "reader", "keys", "list")
    assert chosen.returncode == 1 and "scope 'admin'" in chosen.stderr, chosen.stderr
    as_reader = {**env, "PHLOEM_API_URL": admin_url, "PHLOEM_API_KEY": read["secret"]}
    over = run_cli(as_reader, "--profile", "admin", "keys", "list")
    assert over.returncode == 1 and "scope 'admin'" in over.stderr, over.stderr
    missing = run_cli(env, "--profile", "nosuch", "branches", "list")
    assert missing.returncode == 1 and "no profile 'nosuch'" in missing.stderr


def test_no_secret_in_any_log(remote: tuple[PlatformProcess, int],
                              secrets_made: list[str]) -> None:
    """Runs last: every secret made above, used, refused and revoked, is in no log file
    of the data dir and not in the platform's output."""
    p, _ = remote
    assert len(secrets_made) >= 6
    logs = [f for f in p.data_dir.rglob("*") if f.is_file() and not f.is_symlink()
            and ("log" in f.name or "logs" in f.parts) and f.stat().st_size < 50 << 20]
    assert logs, "no log file found to check"
    for f in logs:
        data = f.read_bytes()
        for secret in secrets_made:
            assert secret.encode() not in data, f
    output = "\n".join(p.output)
    assert not any(s in output for s in secrets_made)
