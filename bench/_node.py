"""The Node column of bench/runtime.py: the same minimal Hono app (bench/apps/node-minimal)
through phloem's gateway, through nginx and on ``@hono/node-server`` directly, on the same
Node 24.

* throughput: wrk at 32 and 256 connections, 3 rounds interleaved (bench/_compare.py):
  phloem (gateway -> one Node isolate on a Unix socket), nginx (1 worker, keepalive 1024 ->
  the bundle on @hono/node-server on a Unix socket, no keep-alive timeout, as phloem's
  host sets it), bench/apps/forwarder.py (the floor of a Python proxy) to the same socket,
  and the bundle on @hono/node-server on TCP, one Node process each;
* cold start: a new deployment each run (so no isolate is live; the bundle is built at
  deploy time, so this is the start of a cached bundle), request -> full response, on the
  sandboxed platform and on the ``--no-sandbox`` one (bench/_cold.py), vs a bare ``node``
  spawn of the same bundle -> first response.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _cold
from _compare import (
    Table,
    Way,
    floor_ratios,
    interleaved,
    own_cpu,
    report,
    report_floor,
    tree_cpu,
)
from _load import run_wrk
from _procs import free_port, start_forwarder, start_nginx, wait_answering

from phloem.runtimes.node.provision import NODE_SERVER_VERSION, ensure_toolchain
from phloem.testing import host_of

if TYPE_CHECKING:
    from runtime import Bench

APP = Path(__file__).resolve().parent / "apps" / "node-minimal"
T_COLD_MS = 100.0  # issue 5: Node cold start p50 with the bundle cached
T_COLD_SANDBOX_MS = 60.0  # issue 10: the same with the sandbox
T_NGINX = 1.0  # issue 12: through phloem / the same bundle through nginx

# argv: the bundle's URL, then a TCP port or a Unix socket's path (nginx's upstream).
SERVE = """
import {{ createAdaptorServer, serve }} from "{server}";
const {{ default: app }} = await import(process.argv[2]);
const where = process.argv[3];
if (/^[0-9]+$/.test(where)) {{
  serve({{ fetch: app.fetch, port: Number(where), hostname: "127.0.0.1" }});
}} else {{
  const server = createAdaptorServer({{ fetch: app.fetch }});
  server.keepAliveTimeout = 0;  // as phloem's host: the proxy keeps and closes connections
  server.listen(where);
}}
"""


@dataclass
class NodeResults:
    tables: dict[int, Table] = field(default_factory=dict)  # conns -> runs
    cold: _cold.ColdResult | None = None


def _bundle_of(b: Bench, fn: dict[str, Any]) -> Path:
    # The deploy's own id (``phloem functions deploy --output json`` adds it as
    # "deployment"): the function's deployment_id, read just after, was null in some
    # loaded runs.
    dep: str = fn["deployment"]["id"]
    return b.p.data_dir / "deployments" / dep / "bundle" / "bundle.mjs"


def _direct_script(b: Bench, tools: Path) -> Path:
    server = (tools / f"node-server-{NODE_SERVER_VERSION}" / "node_modules" / "@hono" /
              "node-server" / "dist" / "index.mjs")
    script = b.tmp / "serve-direct.mjs"
    script.write_text(SERVE.format(server=server.as_uri()))
    return script


def _spawn_direct(b: Bench, node: Path, script: Path, bundle: Path, port: int | None,
                  uds: str | None = None) -> tuple[subprocess.Popen[bytes], float]:
    """Start node on the bundle on TCP ``port`` or Unix socket ``uds``; returns the process
    and spawn -> first 200 in seconds."""
    t0 = time.perf_counter()
    proc = b.reaper.spawn([str(node), str(script), bundle.as_uri(), uds or str(port)],
                          stdin=subprocess.DEVNULL)
    status, body = wait_answering(proc, port=port, uds=uds, what="node", poll_s=0.001)
    elapsed = time.perf_counter() - t0
    if status != 200 or body != b"hello world!":
        raise RuntimeError(f"direct node answered {status} {body[:100]!r}")
    return proc, elapsed


def node(b: Bench, conns_list: tuple[int, ...], rounds: int, say: object) -> NodeResults:
    assert callable(say)
    out = NodeResults()
    d = b.args.duration
    tools = b.p.data_dir / "runtime" / "node"
    say(f"## 5. node: the minimal Hono app, wrk -t1, {d:g} s per run, {rounds} rounds per "
        "configuration, the order rotating")
    say("   direct = the same bundle on @hono/node-server on TCP; nginx = 1 worker, keepalive "
        "1024 -> the bundle on @hono/node-server on a Unix socket;")
    say("   phloem = gateway -> 1 Node isolate (max_isolates=1); CPU/req = the proxy's")
    fn = b.p.deploy("nodemin", APP, "--limit", "max_isolates=1")
    node_bin, _, _ = ensure_toolchain(tools, lambda _line: None)
    script = _direct_script(b, tools)
    port = free_port()
    bundle = _bundle_of(b, fn)
    direct, _ = _spawn_direct(b, node_bin, script, bundle, port)
    sock = str(b.tmp / "node.sock")
    behind, _ = _spawn_direct(b, node_bin, script, bundle, None, uds=sock)
    nginx_port = free_port()
    nginx = start_nginx(b.reaper, b.tmp, nginx_port, sock)
    forwarder_port = free_port()
    forwarder = start_forwarder(b.reaper, forwarder_port, sock)
    host = host_of(fn["invocation_url"])
    ways = [Way("direct", f"http://127.0.0.1:{port}/"),
            Way("nginx", f"http://127.0.0.1:{nginx_port}/", cpu=tree_cpu(nginx.pid)),
            Way("phloem", f"http://127.0.0.1:{b.p.gateway_port}/", host,
                cpu=own_cpu(b.p.proc.pid if b.p.proc else 0)),
            # The floor of a Python proxy (bench/apps/forwarder.py) to the same socket.
            Way("forwarder", f"http://127.0.0.1:{forwarder_port}/", cpu=own_cpu(forwarder.pid))]
    for w in ways:
        run_wrk(w.url, connections=256, duration=1 if b.args.quick else 2, host=w.host)
    for conns in conns_list:
        table = interleaved(ways, connections=conns, duration=d, rounds=rounds, say=say)
        out.tables[conns] = table
        report(table, subject="phloem",
               against={"nginx": T_NGINX, "direct": math.nan, "forwarder": math.nan}, say=say)
        report_floor(table, say)
    b.reaper.stop(forwarder)
    b.reaper.stop(nginx)
    b.reaper.stop(behind)
    b.reaper.stop(direct)
    runs = b.args.cold_runs
    if not runs:  # --quick: no cold starts
        say()
        return out
    # The cold starts compare two platforms alike: no idle isolate left on one only.
    b.p.cli("functions", "delete", "nodemin")

    say(f"   cold start, median of {runs} ({os.getloadavg()[0]:.2f} load average, 1 min): a "
        "new deployment each run, request -> response, sandbox and no sandbox interleaved; "
        "bare: node spawn -> first response")

    platforms = b.cold_platforms()

    def bare(run: int) -> float:
        # The sandboxed platform's bundle of this run (the same bytes on both).
        bundle = _bundle_of(b, platforms[0].last_deploy)
        proc, elapsed = _spawn_direct(b, node_bin, script, bundle, free_port())
        b.reaper.stop(proc)
        return elapsed

    cold = _cold.compare(platforms, runs=runs, slug="nodecold", app=APP,
                         body=b"hello world!", bare=bare, bare_label="bare node", say=say)
    out.cold = cold
    p50, b50 = cold.ways[_cold.SANDBOX].p50_ms, cold.ways[_cold.BARE].p50_ms
    against = f"ratio sandbox / no sandbox {cold.ratio:.2f}; " if cold.ratio is not None else ""
    say(f"   {against}phloem (sandbox) / bare node {p50 / b50:.2f}")
    say(f"   targets (sandbox): p50 <= {T_COLD_SANDBOX_MS:g} ms: "
        f"{'met' if p50 <= T_COLD_SANDBOX_MS else 'MISSED'}; p50 <= {T_COLD_MS:g} ms: "
        f"{'met' if p50 <= T_COLD_MS else 'MISSED'}")
    say()
    return out


def summary_rows(r: NodeResults, conns_list: tuple[int, ...], rounds: int) -> list[str]:
    rows = []
    for conns in conns_list:
        if conns in r.tables:
            t = r.tables[conns]
            ph, ng, di = (t.median_rps(w) for w in ("phloem", "nginx", "direct"))
            runs = "; ".join(f"{w} " + " / ".join(f"{x:,.0f}" for x in t.rps(w))
                             for w in ("phloem", "nginx", "direct", "forwarder"))
            rows.append(f"| Node (Hono) throughput, {conns} connections, median of {rounds} "
                        f"(req/s; runs: {runs}) | {ph:,.0f} | {ng:,.0f} | {di:,.0f} | "
                        f"{t.ratio('phloem', 'nginx'):.2f}x nginx, "
                        f"{t.ratio('phloem', 'direct'):.2f}x @hono/node-server, "
                        f"{floor_ratios(t)} | "
                        f">= {T_NGINX:g}x nginx |")
    if r.cold:
        rows += _cold.summary_rows(r.cold, "Node ", "bare node",
                                   f"<= {T_COLD_SANDBOX_MS:g} ms; <= {T_COLD_MS:g} ms")
    return rows
