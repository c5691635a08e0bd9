"""Edit-to-new-response time of ``phloem dev`` beside ``uvicorn --reload`` with the same
file-watcher settings, on the same Starlette app, interleaved; every run is printed.

    .venv/bin/python bench/dev_reload.py              # 10 runs
    .venv/bin/python bench/dev_reload.py --runs 20
    scripts/bench dev_reload

Both servers run at once, each on its own copy of the project (so an edit wakes only
one). A run edits phloem's copy, then uvicorn's (the order alternates every run, so
neither always goes first); an edit rewrites ``src/app.py`` with a new version string and
the time is from the write to the first response carrying it, polled every 2 ms over
keep-alive HTTP, after 0.3 s of quiet since the previous run.

Both watch with watchfiles and the same settings: ``phloem dev`` calls ``awatch(...,
debounce=50, step=10)`` (src/phloem/dev/server.py; this script reads the numbers from there and
refuses to run if it cannot), and uvicorn's reloader, whose ``watch()`` call takes
watchfiles' defaults (debounce 1600 ms, step 50 ms) and sleeps ``--reload-delay`` (0.25 s)
before each, is run with those patched to the same debounce and step and
``--reload-delay 0`` (bench/_uvicorn_reload.py). What remains is what each does on a
change: uvicorn restarts its worker process (a fresh interpreter imports the app);
``phloem dev`` builds a new generation and starts it beside the old one, switching once it
is ready.

Each run's phloem time is checked against the target (<= 300 ms) and reported met or
MISSED; the summary counts the runs that met it. Medians are printed beside every run,
never instead of them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

import phloem.dev.server
from phloem.testing import PlatformProcess, free_port, platform_process, wait_for

HERE = Path(__file__).resolve().parent
TARGET_MS = 300.0
SETTLE_S = 0.3
POLL_S = 0.002

APP = '''
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

VERSION = "v0"

async def index(request):
    return PlainTextResponse(VERSION)

app = Starlette(routes=[Route("/", index)])
'''


def watcher_settings() -> tuple[int, int]:
    """(debounce, step) in ms of ``phloem dev``'s ``watchfiles.awatch`` call."""
    source = Path(phloem.dev.server.__file__).read_text()
    m = re.search(r"awatch\(.{0,300}?debounce=(\d+),\s*step=(\d+)", source, re.S)
    if m is None:
        raise SystemExit(f"cannot find phloem dev's watchfiles settings (awatch(..., "
                         f"debounce=N, step=M)) in {phloem.dev.server.__file__}; update this bench")
    return int(m.group(1)), int(m.group(2))


class Server:
    """A dev server on ``port`` serving ``root``; ``edit`` times one reload."""

    def __init__(self, name: str, root: Path, port: int, host: str | None) -> None:
        self.name, self.root, self.port = name, root, port
        headers = {"Host": host} if host else {}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers,
                                   timeout=30)
        self.version = 0

    def edit(self) -> float:
        """Seconds from writing a new version of the app to the first response with it."""
        self.version += 1
        want = f"v{self.version}"
        app = self.root / "src" / "app.py"
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        app.write_text(APP.replace('"v0"', f'"{want}"'))
        deadline = t0 + 30
        while time.perf_counter() < deadline:
            try:
                if self.client.get("/").text == want:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        raise RuntimeError(f"{self.name}: no response with {want} within 30 s")


@contextmanager
def spawned(cmd: list[str], cwd: Path, env: dict[str, str]) -> Iterator[list[str]]:
    """Run ``cmd``; yields its output lines as they come; stops it on exit."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        yield lines
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_phloem_dev(stack: ExitStack, p: PlatformProcess, root: Path) -> Server:
    port = free_port()
    lines = stack.enter_context(spawned([*p.cli_args(), "dev", "--port", str(port)], root,
                                        p.env))
    url = wait_for(lambda: next((ln.split()[1] for ln in lines if ln.startswith("api ")),
                                None), 60, "phloem dev: " + "".join(lines[-5:]))
    # Each function has its own port (any Host): the one it printed.
    server = Server("phloem dev", root, int(url.rsplit(":", 1)[1].rstrip("/")), None)
    wait_for(lambda: server.client.get("/").status_code == 200, 30, "phloem dev's response")
    return server


def start_uvicorn(stack: ExitStack, root: Path, debounce: int, step: int) -> Server:
    port = free_port()
    lines = stack.enter_context(spawned(
        [sys.executable, str(HERE / "_uvicorn_reload.py"), "--debounce", str(debounce),
         "--step", str(step), "--", "src.app:app", "--reload", "--reload-delay", "0",
         "--port", str(port), "--log-level", "warning"], root, dict(os.environ)))
    server = Server("uvicorn --reload", root, port, None)
    wait_for(lambda: server.client.get("/").status_code == 200, 30, "uvicorn's response")
    said = f"reloader: watchfiles.watch(debounce={debounce}, step={step})"
    if not any(ln.strip() == said for ln in lines):
        raise SystemExit(f"uvicorn's reloader did not take the watcher settings ({said!r} "
                         f"not printed); its output:\n{''.join(lines)}")
    return server


def verdict(ms: float) -> str:
    return "met" if ms <= TARGET_MS else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10,
                        help="edits of each server, interleaved (default 10)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    debounce, step = watcher_settings()
    print(f"phloem dev reload vs uvicorn --reload; watchfiles debounce {debounce} ms, step "
          f"{step} ms for both (uvicorn --reload-delay 0); {args.runs} runs, interleaved, "
          f"order alternating; load average (1 min) {os.getloadavg()[0]:.2f}", flush=True)
    ours: list[float] = []
    theirs: list[float] = []
    with ExitStack() as stack:
        p = stack.enter_context(platform_process())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root = tmp / "proj"
        p.cli("init", str(root))
        (root / "src" / "app.py").write_text(APP)
        p.cli("link", "--branch", "main", cwd=root)
        twin = tmp / "uvicorn"
        shutil.copytree(root, twin)
        phloem = start_phloem_dev(stack, p, root)
        uvicorn = start_uvicorn(stack, twin, debounce, step)
        for servers in (phloem, uvicorn), (uvicorn, phloem):  # warm both ways once
            for s in servers:
                s.edit()
        print(f"  {'run':>3}  {'phloem dev':>11}  {'uvicorn':>9}  {'ratio':>6}  target <= "
              f"{TARGET_MS:g} ms", flush=True)
        for run in range(1, args.runs + 1):
            order = (phloem, uvicorn) if run % 2 else (uvicorn, phloem)
            took = {s.name: s.edit() * 1000 for s in order}
            a, b = took[phloem.name], took[uvicorn.name]
            ours.append(a)
            theirs.append(b)
            print(f"  {run:>3}  {a:8.1f} ms  {b:6.1f} ms  {a / b:6.2f}  {verdict(a)}"
                  f"{'' if run % 2 else '   (uvicorn first)'}", flush=True)
    met = sum(1 for a in ours if a <= TARGET_MS)
    a50, b50 = statistics.median(ours), statistics.median(theirs)
    print(f"  phloem dev: target <= {TARGET_MS:g} ms met in {met} of {args.runs} runs"
          f"{'' if met == args.runs else ' (MISSED in ' + str(args.runs - met) + ')'}; "
          f"min {min(ours):.1f}, median {a50:.1f}, max {max(ours):.1f} ms")
    print(f"  uvicorn --reload (same watcher settings): min {min(theirs):.1f}, median "
          f"{b50:.1f}, max {max(theirs):.1f} ms")
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    print(f"  ratio phloem / uvicorn per run: min {min(ratios):.2f}, median "
          f"{statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    print(f"  load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
