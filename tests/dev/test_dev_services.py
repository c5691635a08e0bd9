"""``phloem dev`` and ``env run --forward-services`` reach the branch's services through
local forwarders: a function run by dev (unsandboxed, no /etc/hosts entry) signs S3
requests for its local endpoint and they verify; ``config status`` lists the services and
``config plan`` of a neon.ts without them plans their removal. The AI Gateway (whole and
streamed answers from a local upstream) and Neon Auth (sign-up, sign-in, a JWT verified
against the JWKS) are called by an ``env run`` script and a dev function, on one
platform of this module's own (it needs an AI upstream). A token minted through a local
forwarder is issued by the forwarder's origin, so jose's ``jwtVerify`` with
``issuer: new URL(NEON_AUTH_BASE_URL).origin`` (as with-realtime-chat does) accepts it."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from phloem.testing import PlatformProcess, free_port
from tests.dev.test_dev import dev_server, url_of
from tests.services.ai_upstream import OPERATOR_KEY, Upstream, ai_platform
from tests.services.test_auth import PASSWORD

BUCKETS: dict[str, Any] = {"buckets": {"images": {}}}

APP = '''
import os
import boto3
from botocore.config import Config
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def index(request):
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"],
                      region_name=os.environ["AWS_REGION"],
                      config=Config(s3={"addressing_style": "path"},
                                    retries={"max_attempts": 1}))
    s3.put_object(Bucket="images", Key="dev.txt", Body=b"from dev")
    body = s3.get_object(Bucket="images", Key="dev.txt")["Body"].read().decode()
    return JSONResponse({"endpoint": os.environ["AWS_ENDPOINT_URL_S3"], "body": body})

app = Starlette(routes=[Route("/", index)])
'''

SCRIPT = ("import boto3, os; s3 = boto3.client('s3'); "
          "print(os.environ['AWS_ENDPOINT_URL_S3']); "
          "print(s3.get_object(Bucket='images', Key='dev.txt')['Body'].read().decode())")


def test_dev_and_env_run_reach_the_branch_storage(platform: PlatformProcess,
                                                   tmp_path: Path) -> None:
    root = tmp_path / "svcdev"
    platform.cli("init", str(root))
    (root / "src" / "app.py").write_text(APP)
    branch = f"svc-{uuid.uuid4().hex[:6]}"
    branch_id = platform.cli_json("branches", "create", "--name", branch)["id"]
    try:
        platform.cli("link", "--branch", branch, cwd=root)
        r = platform.api().put(f"/branches/{branch_id}/services",
                               json={"services": {"storage": BUCKETS}})
        assert r.status_code == 200, r.text
        remote = r.json()["urls"]["storage"]

        status = platform.cli_json_in(root, "config", "status")
        assert status["services"] == {"storage": {"config": BUCKETS, "url": remote}}
        assert f"storage              {remote}" in platform.cli("config", "status",
                                                              cwd=root).stdout

        with dev_server(platform, root, free_port()) as lines:
            url = url_of(lines, "api", 60)
            seen = httpx.get(url, timeout=60).json()
            assert seen["endpoint"].startswith("http://127.0.0.1:"), seen
            assert seen["body"] == "from dev"
            assert any(ln.startswith(f"service storage: {seen['endpoint']}")
                       for ln in lines), lines

        out = platform.cli("env", "run", "--forward-services", "--", sys.executable, "-c",
                           SCRIPT, cwd=root).stdout.splitlines()
        assert out[0].startswith("http://127.0.0.1:") and out[1] == "from dev", out

        # A neon.ts that no longer declares buckets plans the service's removal.
        ts = tmp_path / "ts"
        (ts / "src").mkdir(parents=True)
        (ts / "src" / "hello.ts").write_text(
            'export default { fetch: () => new Response("hi") };\n')
        (ts / "neon.ts").write_text(
            'import { defineConfig } from "@neon/config";\nexport default defineConfig('
            '{ functions: { hello: { name: "hello", source: "src/hello.ts" } } });\n')
        platform.cli("link", "--branch", branch, "--no-env-pull", cwd=ts)
        assert platform.cli_json_in(ts, "config", "plan")["services"] == {"storage": "remove"}
    finally:
        platform.cli("branches", "delete", branch, check=False)


# -- the AI Gateway and Neon Auth through the forwarders: one platform for both ---------

#: Calls the branch's services where the environment says (their local forwarders): the
#: AI Gateway's chat completions, whole and streamed, and Neon Auth's sign-up, sign-in,
#: JWT and JWKS. ``env run`` runs it as a script; the dev function below imports it.
SVC = '''
import base64, json, os, sys
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PASSWORD = "@PASSWORD@"


def chat(stream):
    """POST /v1/chat/completions on the AI Gateway: (url, headers, body)."""
    base = os.environ["NEON_AI_GATEWAY_BASE_URL"]
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body.update(stream=True, user="gated")  # the upstream holds its last chunk
    headers = {"Authorization": "Bearer " + os.environ["NEON_AI_GATEWAY_TOKEN"]}
    return base + "/v1/chat/completions", headers, body


def b64(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify(jwt):
    """The claims of ``jwt`` if it verifies against the keys at NEON_AUTH_JWKS_URL."""
    head, payload, signature = jwt.split(".")
    header = json.loads(b64(head))
    keys = httpx.get(os.environ["NEON_AUTH_JWKS_URL"], timeout=30).json()["keys"]
    key = next(k for k in keys if k["kid"] == header["kid"])
    assert header["alg"] == "EdDSA" and key["crv"] == "Ed25519", (header, key)
    Ed25519PublicKey.from_public_bytes(b64(key["x"])).verify(
        b64(signature), (head + "." + payload).encode())
    return json.loads(b64(payload))


def out(**fields):
    print(json.dumps(fields), flush=True)


def main(email):
    url, headers, body = chat(False)
    r = httpx.post(url, headers=headers, json=body, timeout=30)
    out(ai=os.environ["NEON_AI_GATEWAY_BASE_URL"], status=r.status_code,
        whole=r.json()["choices"][0]["message"]["content"])
    url, headers, body = chat(True)
    with httpx.stream("POST", url, headers=headers, json=body, timeout=60) as r:
        events = (line for line in r.iter_lines() if line)
        out(first=next(events))
        out(rest=list(events))
    auth = os.environ["NEON_AUTH_BASE_URL"]
    up = httpx.post(auth + "/sign-up/email", timeout=30, json={
        "email": email, "password": PASSWORD, "name": "local"})
    assert up.status_code == 200, up.text
    r = httpx.post(auth + "/sign-in/email", json={"email": email, "password": PASSWORD},
                   timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.get(auth + "/token", timeout=30,
                  headers={"Authorization": "Bearer " + r.json()["token"]})
    assert r.status_code == 200, r.text
    out(auth=auth, user=up.json()["user"]["id"], jwt=r.json()["token"],
        claims=verify(r.json()["token"]))


if __name__ == "__main__":
    main(sys.argv[1])
'''.replace("@PASSWORD@", PASSWORD)

#: A dev function that relays the AI Gateway's stream and verifies a bearer JWT.
SVC_APP = '''
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import httpx
import svc
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


async def relay(request):
    url, headers, body = svc.chat(True)

    async def lines():
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", url, headers=headers, json=body) as r:
                async for line in r.aiter_lines():
                    if line:
                        yield line + "\\n\\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


async def check(request):
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    try:
        return JSONResponse(svc.verify(token))
    except Exception as exc:
        return JSONResponse({"error": repr(exc)}, status_code=401)


app = Starlette(routes=[Route("/relay", relay), Route("/verify", check)])
'''


@dataclass
class Forwarded:
    p: PlatformProcess
    upstream: Upstream
    root: Path
    branch_id: str


@pytest.fixture(scope="module")
def forwarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forwarded]:
    """A platform with an AI upstream; main has the AI Gateway and Neon Auth on, and a
    Python project linked to it calls them (``src/svc.py``, ``src/app.py``)."""
    root = tmp_path_factory.mktemp("fwd") / "proj"
    with Upstream() as upstream, ai_platform(upstream) as p:
        p.cli("init", str(root))
        (root / "src" / "svc.py").write_text(SVC)
        (root / "src" / "app.py").write_text(SVC_APP)
        r = p.api().put("/branches/main/services",
                        json={"services": {"ai": {}, "auth": {}}})
        assert r.status_code == 200, r.text
        p.cli("link", "--branch", "main", cwd=root)
        yield Forwarded(p, upstream, root, r.json()["branch_id"])


def read_json_line(proc: subprocess.Popen[str]) -> Any:
    """The next line ``proc`` prints, as JSON (its output so far on failure)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        assert proc.stderr is not None
        raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()}")
    return json.loads(line)


def test_env_run_reaches_the_ai_gateway_and_neon_auth(forwarded: Forwarded) -> None:
    """A script run by ``env run --forward-services``: chat completions whole and streamed
    chunk by chunk, and a JWT from Neon Auth that verifies against the JWKS, issued by
    the forwarder's origin (the local NEON_AUTH_BASE_URL's). ~11-17 s (load 10-13)."""
    f, up = forwarded, forwarded.upstream
    up.release.clear()
    up.sent_last.clear()
    before = len(up.received)
    email = f"local-{uuid.uuid4().hex[:8]}@example.com"
    proc = subprocess.Popen(
        [*f.p.cli_args(), "env", "run", "--forward-services", "--", sys.executable,
         "src/svc.py", email], cwd=f.root, env=f.p.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        whole = read_json_line(proc)
        assert whole["ai"].startswith("http://127.0.0.1:"), whole
        assert (whole["status"], whole["whole"]) == (200, "Hello")
        first = read_json_line(proc)["first"]
        # The upstream holds its last chunk until released: the first got here alone,
        # through the gateway and the forwarder.
        assert not up.sent_last.is_set()
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "Hel"
        up.release.set()
        assert read_json_line(proc)["rest"][-1] == "data: [DONE]"
        got = read_json_line(proc)
        assert proc.wait(60) == 0
    finally:
        up.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sent = up.received[before:]
    assert [(s.path, s.body.get("stream")) for s in sent] == [
        ("/v1/chat/completions", None), ("/v1/chat/completions", True)]
    for s in sent:  # the operator's key went upstream, the branch's token did not
        headers = {k.lower(): v for k, v in s.headers.items()}
        assert headers["authorization"] == f"Bearer {OPERATOR_KEY}"
        assert "x-phloem-signed-host" not in headers

    origin = f"http://{f.branch_id}--auth.fn.localhost:{f.p.gateway_port}"
    assert got["auth"].startswith("http://127.0.0.1:") and got["auth"].endswith("/auth")
    claims = got["claims"]
    assert (claims["sub"], claims["email"]) == (got["user"], email)
    # Minted through the forwarder: issued by its origin, as the local base URL says.
    local = "http://" + urlsplit(got["auth"]).netloc
    assert claims["iss"] == claims["aud"] == local != origin
    # The user is the branch's: it signs in at the branch's own origin too.
    with f.p.gateway(f"{f.branch_id}--auth.fn.localhost") as gw:
        r = gw.post(urlsplit(got["auth"]).path + "/sign-in/email",
                    json={"email": email, "password": PASSWORD})
    assert r.status_code == 200 and r.json()["user"]["id"] == got["user"], r.text


def test_a_dev_function_streams_from_the_ai_gateway_and_verifies_a_jwt(
        forwarded: Forwarded) -> None:
    """``phloem dev`` serves src/app.py: it relays a streamed chat completion chunk by
    chunk, and verifies a JWT issued at the branch's own origin (as deployed functions
    get them) against the forwarded JWKS. ~13-16 s."""
    f, up = forwarded, forwarded.upstream
    origin = f"http://{f.branch_id}--auth.fn.localhost:{f.p.gateway_port}"
    env = dict(line.split("=", 1) for line in (f.root / ".env").read_text().splitlines()
               if "=" in line)
    with f.p.gateway(f"{f.branch_id}--auth.fn.localhost") as gw:
        path = urlsplit(env["NEON_AUTH_BASE_URL"]).path
        email = f"dev-{uuid.uuid4().hex[:8]}@example.com"
        r = gw.post(path + "/sign-up/email", json={"email": email, "password": PASSWORD,
                                                   "name": "dev"})
        assert r.status_code == 200, r.text
        jwt = gw.get(path + "/token", headers={
            "Authorization": f"Bearer {r.json()['token']}"}).json()["token"]
    up.release.clear()
    up.sent_last.clear()
    with dev_server(f.p, f.root, free_port()) as lines:
        url = url_of(lines, "api", 60)
        with httpx.stream("GET", url + "relay", timeout=60) as r:
            assert r.status_code == 200
            events = (line for line in r.iter_lines() if line)
            first = next(events)
            assert not up.sent_last.is_set()
            assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "Hel"
            up.release.set()
            assert list(events)[-1] == "data: [DONE]"
        r = httpx.get(url + "verify", headers={"Authorization": f"Bearer {jwt}"},
                      timeout=60)
        assert r.status_code == 200, r.text
        assert (r.json()["email"], r.json()["iss"]) == (email, origin)
        forged = jwt[:-4] + ("AAAA" if not jwt.endswith("AAAA") else "BBBB")
        r = httpx.get(url + "verify", headers={"Authorization": f"Bearer {forged}"},
                      timeout=60)
        assert r.status_code == 401 and "InvalidSignature" in r.text, r.text


#: with-realtime-chat's check, run by ``env run`` with Node and jose: sign in through the
#: forwarder, get a JWT and verify it with ``issuer: new URL(env.auth.baseUrl).origin``;
#: then check the token minted at the branch's origin (argv) against both issuers.
JOSE = """
import { createRemoteJWKSet, jwtVerify } from "jose";
const [email, password, branchJwt, branchOrigin] = process.argv.slice(2);
const base = process.env.NEON_AUTH_BASE_URL;
const jwks = createRemoteJWKSet(new URL(process.env.NEON_AUTH_JWKS_URL));
const issuer = new URL(base).origin;
// Node's fetch sends Sec-Fetch-Mode, so Better Auth wants an Origin, as from a browser.
const r = await fetch(base + "/sign-in/email", { method: "POST", body: JSON.stringify(
  { email, password }), headers: { "content-type": "application/json", origin: issuer } });
if (!r.ok) throw new Error(`sign-in: ${r.status} ${await r.text()}`);
const session = (await r.json()).token;
const t = await fetch(base + "/token", { headers: { authorization: `Bearer ${session}` } });
const { payload } = await jwtVerify((await t.json()).token, jwks, { issuer });
const verdict = (o) => jwtVerify(branchJwt, jwks, o).then(() => "ok", (e) => e.code);
console.log(JSON.stringify({ issuer, iss: payload.iss, aud: payload.aud, email: payload.email,
  branch: await verdict({ issuer: branchOrigin }), branchAsLocal: await verdict({ issuer }) }));
"""


def node_with_jose(p: PlatformProcess, root: Path) -> str:
    """The Node the platform provisioned (the system's where it is Node 24), with jose
    importable from ``root`` (the auth server's own node_modules, linked)."""
    (server,) = (p.data_dir / "runtime" / "auth").glob("server-*/node_modules/jose")
    link = root / "node_modules"
    if not link.exists():
        link.symlink_to(server.parent, target_is_directory=True)
    provisioned = sorted((p.data_dir / "runtime" / "node").glob("node-v*/bin/node"))
    node = str(provisioned[-1]) if provisioned else shutil.which("node")
    assert node is not None
    return node


def test_jose_accepts_a_local_token_with_the_local_base_urls_origin(
        forwarded: Forwarded) -> None:
    """with-realtime-chat's issuer check works in a local loop: a token minted through
    the forwarder verifies with ``new URL(NEON_AUTH_BASE_URL).origin``; one minted at the
    branch's origin keeps it (and fails the local issuer); an X-Phloem-Signed-Host that is
    not a loopback origin, sent straight to the gateway, changes nothing. ~2-3 s."""
    f = forwarded
    origin = f"http://{f.branch_id}--auth.fn.localhost:{f.p.gateway_port}"
    env = dict(line.split("=", 1) for line in (f.root / ".env").read_text().splitlines()
               if "=" in line)
    path = urlsplit(env["NEON_AUTH_BASE_URL"]).path
    email = f"jose-{uuid.uuid4().hex[:8]}@example.com"
    with f.p.gateway(f"{f.branch_id}--auth.fn.localhost") as gw:
        r = gw.post(path + "/sign-up/email", json={"email": email, "password": PASSWORD,
                                                   "name": "jose"})
        assert r.status_code == 200, r.text
        session = {"Authorization": f"Bearer {r.json()['token']}"}
        branch_jwt = gw.get(path + "/token", headers=session).json()["token"]
        for forged in ("evil.example:443", "127.0.0.1.evil.example:80", "127.0.0.1"):
            jwt = gw.get(path + "/token", headers={
                **session, "X-Phloem-Signed-Host": forged}).json()["token"]
            assert claims_of(jwt)["iss"] == origin, forged
    (f.root / "verify.mjs").write_text(JOSE)
    out = f.p.cli("env", "run", "--forward-services", "--",
                  node_with_jose(f.p, f.root), "verify.mjs", email, PASSWORD, branch_jwt,
                  origin, cwd=f.root).stdout
    got = json.loads(out.splitlines()[-1])
    assert got["issuer"].startswith("http://127.0.0.1:"), got
    assert (got["iss"], got["aud"], got["email"]) == (got["issuer"], got["issuer"], email)
    assert got["branch"] == "ok", got
    assert got["branchAsLocal"] == "ERR_JWT_CLAIM_VALIDATION_FAILED", got


def claims_of(jwt: str) -> Any:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
