"""Start real platforms for tests and benchmarks: ``phloem up`` as a subprocess, as a
user runs it, on free ports and a fresh data dir; or in the test's own event loop through
the same entry point (``Platform.serve``).

    with platform_process() as p:
        p.cli("functions", "list")
        p.gateway(host).get("/")

    async with running_platform(settings) as platform:
        platform.running.gateway.port
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg

if TYPE_CHECKING:
    from phloem.server.platform import Platform
    from phloem.server.running import Running
    from phloem.system.settings import Settings

REPO = Path(__file__).resolve().parent.parent.parent
PHLOEM = str(Path(sys.executable).parent / "phloem")
EXAMPLE = REPO / "examples" / "hello-python"


def _worker_share(low: int, high: int, step: int = 1) -> tuple[int, int]:
    """The part of ``range(low, high)`` this pytest-xdist worker draws from: workers of
    one run never pick the same port or uid range at the same moment (outside xdist, the
    whole range)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count <= 1:
        return low, high
    index = int(worker[2:]) % count
    width = (high - low) // count // step * step
    return low + index * width, low + (index + 1) * width


_handed_out: set[int] = set()


def free_port() -> int:
    """A port that is free now, below the kernel's ephemeral range: a port the kernel
    handed out (bind to 0) can be taken by any client socket's local end before our
    server binds it, which failed CI runs with "already in use"."""
    low, high = _worker_share(10000, 20000)
    for _ in range(200):
        port = random.randrange(low, high)
        # A port handed out before may still be unbound (a test picks several, then
        # starts the processes that bind them): never hand it out twice.
        if port in _handed_out:
            continue
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port in 10000-19999")


def db_port_base() -> int:
    """A base for branch ports below the kernel's ephemeral range (where client sockets
    take their local ports, which would race with ours), spread so that platforms in one
    test run rarely meet."""
    low, high = _worker_share(20000, 30000, 50)
    return random.randrange(low, high, 50)


def pick_isolate_uid_base() -> int:
    """A uid base no other platform's network rules confine now: platforms sharing
    isolate uids would refuse each other's isolates their databases (test runs of several
    people share a machine). Random among ~2000 slots, skipping those of live tables."""
    from phloem.firewall import ConfinedUids, FirewallError, find_nft
    from phloem.firewall.nftables import installed_tables

    taken: list[ConfinedUids] = []
    nft = find_nft()
    if os.geteuid() == 0 and nft is not None:
        with suppress(FirewallError):
            taken = [ConfinedUids.for_base(t.uid_base) for t in installed_tables(nft)
                     if t.uid_base is not None]
    slots = list(range(*_worker_share(1, 2000)))
    random.shuffle(slots)
    for slot in slots:
        base = 1_500_000 + slot * 2**21
        mine = ConfinedUids.for_base(base)
        if all(mine.last < t.first or t.last < mine.first for t in taken):
            return base
    raise AssertionError("no free isolate uid range left for a test platform")


def new_data_dir() -> Path:
    """A data dir the service user and isolates can traverse (pytest's tmp_path is under
    a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="phloem-test-", dir="/tmp"))
    os.chmod(path, 0o711)
    return path


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


async def wait_for_async(predicate: Any, timeout: float, what: str,
                         interval: float = 0.01) -> Any:
    """:func:`wait_for` for a test whose platform serves in its own loop: polls without
    blocking the loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of live processes whose command line or environment mentions
    ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if state == "Z":
            continue
        if text in cmd or text in env:
            found.append((int(pid), cmd))
    return found


@dataclass
class PlatformProcess:
    data_dir: Path
    api_port: int
    gateway_port: int
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    #: Kept across relaunches: files of the data dir belong to these uids.
    isolate_uid_base: int = field(default_factory=pick_isolate_uid_base)
    #: Given to ``phloem up`` as PHLOEM_METRICS_TOKEN: it may scrape /metrics.
    metrics_token: str = field(default_factory=lambda: "mt-" + secrets.token_urlsafe(24))
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def env(self) -> dict[str, str]:
        # The CLI evaluates neon.ts with the esbuild the platform provisions anyway.
        return {**os.environ, "PHLOEM_DATA_DIR": str(self.data_dir), "NO_COLOR": "1",
                "COLUMNS": "200", "TERM": "dumb",
                "PHLOEM_NODE_TOOLS": str(self.data_dir / "runtime" / "node"),
                "PHLOEM_METRICS_TOKEN": self.metrics_token}

    def args(self) -> list[str]:
        return [PHLOEM, "up", "--api-port", str(self.api_port), "--gateway-port",
                str(self.gateway_port), "--pg-port-base", str(db_port_base()),
                "--grace", "5", "--isolate-uid-base", str(self.isolate_uid_base)]

    def launch(self, extra: list[str] | None = None) -> None:
        # A new event and list per process: the reader of a previous (stopped) process
        # may still be at its EOF, and must not mark this one ready.
        ready = self._ready = threading.Event()
        output: list[str] = []
        self.output = output
        self.proc = subprocess.Popen(
            self.args() + (extra or []), env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        )
        threading.Thread(target=self._read, args=(self.proc, ready, output),
                         daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen[str], ready: threading.Event,
              output: list[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line.rstrip("\n"))
            if line.startswith("ready."):
                ready.set()
        ready.set()

    def wait_ready(self, timeout: float = 180) -> None:
        # The reader also wakes us at EOF, a moment before the exited process can be
        # reaped: only a printed "ready." line counts.
        if (not self._ready.wait(timeout) or not self.running
                or not any(line.startswith("ready.") for line in self.output)):
            raise AssertionError("phloem up did not become ready:\n" + "\n".join(self.output))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 120) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("phloem up did not stop after SIGINT:\n"
                                 + "\n".join(self.output)) from None

    @property
    def credentials(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.data_dir / "credentials.json").read_text())
        return data

    def api(self) -> httpx.Client:
        creds = self.credentials
        return httpx.Client(base_url=creds["api_url"] + "/api/v1", timeout=60,
                            headers={"Authorization": f"Bearer {creds['api_key']}"})

    def system_db(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A superuser connection to the running platform's system database (as root)."""
        secret = json.loads((self.data_dir / "secrets" / "system.json").read_text())
        return psycopg.connect(host=str(self.data_dir / "run" / "pg" / "system"), port=5432,
                               user="postgres", password=secret["superuser_password"],
                               dbname="phloem", autocommit=True)

    def metrics(self, token: str | None = None) -> httpx.Response:
        """GET /metrics with ``token`` as the bearer (default: the API key)."""
        token = self.credentials["api_key"] if token is None else token
        return httpx.get(f"http://127.0.0.1:{self.api_port}/metrics", timeout=60,
                         headers={"Authorization": f"Bearer {token}"} if token else {})

    def cli_args(self) -> list[str]:
        return [PHLOEM]

    def cli(self, *args: str, check: bool = True, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([PHLOEM, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"phloem {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--output", "json").stdout)

    def cli_json_in(self, cwd: Path, *args: str) -> Any:
        return json.loads(self.cli(*args, "--output", "json", cwd=cwd).stdout)

    def gateway(self, host: str, timeout: float = 120) -> httpx.Client:
        """A client that connects to the gateway on 127.0.0.1 and sends ``host``: glibc
        does not resolve *.localhost."""
        return httpx.Client(base_url=f"http://127.0.0.1:{self.gateway_port}",
                            headers={"Host": host}, timeout=timeout)

    def deploy(self, slug: str, path: Path, *extra: str, branch: str = "main") -> Any:
        return self.cli_json("functions", "deploy", slug, "--path", str(path),
                             "--branch", branch, *extra)

    def cleanup(self) -> None:
        from phloem.server.leftovers import stop_processes

        try:
            if self.running:
                self.stop()
        finally:
            # Whatever a platform that failed to start or stop left (its databases end
            # with it, but only once their shutdown is done) goes before its files.
            stop_processes(self.data_dir)
            shutil.rmtree(self.data_dir, ignore_errors=True)


@contextmanager
def platform_process(extra: list[str] | None = None) -> Iterator[PlatformProcess]:
    p = PlatformProcess(new_data_dir(), free_port(), free_port())
    p.launch(extra)
    try:
        p.wait_ready()
        yield p
    finally:
        p.cleanup()


@asynccontextmanager
async def running_platform(settings: Settings) -> AsyncIterator[Platform]:
    """A platform serving in this event loop (``Platform.serve``, as ``phloem up`` runs
    it, without taking signals): yielded once ready (its parts in ``.running``), then
    stopped as the first SIGINT would, waiting until it has drained and stopped.

        async with running_platform(Settings(data_dir=new_data_dir(), ...)) as platform:
            port = platform.running.gateway.port
    """
    from phloem.server.platform import Platform

    platform = Platform(settings)
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()

    async def on_ready(running: Running) -> None:
        ready.set_result(running)

    serving = asyncio.create_task(platform.serve(on_ready))
    first: set[asyncio.Future[Any]] = {ready, serving}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        raise AssertionError(f"the platform did not start (serve returned "
                             f"{serving.result()}; its error is on stderr)")
    try:
        yield platform
    finally:
        platform.request_stop()
        code = await serving
        if code != 0:
            raise AssertionError(f"the platform's serve returned {code}")


def refused_start(env: dict[str, str]) -> str:
    """Run ``phloem up`` with ``env`` added, expecting it to refuse before it makes
    anything (non-zero exit, no system database); its output, whitespace collapsed.

        assert "head_timeout: must be" in refused_start({"PHLOEM_HEAD_TIMEOUT": "0"})
    """
    p = PlatformProcess(new_data_dir(), free_port(), free_port())
    try:
        proc = subprocess.run(p.args(), env={**p.env, **env}, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert not (p.data_dir / "system").exists()
        return " ".join((proc.stderr + proc.stdout).split())
    finally:
        p.cleanup()


def host_of(url: str) -> str:
    return url.split("://", 1)[1]


def copy_example(dest: Path, src: Path = EXAMPLE) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest
