"""Builds run as the unprivileged build user in sandboxes: what a function's author
controls at build time (``setup.py`` of an sdist, imports esbuild follows, the artifact's
links) cannot write root-only paths, read the platform's secrets or another function's
files; environments and downloads stay cached between deploys."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from phloem.system.identity import build_uid
from phloem.testing import PlatformProcess, host_of, platform_process, wait_for

APPS = Path(__file__).parent / "apps"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds are sandboxed as root")

#: An sdist whose setup.py reports where it runs and what it can reach, then fails so
#: that pip shows its output in the build log.
PROBE_SETUP = '''
import os, sys
print(f"BUILD-UID={os.getuid()} GID={os.getgid()}", file=sys.stderr)
for path in WRITES:
    try:
        with open(path, "w") as f:
            f.write("pwned")
        print(f"WRITE-OK {path}", file=sys.stderr)
    except OSError as exc:
        print(f"WRITE-REFUSED {path}: {type(exc).__name__}", file=sys.stderr)
for path in READS:
    try:
        if os.path.isdir(path):
            data = " ".join(os.listdir(path))
        else:
            with open(path, errors="replace") as f:
                data = f.read()
        print(f"READ-OK {path}: {data}", file=sys.stderr)
    except OSError as exc:
        print(f"READ-REFUSED {path}: {type(exc).__name__}", file=sys.stderr)
sys.exit(1)
'''


def probe_app(dest: Path, writes: list[Path], reads: list[Path]) -> Path:
    """A Python function whose requirements.txt installs the local sdist ``./probe``."""
    shutil.copytree(APPS / "envprobe", dest)
    (dest / "requirements.txt").write_text("./probe\n")
    (dest / "probe").mkdir()
    (dest / "probe" / "setup.py").write_text(
        f"WRITES = {[str(p) for p in writes]!r}\nREADS = {[str(p) for p in reads]!r}\n"
        + PROBE_SETUP)
    return dest


def latest(platform: PlatformProcess, slug: str) -> dict[str, Any]:
    fn = platform.cli_json("functions", "get", slug)
    with platform.api() as api:
        dep: dict[str, Any] = api.get(
            f"/deployments/{fn['latest_deployment']['id']}").raise_for_status().json()
    return dep


def secret_values(data_dir: Path) -> list[str]:
    system = json.loads((data_dir / "secrets" / "system.json").read_text())
    creds = json.loads((data_dir / "credentials.json").read_text())
    return [system["superuser_password"], creds["api_key"]]


def files_containing(root: Path, needles: list[str]) -> list[Path]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            if any(n.encode() in data for n in needles):
                found.append(path)
    return found


def test_setup_py_runs_as_the_build_user_and_reaches_nothing(platform: PlatformProcess,
                                                             tmp_path: Path) -> None:
    dd = platform.data_dir
    tag = secrets.token_hex(4)
    markers = [Path(f"/etc/phloem-pwned-{tag}"), dd / "secrets" / f"pwned-{tag}",
               dd / f"pwned-{tag}", dd / "envs" / f"pwned-{tag}"]
    good = platform.deploy("sdistpwn", APPS / "envprobe")
    app = probe_app(tmp_path / "app", markers,
                    [dd / "secrets" / "system.json", dd / "credentials.json",
                     dd / "secrets", dd / "deployments"])
    bad = platform.cli("functions", "deploy", "sdistpwn", "--path", str(app), check=False)
    assert bad.returncode != 0
    dep = latest(platform, "sdistpwn")
    assert dep["status"] == "failed"
    log = dep["build_log"]
    uids = re.findall(r"BUILD-UID=(\d+) GID=(\d+)", log)
    build = str(build_uid(platform.isolate_uid_base))
    assert uids and set(uids) == {(build, build)}, log
    assert "WRITE-OK" not in log and "READ-OK" not in log, log
    for marker in markers:
        assert f"WRITE-REFUSED {marker}" in log
        assert not marker.exists(), marker
    assert not any(s in log + dep["error"] for s in secret_values(dd))
    # The previous deployment keeps serving.
    fn = platform.cli_json("functions", "get", "sdistpwn")
    assert fn["deployment_id"] == good["deployment_id"]
    with platform.gateway(host_of(good["invocation_url"])) as gw:
        assert gw.get("/").json()["uid"] != 0


def test_local_package_in_requirements_installs(platform: PlatformProcess,
                                                tmp_path: Path) -> None:
    """Paths in requirements.txt resolve against the function's source (pip works in a
    writable copy of it); the environment is published root-owned and world-readable."""
    app = tmp_path / "app"
    shutil.copytree(APPS / "envprobe", app)
    (app / "localpkg").mkdir()
    (app / "localpkg" / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='localmod', version='1.0', py_modules=['localmod'])\n")
    (app / "localpkg" / "localmod.py").write_text("GREETING = 'from a local sdist'\n")
    (app / "requirements.txt").write_text("./localpkg\n")
    (app / "main.py").write_text((app / "main.py").read_text().replace(
        'body = {"env"', 'import localmod\n        body = {"local": localmod.GREETING, "env"'))
    fn = platform.deploy("localpkg", app)
    assert fn["status"] == "ready", fn
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").json()["local"] == "from a local sdist"
    env = (platform.data_dir / "deployments" / fn["deployment_id"] / "env").resolve()
    assert (env / "site" / "localmod.py").is_file()
    assert not (env / "src").exists()  # pip's working copy of the source is gone
    for path in (env, env / "site", env / "site" / "localmod.py"):
        st = path.stat()
        assert st.st_uid == 0 and st.st_mode & 0o022 == 0, path


def deploy_node_importing(platform: PlatformProcess, slug: str, target: Path,
                          app: Path) -> subprocess.CompletedProcess[str]:
    """Deploy a Node function whose bundle would inline ``target``."""
    app.mkdir()
    (app / "index.mjs").write_text(
        f'import data from {json.dumps(str(target))};\n'
        'export default { fetch: () => Response.json(data) };\n')
    return platform.cli("functions", "deploy", slug, "--path", str(app),
                        "--runtime", "nodejs24", check=False)


@pytest.mark.parametrize("secret", ["secrets/system.json", "credentials.json"])
def test_bundle_cannot_import_platform_secrets(platform: PlatformProcess, tmp_path: Path,
                                               secret: str) -> None:
    dd = platform.data_dir
    target = dd / secret
    proc = deploy_node_importing(platform, "nodesecret", target, tmp_path / "app")
    assert proc.returncode != 0
    assert f'Could not resolve "{target}"' in proc.stderr, proc.stderr
    dep = latest(platform, "nodesecret")
    assert dep["status"] == "failed"
    assert f'Could not resolve "{target}"' in dep["error"]
    wait_for(lambda: not (dd / "deployments" / dep["id"]).exists(), 30,
             "the failed deployment's files to be removed")
    for root in (dd / "deployments", dd / "envs", dd / "cache"):
        assert files_containing(root, secret_values(dd)) == []


def test_a_build_cannot_reach_another_functions_files(platform: PlatformProcess,
                                                      tmp_path: Path) -> None:
    dd = platform.data_dir
    a = platform.deploy("builda", Path(__file__).parent.parent / "examples" / "hello-python")
    a_dir = dd / "deployments" / a["deployment_id"]
    a_files = [a_dir / "app" / "main.py", a_dir / "app", a_dir / "env",
               (a_dir / "env").resolve() / "site"]
    assert all(p.exists() for p in a_files)
    # A Python build (setup.py of B's sdist) ...
    app = probe_app(tmp_path / "b", [a_dir / "app" / "main.py"], a_files)
    proc = platform.cli("functions", "deploy", "buildb", "--path", str(app), check=False)
    assert proc.returncode != 0
    log = latest(platform, "buildb")["build_log"]
    for path in a_files:
        assert f"READ-REFUSED {path}: FileNotFoundError" in log, log
    assert "READ-OK" not in log and "WRITE-OK" not in log
    assert "hello from phloem" in (a_dir / "app" / "main.py").read_text()
    # ... and a Node build (esbuild) see none of them: an import of A's source does not
    # resolve (were the file visible, esbuild would complain about the .py loader).
    proc = deploy_node_importing(platform, "buildbnode", a_dir / "app" / "main.py",
                                 tmp_path / "node")
    assert proc.returncode != 0
    assert f'Could not resolve "{a_dir / "app" / "main.py"}"' in proc.stderr, proc.stderr


def test_redeploys_hit_the_caches_owned_by_the_build_user(platform: PlatformProcess) -> None:
    dd = platform.data_dir
    build = build_uid(platform.isolate_uid_base)
    example = Path(__file__).parent.parent / "examples" / "hello-python"
    for slug, path, cached in [("cachepy", example, "dependencies: cached environment"),
                               ("cachenode", APPS / "node-hono",
                                "dependencies: cached node_modules")]:
        first = platform.deploy(slug, path)
        second = platform.deploy(slug, path)
        assert first["status"] == second["status"] == "ready"
        assert cached in latest(platform, slug)["build_log"]
    for tool in ("pip", "npm"):
        st = (dd / "cache" / tool).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (build, build, 0o700)
    # Published environments are root's: a later build cannot change them.
    for env in [*(dd / "envs" / "python").iterdir(), *(dd / "envs" / "node").iterdir()]:
        assert not env.name.startswith(".tmp-"), env
        assert env.stat().st_uid == 0, env
    sandbox_root = dd / "run" / "sandbox"
    st = sandbox_root.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    assert list(sandbox_root.iterdir()) == []


def _tar(members: list[tuple[str, str | None, bytes]]) -> bytes:
    """A .tar.gz of (name, link target or None, content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, link, content in members:
            info = tarfile.TarInfo(name)
            if link is None:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.type = tarfile.SYMTYPE
                info.linkname = link
                tar.addfile(info)
    return buf.getvalue()


def test_artifact_links_out_of_the_source_are_refused(platform: PlatformProcess) -> None:
    """Each link looks inside the tree on its own; together they lead to the data dir's
    secrets (a lexical check like tarfile's would pass them)."""
    dd = platform.data_dir
    app = (APPS / "envprobe" / "main.py").read_bytes()
    data = _tar([("main.py", None, app), ("x/c", "b/../..", b""), ("x/b", "..", b""),
                 ("requirements.txt", "x/c/../secrets/system.json", b"")])
    sha = hashlib.sha256(data).hexdigest()
    with platform.api() as api:
        api.put(f"/artifacts/{sha}", content=data).raise_for_status()
        dep = api.post("/branches/main/functions/tarlinks/deployments",
                       json={"artifact_sha256": sha, "entry": "main:app"}
                       ).raise_for_status().json()

        def finished() -> dict[str, Any] | None:
            out: dict[str, Any] = api.get(f"/deployments/{dep['id']}").json()
            return out if out["status"] != "building" else None

        done = wait_for(finished, 120, "the deployment to finish")
    assert done["status"] == "failed"
    assert "links outside the source" in done["error"], done["error"]
    assert not any(s in done["error"] + done["build_log"] for s in secret_values(dd))
    wait_for(lambda: not (dd / "deployments" / dep["id"]).exists(), 30,
             "the failed deployment's files to be removed")


def test_without_sandboxes_builds_still_never_run_as_root(tmp_path: Path) -> None:
    """--no-sandbox drops the namespaces, not the build user."""
    with platform_process(["--no-sandbox"]) as p:
        assert p.cli_json("status")["components"]["supervisor"]["sandbox"].startswith("off")
        app = probe_app(tmp_path / "app", [Path(f"/etc/phloem-pwned-{secrets.token_hex(4)}")],
                        [p.data_dir / "secrets" / "system.json"])
        assert p.cli("functions", "deploy", "nosbx", "--path", str(app),
                     check=False).returncode != 0
        log = latest(p, "nosbx")["build_log"]
        build = str(build_uid(p.isolate_uid_base))
        uids = re.findall(r"BUILD-UID=(\d+) GID=(\d+)", log)
        assert uids and set(uids) == {(build, build)}, log
        assert "WRITE-OK" not in log and "READ-OK" not in log, log
