"""Where a Node function's request goes slow: the same Hono bundle (bench/apps/node-minimal)
served along each part of phloem's path, so the gateway's cost and the isolate's separate:

* ``direct``        the bundle on @hono/node-server on TCP (as bench/_node.py);
* ``host``          phloem's host.mjs run bare (no sandbox, no cgroup) on a TCP socket it
                    inherits, wrk straight at it: host.mjs's own cost over ``direct``;
* ``nginx-hono``    nginx -> the bundle on @hono/node-server on a Unix socket (bench/_node.py's
                    nginx row);
* ``nginx-host``    nginx -> host.mjs run bare on a Unix socket;
* ``nginx-isolate`` nginx -> the phloem isolate's own Unix socket (sandbox, cgroup, standby
                    activation), bypassing the gateway;
* ``phloem``        the gateway -> that same isolate.

Every run is printed with the load average, the proxy's and the Node process's CPU per
request; rounds are interleaved with the order rotating.

    .venv/bin/python bench/node_paths.py --duration 5 --rounds 3 --connections 32 256
    .venv/bin/python bench/node_paths.py --only direct host   # a subset of the ways
    .venv/bin/python bench/node_paths.py --platform-arg=--no-sandbox   # isolates unsandboxed
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _node import APP, SERVE
from _procs import (
    Reaper,
    cpu_seconds,
    descendants,
    exit_on_signals,
    free_port,
    http_get,
    start_nginx,
    wait_answering,
)

from phloem.runtimes.node.provision import NODE_SERVER_VERSION, ensure_toolchain
from phloem.testing import host_of, platform_process

WAYS = ("direct", "host", "nginx-hono", "nginx-host", "nginx-isolate", "phloem")


@dataclass
class Way:
    name: str
    url: str
    node_pid: int
    host: str | None = None
    proxy_pid: int | None = None
    #: Extra request headers (what a proxy in front would add; host.mjs reads
    #: X-Request-Id).
    headers: tuple[str, ...] = ()
    rps: list[float] = field(default_factory=list)


def wrk(url: str, conns: int, duration: float, headers: list[str]) -> tuple[float, int, str]:
    args = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "10s"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration + 60,
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = "; ".join(m.group(0) for m in re.finditer(r"(Socket errors|Non-2xx).*", out))
    return rps, n, errors


def run(way: Way, conns: int, duration: float) -> str:
    headers = [*way.headers] + ([f"Host: {way.host}"] if way.host else [])
    node0 = cpu_seconds(way.node_pid)
    proxy0 = cpu_seconds(way.proxy_pid) if way.proxy_pid else 0.0
    rps, n, errors = wrk(way.url, conns, duration, headers)
    node_us = (cpu_seconds(way.node_pid) - node0) / max(n, 1) * 1e6
    proxy = ""
    if way.proxy_pid:
        proxy = f"  proxy {(cpu_seconds(way.proxy_pid) - proxy0) / max(n, 1) * 1e6:5.1f} us/req"
    way.rps.append(rps)
    load = os.getloadavg()[0]
    return (f"{conns:>4} conns  {way.name:<14} {rps:>9,.0f} req/s  node {node_us:5.1f} us/req"
            f"{proxy}  load {load:.2f}{'  ' + errors if errors else ''}")


def bind_tcp() -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = free_port()
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s, port


def bind_unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1024)
    return s


def spawn_host(reaper: Reaper, node: Path, host: Path, bundle: Path,
               sock: socket.socket) -> subprocess.Popen[bytes]:
    """host.mjs as the isolate runs it (same flags), without sandbox or cgroup."""
    fd = sock.fileno()
    return reaper.spawn([str(node), "--max-old-space-size=1536", str(host), "--bundle",
                         str(bundle), "--fd", str(fd)], pass_fds=(fd,),
                        stdin=subprocess.DEVNULL)


def isolate_of(platform_pid: int, before: dict[int, float]) -> int:
    """The Node process below the platform that worked the most since ``before``."""
    def busy(pid: int) -> float:
        return cpu_seconds(pid) - before.get(pid, 0.0)
    nodes = [p for p in descendants(platform_pid) if "host.mjs" in _cmdline(p)]
    if not nodes:
        raise RuntimeError("no Node isolate found below the platform")
    return max(nodes, key=busy)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def isolate_socket(pid: int, data_dir: Path) -> str:
    """The Unix socket the isolate ``pid`` serves on: ``run/isolates/<its id>.sock`` (a
    standby's socket is renamed to that when it is activated)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ids = [v.split(b"=", 1)[1].decode() for v in env if v.startswith(b"PHLOEM_ISOLATE=")]
    if not ids:
        raise RuntimeError(f"process {pid} has no PHLOEM_ISOLATE: not an isolate")
    return str(data_dir / "run" / "isolates" / f"{ids[0]}.sock")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--only", nargs="+", choices=WAYS, default=list(WAYS))
    ap.add_argument("--platform-arg", action="append", default=[],
                    help="extra argument for phloem up (e.g. --no-sandbox)")
    args = ap.parse_args()
    say: Callable[[str], None] = lambda text: print(text, flush=True)  # noqa: E731
    with (exit_on_signals(), Reaper() as reaper, tempfile.TemporaryDirectory() as tmp_s,
          platform_process(args.platform_arg) as p):
        tmp = Path(tmp_s)
        os.chmod(tmp, 0o755)
        fn = p.deploy("nodepaths", APP, "--limit", "max_isolates=1")
        fn_host = host_of(fn["invocation_url"])
        # The deploy's own id: the function's deployment_id, read just after, was null
        # in some loaded runs.
        dep = fn["deployment"]["id"]
        bundle = p.data_dir / "deployments" / dep / "bundle" / "bundle.mjs"
        node, _, host_mjs = ensure_toolchain(p.data_dir / "runtime" / "node", lambda _: None)
        version = subprocess.run([str(node), "--version"], capture_output=True, text=True)
        say(f"node {version.stdout.strip()}, host {host_mjs}")
        server = (p.data_dir / "runtime" / "node" / f"node-server-{NODE_SERVER_VERSION}" /
                  "node_modules" / "@hono" / "node-server" / "dist" / "index.mjs")
        script = tmp / "serve.mjs"
        script.write_text(SERVE.format(server=server.as_uri()))
        ways: list[Way] = []
        rid = ("X-Request-Id: 4f1c2a9e-0000-4000-8000-000000000000",)

        def nginx_to(sock: str) -> tuple[str, int]:
            port = free_port()
            proc = start_nginx(reaper, tmp, port, sock)
            worker = max(descendants(proc.pid) or [proc.pid])
            return f"http://127.0.0.1:{port}/", worker

        if "direct" in args.only:
            port = free_port()
            proc = reaper.spawn([str(node), str(script), bundle.as_uri(), str(port)],
                                stdin=subprocess.DEVNULL)
            wait_answering(proc, port=port, what="direct node")
            ways.append(Way("direct", f"http://127.0.0.1:{port}/", proc.pid))
        if "host" in args.only:
            s, port = bind_tcp()
            proc = spawn_host(reaper, node, host_mjs, bundle, s)
            wait_answering(proc, port=port, what="bare host.mjs on TCP")
            ways.append(Way("host", f"http://127.0.0.1:{port}/", proc.pid, headers=rid))
        if "nginx-hono" in args.only:
            sock = str(tmp / "hono.sock")
            proc = reaper.spawn([str(node), str(script), bundle.as_uri(), sock],
                                stdin=subprocess.DEVNULL)
            wait_answering(proc, uds=sock, what="node on a Unix socket")
            url, worker = nginx_to(sock)
            ways.append(Way("nginx-hono", url, proc.pid, proxy_pid=worker))
        if "nginx-host" in args.only:
            sock = str(tmp / "host.sock")
            s = bind_unix(sock)
            proc = spawn_host(reaper, node, host_mjs, bundle, s)
            wait_answering(proc, uds=sock, what="bare host.mjs on a Unix socket")
            url, worker = nginx_to(sock)
            ways.append(Way("nginx-host", url, proc.pid, proxy_pid=worker))
        if {"nginx-isolate", "phloem"} & set(args.only):
            assert p.proc is not None
            before = {pid: cpu_seconds(pid) for pid in descendants(p.proc.pid)}
            gw = f"http://127.0.0.1:{p.gateway_port}/"
            wrk(gw, 8, 1, [f"Host: {fn_host}"])
            isolate = isolate_of(p.proc.pid, before)
            say(f"isolate pid {isolate}: {_cmdline(isolate)[:200]}")
            say(f"isolate cgroup: {Path(f'/proc/{isolate}/cgroup').read_text().strip()}")
            if "nginx-isolate" in args.only:
                sock = isolate_socket(isolate, p.data_dir)
                say(f"isolate socket {sock}: {http_get(uds=sock)}")
                url, worker = nginx_to(sock)
                ways.append(Way("nginx-isolate", url, isolate, proxy_pid=worker))
            if "phloem" in args.only:
                ways.append(Way("phloem", gw, isolate, host=fn_host, proxy_pid=p.proc.pid))
        for w in ways:  # warm up: JIT, connection pools
            wrk(w.url, 256, 2, [*w.headers] + ([f"Host: {w.host}"] if w.host else []))
        for conns in args.connections:
            for w in ways:
                w.rps.clear()
            for i in range(args.rounds):
                shift = i % len(ways)
                for w in ways[shift:] + ways[:shift]:
                    say(f"run {i + 1}  " + run(w, conns, args.duration))
            say(f"median {conns} conns: " + "   ".join(
                f"{w.name} {statistics.median(w.rps):,.0f}" for w in ways))


if __name__ == "__main__":
    main()
