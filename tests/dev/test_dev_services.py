"""``phloem dev`` and ``env run --forward-services`` reach the branch's services through
local forwarders: a function run by dev (unsandboxed, no /etc/hosts entry) signs S3
requests for its local endpoint and they verify; ``config status`` lists the services and
``config plan`` of a neon.ts without them plans their removal."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import httpx

from phloem.testing import PlatformProcess, free_port
from tests.dev.test_dev import dev_server, url_of

BUCKETS = {"buckets": {"images": {}}}

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
