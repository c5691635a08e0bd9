"""Python isolates forked from the zygote: identity, environment, limits, signals and exits
as a spawned isolate would have them, secrets kept out of the zygote, a fresh interpreter
when the function needs one, and the zygote's own failure and death.

Most cases use the shared platform; the destructive ones (killing the zygote, SIGKILLing
the platform) get their own."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phloem.runtimes.base import find_isolate_python
from phloem.runtimes.python import environment as pyenv
from phloem.runtimes.python.zygote_spawner import ZygoteSpawner, ZygoteStart
from phloem.supervisor import IsolateSpec, Supervisor
from phloem.supervisor.cgroups.watchdog import WatchdogLimiter
from phloem.system.identity import Identity
from phloem.testing import PlatformProcess, host_of, platform_process, wait_for

ZYGOTE_MODULE = "phloem.runtimes.python.zygote"

PROBE = '''
import asyncio, json, os, sys

def _open_fds():
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # listdir's own descriptor, closed by now
        found[int(name)] = target.split(":")[0]
    return found

# Before uvicorn opens anything: exactly what the isolate was given.
FDS_AT_IMPORT = _open_fds()
_hoard = []
print("probe: imported", flush=True)

def _status():
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                print("probe: lifespan shutdown", flush=True)
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
    if scope["path"] == "/alloc":
        for _ in range(int(query.get("mb", "10"))):
            _hoard.append(os.urandom(2**20))
        body = {"holding_mb": len(_hoard)}
    elif scope["path"] == "/slow":
        await asyncio.sleep(float(query.get("s", "1")))
        body = {"pid": os.getpid()}
    else:
        status = _status()
        try:
            import zoneinfo
            zoneinfo_mark = getattr(zoneinfo, "MARK", None)
        except ImportError:
            zoneinfo_mark = None
        parent = ""
        if os.getppid():  # 0 in a sandbox: the first process of its own PID namespace
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                parent = f.read().replace(b"\\0", b" ").decode()
        with open("/proc/self/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\\0", b" ").decode()
        body = {
            "pid": os.getpid(), "ppid": os.getppid(), "parent": parent, "cmdline": cmdline,
            "uid": os.getresuid(), "gid": os.getresgid(), "groups": os.getgroups(),
            "caps": [status["CapPrm"], status["CapEff"]], "cwd": os.getcwd(),
            "path": sys.path, "env": dict(os.environ), "fds": FDS_AT_IMPORT,
            "proc_owner": os.stat("/proc/self/environ").st_uid,
            "hash_randomization": sys.flags.hash_randomization,
            "zoneinfo_mark": zoneinfo_mark, "argv": sys.argv,
        }
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})
'''


def write_probe(directory: Path, extra: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "main.py").write_text(PROBE)
    for name, text in (extra or {}).items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture(scope="module")
def probe_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="phloem-probe-"))
    try:
        yield write_probe(path / "probe")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def deploy(p: PlatformProcess, slug: str, path: Path, *args: str) -> dict[str, Any]:
    fn = p.deploy(slug, path, *args)
    assert fn["status"] == "ready", fn
    return dict(fn)


def info(p: PlatformProcess, fn: dict[str, Any], outside: bool = True) -> dict[str, Any]:
    with p.gateway(host_of(fn["invocation_url"])) as gw:
        resp = gw.get("/info")
        assert resp.status_code == 200, resp.text
        probe = dict(resp.json())
    if probe["pid"] == 1 and outside:
        # Sandboxed: the isolate sees its own PID namespace; read its ids from outside.
        probe["ns_pid"] = 1
        [probe["pid"]] = [i["pid"] for i in isolates(p, fn["slug"])]
        probe["ppid"] = ppid_of(probe["pid"])
        probe["parent"] = Path(f"/proc/{probe['ppid']}/cmdline").read_bytes().decode()
    return probe


def isolates(p: PlatformProcess, slug: str) -> list[dict[str, Any]]:
    return [i for i in p.cli_json("status")["isolates"] if i["function"] == slug]


def logs(p: PlatformProcess, slug: str) -> str:
    return p.cli("functions", "logs", slug, "--lines", "1000").stdout


def ppid_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


def zygotes_of(p: PlatformProcess) -> list[int]:
    """Zygote processes of this platform: its children running the zygote module."""
    assert p.proc is not None
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
            if ZYGOTE_MODULE.encode() in cmd and ppid_of(int(name)) == p.proc.pid:
                found.append(int(name))
        except (OSError, IndexError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except OSError:
        return False
    return state != "Z"


def assert_forked(p: PlatformProcess, probe: dict[str, Any]) -> None:
    assert probe["ppid"] in zygotes_of(p), probe["parent"]


# -- through the shared platform -------------------------------------------------------------

def test_forked_isolate_has_function_identity_env_cwd_path(
        platform: PlatformProcess, probe_dir: Path) -> None:
    fn = deploy(platform, "zyprobe", probe_dir, "--env", "GREETING=hello-zygote")
    probe = info(platform, fn)
    assert_forked(platform, probe)
    assert "(forked from the zygote)" in logs(platform, "zyprobe")
    assert "probe: imported" in logs(platform, "zyprobe")  # stdout reaches the logs

    uid = probe["uid"][0]
    if os.geteuid() == 0:
        assert uid >= 1_500_000
        assert probe["uid"] == [uid] * 3 and probe["gid"] == [uid] * 3
        assert probe["groups"] == []
        assert probe["caps"] == ["0000000000000000"] * 2
        # Dumpable again, as after exec: /proc/self is the function's, not root's.
        assert probe["proc_owner"] == uid
    cwd = Path(probe["cwd"])
    assert cwd.name == "app" and cwd.parent.name == fn["deployment_id"]
    if os.geteuid() == 0:
        assert cwd.stat().st_gid == probe["gid"][0]  # the code only this function can read

    env = probe["env"]
    assert env["GREETING"] == "hello-zygote"
    assert env["PHLOEM_DEPLOYMENT"] == fn["deployment_id"]
    assert env["DATABASE_URL"].startswith("postgres")
    if probe.get("ns_pid") == 1:
        # PR_SET_PDEATHSIG ties it to the zygote; no pid of the platform is in its view.
        assert "PHLOEM_SUPERVISOR_PID" not in env
    else:
        assert env["PHLOEM_SUPERVISOR_PID"] == str(probe["ppid"])
    entries = env["PYTHONPATH"].split(os.pathsep)
    assert entries[0] == str(cwd)
    # As a spawned `python -m` host: cwd (twice: -m and the host), then PYTHONPATH.
    assert probe["path"][:len(entries) + 2] == [str(cwd), str(cwd), *entries]
    assert probe["argv"][1:3] == ["--app", "main:app"]
    # Nothing of the zygote's is open: stdio, the listening socket and the status pipe.
    assert sorted(probe["fds"].values()) == ["/dev/null", "pipe", "pipe", "pipe", "socket"]

    other = deploy(platform, "zyprobe2", probe_dir)
    if os.geteuid() == 0:
        assert info(platform, other)["uid"][0] not in (0, uid)

    # The zygote: single-threaded (fork is safe) and without any function's env.
    zygote = probe["ppid"]
    assert os.listdir(f"/proc/{zygote}/task") == [str(zygote)]
    assert b"DATABASE_URL" not in Path(f"/proc/{zygote}/environ").read_bytes()


def test_memory_limit_kills_forked_isolate(platform: PlatformProcess, probe_dir: Path) -> None:
    fn = deploy(platform, "zyhungry", probe_dir, "--limit", "memory_mb=120")
    probe = info(platform, fn)
    assert_forked(platform, probe)
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/alloc", params={"mb": "20"}).status_code == 200
        assert gw.get("/alloc", params={"mb": "400"}).status_code == 502
        after = gw.get("/info")
        assert after.status_code == 200, logs(platform, "zyhungry")
        assert after.json()["pid"] != probe["pid"]
    assert "memory limit of 120 MiB exceeded" in logs(platform, "zyhungry")


def test_sigint_runs_lifespan_shutdown(platform: PlatformProcess, probe_dir: Path) -> None:
    fn = deploy(platform, "zyidle", probe_dir, "--limit", "idle_timeout_s=1")
    # (Its isolate may be evicted before `phloem status` could name its parent.)
    info(platform, fn, outside=False)
    assert "(forked from the zygote)" in logs(platform, "zyidle")
    wait_for(lambda: isolates(platform, "zyidle") == [], 30, "the idle isolate to go")
    text = logs(platform, "zyidle")
    assert "evicting (SIGINT)" in text
    assert "probe: lifespan shutdown" in text
    assert "exited with code -9" not in text


def test_kill_9_is_noticed_at_once(platform: PlatformProcess, probe_dir: Path) -> None:
    fn = deploy(platform, "zykilled", probe_dir)
    probe = info(platform, fn)
    assert_forked(platform, probe)
    host = host_of(fn["invocation_url"])
    curl = subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {host}",
         f"http://127.0.0.1:{platform.gateway_port}/slow?s=30"],
        stdout=subprocess.PIPE, text=True)
    wait_for(lambda: isolates(platform, "zykilled")[0]["inflight"] == 1, 10,
             "the request to be in flight")
    killed = time.monotonic()
    os.kill(probe["pid"], signal.SIGKILL)
    out, _ = curl.communicate(timeout=10)
    assert out == "502"
    assert time.monotonic() - killed < 1.0
    # The supervisor saw the exit (pidfd) and got its status from the zygote.
    wait_for(lambda: "exited with code -9" in logs(platform, "zykilled"), 5,
             "the exit to be logged")
    assert isolates(platform, "zykilled") == []
    assert info(platform, fn)["pid"] != probe["pid"]


def test_fresh_interpreter_when_the_function_needs_one(
        platform: PlatformProcess, tmp_path: Path) -> None:
    # The app brings its own module under a name the zygote has loaded...
    shadow = write_probe(tmp_path / "shadow", {"zoneinfo.py": "MARK = 'the app'\n"})
    fn = deploy(platform, "zyshadow", shadow)
    probe = info(platform, fn)
    assert probe["zoneinfo_mark"] == "the app"
    assert "phloem.runtimes.python.host" in probe["cmdline"]
    assert probe["uid"][0] != 0
    text = logs(platform, "zyshadow")
    assert "zoneinfo" in text and "needs a fresh interpreter" in text
    # ... or sets an interpreter option only a fresh start honours.
    seed = write_probe(tmp_path / "seed")
    fn = deploy(platform, "zyseed", seed, "--env", "PYTHONHASHSEED=0")
    probe = info(platform, fn)
    assert probe["hash_randomization"] == 0
    assert "PYTHONHASHSEED='0' needs a fresh interpreter" in logs(platform, "zyseed")


# -- a platform of their own ------------------------------------------------------------------

def test_zygote_death_and_platform_death(probe_dir: Path) -> None:
    with platform_process() as p:
        [zygote] = wait_for(lambda: zygotes_of(p), 30, "the zygote")
        fn = deploy(p, "zycrash", probe_dir)
        first = info(p, fn)
        assert first["ppid"] == zygote

        # The zygote dies: its isolates die with it, the exit is still noticed, requests
        # are served (spawned directly until a new zygote is up), and a new one starts.
        os.kill(zygote, signal.SIGKILL)
        wait_for(lambda: not alive(first["pid"]), 5, "the isolate to die with the zygote")
        wait_for(lambda: isolates(p, "zycrash") == [], 5, "the exit to be noticed")
        assert "the zygote is gone" in logs(p, "zycrash")
        assert info(p, fn)["pid"] != first["pid"]
        [again] = wait_for(lambda: [z for z in zygotes_of(p) if z != zygote], 30,
                           "a new zygote")
        later = deploy(p, "zycrash2", probe_dir)
        last = info(p, later)
        assert last["ppid"] == again

        # The platform is SIGKILLed: the zygote and every isolate go too.
        assert p.proc is not None
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait()
        for pid in (again, last["pid"]):
            wait_for(lambda pid=pid: not alive(pid), 10, f"process {pid} to die")
        # Start again (it stops the databases the killed one left) so they are stopped.
        p.launch()
        p.wait_ready()


# -- the spawner on its own ---------------------------------------------------------------------

def _scratch() -> Path:
    root = Path(tempfile.mkdtemp(prefix="phloem-zygote-", dir="/tmp"))
    os.chmod(root, 0o711)
    return root


def _spec(root: Path, runtime: Path, python: str, ident: Identity, env: dict[str, str],
          limits_mb: int = 512) -> IsolateSpec:
    from phloem.system.limits import FunctionLimits

    app = write_probe(root / "app")
    os.chmod(root / "app", 0o755)
    home = root / "home"
    home.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(home, ident.uid, ident.gid)
    return IsolateSpec(
        deployment_id="dep-" + secrets.token_hex(3), function_id="fn", slug="unit",
        branch_id="br", command=[python, "-m", "phloem.runtimes.python.host", "--app",
                                 "main:app"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
             "PYTHONPATH": f"{app}{os.pathsep}{runtime}", "PYTHONUNBUFFERED": "1",
             "PYTHONDONTWRITEBYTECODE": "1", **env},
        cwd=app, identity=ident, log_path=root / "log",
        limits=FunctionLimits().merged({"memory_mb": limits_mb}),
        start=ZygoteStart(python, str(runtime), "main:app", (str(app), str(runtime))))


async def _get(supervisor: Supervisor, spec: IsolateSpec, path: str) -> tuple[int, bytes]:
    lease = await supervisor.acquire(spec)
    try:
        lease.writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await lease.writer.drain()
        head = await lease.reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        body = await lease.reader.read(2**20) if status == 200 else b""
        return status, body
    except (asyncio.IncompleteReadError, ConnectionError):
        return 502, b""
    finally:
        lease.release(reusable=False)


def _zygote_memory_contains(pid: int, needle: bytes) -> bool:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="isolates run as their own uid only as root")
async def test_secrets_stay_out_of_zygote_and_watchdog_limits_children() -> None:
    root = _scratch()
    runtime = await asyncio.to_thread(pyenv.ensure_runtime, root / "runtime")
    python = find_isolate_python(None, True)
    spawner = ZygoteSpawner()
    assert await spawner.prestart(python, runtime)
    lines: list[str] = []
    # The RSS watchdog (the limiter without cgroups) polls the forked child's pid.
    supervisor = Supervisor(root / "sockets", lambda spec: lambda i, s, line: lines.append(
        line), memory=WatchdogLimiter(), spawner=spawner)
    await supervisor.start()
    token = "s3cret-" + secrets.token_hex(16)
    try:
        spec = _spec(root, runtime, python, Identity.isolate(1_500_000, 4242),
                     {"API_TOKEN": token}, limits_mb=120)
        status, body = await _get(supervisor, spec, "/info")
        assert status == 200 and token.encode() in body
        [client] = spawner.zygotes.values()
        assert client.pid is not None
        assert not _zygote_memory_contains(client.pid, token.encode())
        assert (await _get(supervisor, spec, "/alloc?mb=400"))[0] == 502
        for _ in range(100):
            if any("memory limit of 120 MiB exceeded (RSS watchdog)" in line
                   for line in lines):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(lines)
        assert any("forked from the zygote" in line for line in lines)
    finally:
        await supervisor.stop_all()
        await spawner.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_spawner_falls_back_when_the_zygote_is_down() -> None:
    root = _scratch()
    runtime = await asyncio.to_thread(pyenv.ensure_runtime, root / "runtime")
    python = find_isolate_python(None, os.geteuid() == 0)
    spawner = ZygoteSpawner(retry_s=3600)  # no restart within the test
    assert not await spawner.prestart("/nonexistent/python3", runtime)
    assert await spawner.prestart(python, runtime)
    lines: list[str] = []
    supervisor = Supervisor(root / "sockets", lambda spec: lambda i, s, line: lines.append(
        line), spawner=spawner)
    try:
        ident = Identity.isolate(1_500_000, 4243)
        spec = _spec(root, runtime, python, ident, {})
        assert (await _get(supervisor, spec, "/info"))[0] == 200
        assert any("(forked from the zygote)" in line for line in lines), lines
        [client] = [z for z in spawner.zygotes.values() if z.alive]
        assert client.pid is not None
        os.kill(client.pid, signal.SIGKILL)
        await asyncio.wait_for(supervisor.retire(spec.deployment_id), 10)
        assert not client.alive
        lines.clear()
        spec = dataclasses.replace(spec, deployment_id="dep-after")
        assert (await _get(supervisor, spec, "/info"))[0] == 200
        assert any("(spawned)" in line for line in lines), lines
    finally:
        await supervisor.stop_all()
        await spawner.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_the_zygote_is_chosen_by_the_start_plan_never_by_the_env() -> None:
    """A function's env used to pick the zygote: the last entry of its PYTHONPATH was
    taken for the runtime directory, so ``--env PYTHONPATH=...:<a dir of the function's
    code>`` made the platform start a zygote as root with that directory as its working
    directory and path, importing a ``phloem`` package planted there as root. Now the
    Python runtime's start plan names the zygote; the env only reaches the isolate."""
    root = _scratch()
    runtime = await asyncio.to_thread(pyenv.ensure_runtime, root / "runtime")
    python = find_isolate_python(None, os.geteuid() == 0)
    planted = root / "planted"
    marker = root / "planted-ran"
    (planted / "phloem").mkdir(parents=True)
    (planted / "phloem" / "__init__.py").write_text(
        f"import os\nopen({str(marker)!r}, 'w').write(str(os.getuid()))\n")
    spawner = ZygoteSpawner(retry_s=3600)
    assert await spawner.prestart(python, runtime)
    lines: list[str] = []
    supervisor = Supervisor(root / "sockets", lambda spec: lambda i, s, line: lines.append(
        line), spawner=spawner)
    try:
        spec = _spec(root, runtime, python, Identity.isolate(1_500_000, 4244),
                     {"PYTHONPATH": f"{root / 'app'}{os.pathsep}{runtime}{os.pathsep}"
                                    f"{planted}"})
        status, _ = await _get(supervisor, spec, "/info")
        assert status == 200, lines
        assert any("(forked from the zygote)" in line for line in lines), lines
        # Only the zygote of the plan exists; none was started for the planted directory.
        assert spawner.keys() == {(python, str(runtime))}
        assert not marker.exists()
    finally:
        await supervisor.stop_all()
        await spawner.stop()
        shutil.rmtree(root, ignore_errors=True)
