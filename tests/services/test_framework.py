"""The branch-services framework: host names, the sandbox's view of them, and the API a
project deploy uses to declare a branch's services. Each service's own behaviour is tested
beside it (test_storage.py, test_ai_gateway.py, test_auth.py)."""

from __future__ import annotations

import os
import subprocess
import tempfile

import httpx
import pytest

from phloem import sandbox
from phloem.sandbox import LAUNCHER_ENV, Job, SandboxSpec
from phloem.services.base import ServiceHost, parse_service_host, service_host
from phloem.testing import PlatformProcess

BRANCH = "br-quiet-moon-3f9a2c"


def test_service_hosts_never_collide_with_function_hosts() -> None:
    host = service_host(BRANCH, "storage", "fn.localhost")
    assert host == f"{BRANCH}--storage.fn.localhost"
    assert parse_service_host(host + ":8787", "fn.localhost") == ServiceHost(BRANCH, "storage")
    assert parse_service_host(f"IMG.{host}", "fn.localhost") == ServiceHost(
        BRANCH, "storage", "img")
    for not_a_service in (f"{BRANCH}-storage.fn.localhost",      # a function named storage
                          f"{BRANCH}--mail.fn.localhost",         # no such service
                          f"{BRANCH}--storage.example.com",       # another domain
                          "[::1]:8787", f"{BRANCH}--storage.fn.localhostx"):
        assert parse_service_host(not_a_service, "fn.localhost") is None, not_a_service


@pytest.mark.skipif(os.geteuid() != 0 or sandbox.available() is not None,
                    reason=f"sandboxes need root: {sandbox.available()}")
def test_sandbox_resolves_its_branch_service_names() -> None:
    name = service_host(BRANCH, "ai", "fn.localhost")
    with tempfile.TemporaryDirectory() as root:
        os.chmod(root, 0o700)
        job = Job(argv=["/usr/bin/getent", "hosts", name], env={}, cwd="/", uid=65534,
                  gid=65534, sandbox=SandboxSpec(root_dir=root, tmp_mb=1,
                                                 hosts={name: "127.0.0.1"}))
        argv, fd = job.launcher()
        try:
            proc = subprocess.run(argv, pass_fds=(fd,), env=LAUNCHER_ENV, cwd="/",
                                  capture_output=True, text=True, timeout=60, check=False)
        finally:
            os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["127.0.0.1", name]
    # The host's own resolver does not know the name: only the sandbox has it.
    outside = subprocess.run(["getent", "hosts", name], capture_output=True, check=False)
    assert outside.returncode != 0


def test_branch_services_api_declares_and_refuses_by_name(platform: PlatformProcess) -> None:
    api = f"http://127.0.0.1:{platform.api_port}/api/v1/branches/main/services"
    headers = {"Authorization": f"Bearer {platform.credentials['api_key']}"}
    listed = httpx.get(api, headers=headers, timeout=30)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["branch_id"].startswith("br-")
    assert set(body["available"]) <= {"auth", "ai", "storage"}
    unknown = httpx.put(api, headers=headers, json={"services": {"mail": {}}}, timeout=30)
    assert unknown.status_code == 400, unknown.text
    error = unknown.json()["error"]
    assert error["field"] == "services" and "'mail'" in error["message"]
    unchanged = httpx.put(api, headers=headers, json={"services": body["services"]},
                          timeout=30)
    assert unchanged.status_code == 200 and unchanged.json()["changed"] is False
    wrong_shape = httpx.put(api, headers=headers, json={"services": ["storage"]}, timeout=30)
    assert wrong_shape.status_code == 400
    # What env pull merges: nothing while the branch has no services.
    env = httpx.get(f"{api}/env", headers=headers, timeout=30)
    assert env.status_code == 200 and env.json() == {"env": {}, "hosts": []}
    assert httpx.get(f"{api}/env", timeout=30).status_code == 401


@pytest.mark.skipif(os.geteuid() != 0 or sandbox.available() is not None,
                    reason=f"sandboxes need root: {sandbox.available()}")
def test_sandbox_shows_a_path_under_var_tmp() -> None:
    """A data dir under /var/tmp is visible inside (/var/tmp was a link to the sandbox's
    /tmp, followed to the host's /tmp while mountpoints were made), and /var/tmp is still
    the sandbox's /tmp. ~1 s."""
    with tempfile.TemporaryDirectory() as root, \
            tempfile.TemporaryDirectory(dir="/var/tmp") as shown:
        os.chmod(root, 0o700)
        os.chmod(shown, 0o755)
        with open(os.path.join(shown, "f"), "w") as f:
            f.write("seen")
        script = f"cat {shown}/f; echo x > /tmp/t; cat /var/tmp/t"
        job = Job(argv=["/bin/sh", "-c", script], env={}, cwd=shown, uid=65534, gid=65534,
                  sandbox=SandboxSpec(root_dir=root, tmp_mb=1, ro=[shown]))
        argv, fd = job.launcher()
        try:
            proc = subprocess.run(argv, pass_fds=(fd,), env=LAUNCHER_ENV, cwd="/",
                                  capture_output=True, text=True, timeout=60, check=False)
        finally:
            os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "seenx\n"
    assert not os.path.exists("/tmp" + shown)  # nothing made on the host's /tmp
