"""The registry is the only switch between runtimes: nothing outside ``phloem/runtimes/``
names one, and a runtime listed there (a small third one, registered in-process here) is
accepted and named in errors, chosen by the CLI's defaults, read from a config, built and
served by ``phloem dev`` through the real gateway and supervisor, and reloaded."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import phloem
from phloem.config import BranchInfo
from phloem.dev.server import DevServer
from phloem.project.plan import ConfigError, load_project
from phloem.runtimes import registry
from phloem.runtimes.base import (
    BuildContext,
    BuildFailed,
    IsolateContext,
    IsolatePlan,
    Log,
    Toolbox,
)
from phloem.supervisor.isolate import Spawner
from phloem.system.validation import InvalidInput
from phloem.testing import free_port

SRC = Path(phloem.__file__).parent
#: Modules outside runtimes/ allowed to use a runtime's package, and why.
ALLOWED = {
    "project/neon.py": "evaluates neon.ts configs with Node and esbuild: a config format "
                       "that needs those tools, not a choice between runtimes",
    "control/npm_registry.py": "serves the npm packages phloem supplies: npm's format, "
                               "not a choice between runtimes",
    "services/auth/install.py": "Neon Auth is Better Auth, a Node program the platform "
                                "runs for a branch, not a function's runtime",
    "services/auth/service.py": "runs that program on the Node phloem provisions",
}


def test_nothing_outside_runtimes_names_a_runtime() -> None:
    names = {n for rt in registry.RUNTIMES for n in (rt.name, *rt.known_names)}
    families = "|".join(rt.family for rt in registry.RUNTIMES)
    patterns = [
        re.compile(r"\b(NODE|PYTHON)_RUNTIMES?\b"),
        re.compile(r"\b(ZygoteSpawner|NodeStandbySpawner|ZygoteStart|StandbyStart)\b"),
        re.compile("|".join(re.escape(n) for n in sorted(names))),
        re.compile(rf"phloem\.runtimes\.({families})\b"),
        re.compile(rf"""[=!]=\s*["']({families})["']"""),
    ]
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "runtimes" or rel.as_posix() in ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in patterns):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


# -- a third runtime ----------------------------------------------------------------------

#: The fake runtime's host: serves the bytes its build copied, on the inherited socket,
#: and says ready on the status pipe, as every host does.
HOST = r'''
import argparse, os, signal, socket, sys
p = argparse.ArgumentParser()
for flag in ("--body", "--fd", "--ready-fd"):
    p.add_argument(flag)
a = p.parse_args()
body = open(a.body, "rb").read()
listener = socket.socket(fileno=int(a.fd))
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
os.write(int(a.ready_fd), b"R")
while True:
    conn, _ = listener.accept()
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                break
            head += chunk
        if head:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                         b"\r\n\r\n" % len(body) + body)
'''


class EchoRuntime:
    """Functions are ``.echo`` files; the app answers every request with the file."""

    family: str = "echo"
    name: str = "echo1"
    known_names: tuple[str, ...] = ("echo1",)
    source_suffixes: tuple[str, ...] = (".echo",)
    entry_example: str = "hello.echo"
    bundles: bool = False
    prebuilt_suffixes: tuple[str, ...] = ()

    def __init__(self, host: Path) -> None:
        self.host = host
        self.built: list[Path] = []

    def check_entry(self, entry: str) -> str:
        if not entry.endswith(".echo"):
            raise InvalidInput("entry", f"must be a .echo file (got {entry!r})")
        return entry

    def default_entry(self, source: Path) -> str | None:
        return "hello.echo" if (source / "hello.echo").is_file() else None

    def entry_for_source(self, source: str, attr: str | None) -> str:
        return source

    def prepare(self, toolbox: Toolbox, log: Log) -> None:
        pass

    def build(self, ctx: BuildContext) -> None:
        text = (ctx.source / ctx.entry).read_text()
        if "syntax error" in text:
            raise BuildFailed(f"{ctx.entry}: syntax error")
        (ctx.out / "body").write_text(text)
        self.built.append(ctx.out)

    def isolate(self, ctx: IsolateContext) -> IsolatePlan:
        command = [sys.executable, str(self.host), "--body", str(ctx.out / "body")]
        return IsolatePlan(command=command, check=[sys.executable, "-c", "pass"], env={},
                           ro=[str(self.host)])

    def spawner(self, toolbox: Toolbox, fallback: Spawner) -> Spawner | None:
        return None


@pytest.fixture
def echo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EchoRuntime]:
    host = tmp_path / "echo-host.py"
    host.write_text(HOST)
    runtime = EchoRuntime(host)
    monkeypatch.setattr(registry, "RUNTIMES", (*registry.RUNTIMES, runtime))
    yield runtime


def test_a_registered_runtime_is_accepted_and_named(echo: EchoRuntime, tmp_path: Path) -> None:
    # What the deployer asks: the exact name or the family; errors list it.
    assert registry.runtime_for("echo1") is echo
    assert registry.runtime_for("echo") is echo
    with pytest.raises(InvalidInput) as bad:
        registry.runtime_for("echo2")
    assert bad.value.field == "runtime" and "echo1" in bad.value.message
    assert registry.satisfies("echo1", "echo") and not registry.satisfies("echo1", "python")
    # What the CLI picks for a directory, an entry or a runtime name.
    source = tmp_path / "src"
    source.mkdir()
    (source / "hello.echo").write_text("hi")
    assert registry.choose(source, None, None) == (echo, "hello.echo")
    assert registry.choose(source, None, "other.echo") == (echo, "other.echo")
    with pytest.raises(InvalidInput, match=r"must be a \.echo file"):
        registry.choose(source, "echo", "main:app")
    with pytest.raises(InvalidInput, match=r"'hello\.echo' for echo"):
        registry.choose(tmp_path / "empty", None, None)


def test_a_registered_runtime_in_a_config(echo: EchoRuntime, tmp_path: Path) -> None:
    (tmp_path / "hello.echo").write_text("hi")
    (tmp_path / "phloemfile.py").write_text(
        "from phloem.config import Function, define_config\n"
        "config = define_config(functions={'hi': Function(source='hello.echo')})\n")
    desired = load_project(tmp_path).desired(BranchInfo(name="main", id="br-x"))
    assert (desired["hi"].runtime, desired["hi"].entry) == ("echo", "hello.echo")
    (tmp_path / "phloemfile.py").write_text(
        "from phloem.config import Function, define_config\n"
        "config = define_config(functions={'hi': Function(source='hello.echo',"
        " runtime='python3.12')})\n")
    with pytest.raises(ConfigError, match=r"functions\.hi\.runtime: unknown runtime "
                                          r"'python3\.12' \(known: echo1\)"):
        load_project(tmp_path).desired(BranchInfo(name="main", id="br-x"))


async def _get(port: int, host: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}/", headers={"Host": host},
                                timeout=30)


async def test_dev_builds_serves_and_reloads_a_registered_runtime(
        echo: EchoRuntime, tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    (root / "hello.echo").write_text("first")
    (root / "phloemfile.py").write_text(
        "from phloem.config import Function, define_config\n"
        "config = define_config(functions={'hi': Function(source='hello.echo')})\n")
    branch = "br-dev-test-abcdef"
    desired = load_project(root).desired(BranchInfo(name="main", id=branch))
    lines: list[str] = []
    server = DevServer(root, desired, branch, {}, port=free_port(), say=lines.append)
    await server.start()
    host = "any.host.example"  # each function has its own port: the Host does not matter
    try:
        resp = await _get(server.port_of("hi"), host)
        assert (resp.status_code, resp.text) == (200, "first"), lines
        # A failed build keeps the previous generation serving.
        (root / "hello.echo").write_text("syntax error")
        assert not await server.reload("hi")
        assert any("build failed: hello.echo: syntax error" in line for line in lines)
        assert (await _get(server.port_of("hi"), host)).text == "first"
        (root / "hello.echo").write_text("second")
        assert await server.reload("hi"), lines
        assert (await _get(server.port_of("hi"), host)).text == "second"
        assert len(echo.built) == 2 and echo.built[0] != echo.built[1]
    finally:
        await server.stop()
