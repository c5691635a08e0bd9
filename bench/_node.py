"""The Node column of bench/runtime.py: the same minimal Hono app (bench/apps/node-minimal)
through phloem's gateway and on ``@hono/node-server`` directly, on the same Node 24.

* throughput: wrk at 32 and 256 connections, phloem (gateway -> one Node isolate on a Unix
  socket) vs the app served by @hono/node-server on TCP, one process each;
* cold start: a new deployment each run (so no isolate is live; the bundle is built at
  deploy time, so this is the start of a cached bundle), request -> full response, on the
  sandboxed platform and on the ``--no-sandbox`` one (bench/_cold.py), vs a bare ``node``
  spawn of the same bundle -> first response.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import _cold
from _load import run_wrk
from _procs import free_port, wait_answering

from phloem.runtimes.node.provision import NODE_SERVER_VERSION, ensure_toolchain
from phloem.testing import host_of

if TYPE_CHECKING:
    from runtime import Bench

APP = Path(__file__).resolve().parent / "apps" / "node-minimal"
T_COLD_MS = 100.0  # issue 5: Node cold start p50 with the bundle cached
T_COLD_SANDBOX_MS = 60.0  # issue 10: the same with the sandbox

SERVE = """
import {{ serve }} from "{server}";
const {{ default: app }} = await import(process.argv[2]);
serve({{ fetch: app.fetch, port: Number(process.argv[3]), hostname: "127.0.0.1" }});
"""


@dataclass
class NodeResults:
    rps: dict[tuple[str, int], float] = field(default_factory=dict)  # (way, conns)
    cold: _cold.ColdResult | None = None


def _bundle_of(b: Bench, fn: dict[str, str]) -> Path:
    return b.p.data_dir / "deployments" / fn["deployment_id"] / "bundle" / "bundle.mjs"


def _direct_script(b: Bench, tools: Path) -> Path:
    server = (tools / f"node-server-{NODE_SERVER_VERSION}" / "node_modules" / "@hono" /
              "node-server" / "dist" / "index.mjs")
    script = b.tmp / "serve-direct.mjs"
    script.write_text(SERVE.format(server=server.as_uri()))
    return script


def _spawn_direct(b: Bench, node: Path, script: Path, bundle: Path,
                  port: int) -> tuple[subprocess.Popen[bytes], float]:
    """Start node on the bundle; returns the process and spawn -> first 200 in seconds."""
    t0 = time.perf_counter()
    proc = b.reaper.spawn([str(node), str(script), bundle.as_uri(), str(port)],
                          stdin=subprocess.DEVNULL)
    status, body = wait_answering(proc, port=port, what="node", poll_s=0.001)
    elapsed = time.perf_counter() - t0
    if status != 200 or body != b"hello world!":
        raise RuntimeError(f"direct node answered {status} {body[:100]!r}")
    return proc, elapsed


def node(b: Bench, conns_list: tuple[int, ...], say: object) -> NodeResults:
    assert callable(say)
    out = NodeResults()
    d = b.args.duration
    tools = b.p.data_dir / "runtime" / "node"
    say(f"## 5. node: the minimal Hono app, wrk -t1, {d:g} s per run")
    say("   direct = the same bundle on @hono/node-server on TCP; phloem = gateway -> 1 Node "
        "isolate (max_isolates=1)")
    fn = b.p.deploy("nodemin", APP, "--limit", "max_isolates=1")
    node_bin, _, _ = ensure_toolchain(tools, lambda _line: None)
    script = _direct_script(b, tools)
    port = free_port()
    direct, _ = _spawn_direct(b, node_bin, script, _bundle_of(b, fn), port)
    host = host_of(fn["invocation_url"])
    targets = [("direct", f"http://127.0.0.1:{port}/", None),
               ("phloem", f"http://127.0.0.1:{b.p.gateway_port}/", host)]
    for _way, url, h in targets:
        run_wrk(url, connections=32, duration=1 if b.args.quick else 2, host=h)
    for conns in conns_list:
        for way, url, h in targets:
            r = run_wrk(url, connections=conns, duration=d, host=h)
            out.rps[(way, conns)] = r.rps
            say(f"   {conns:>4} conns  {way:<7} {r.rps:>9,.0f} req/s   p50 {r.p50_ms:6.2f} ms"
                f"   p99 {r.p99_ms:6.2f} ms{f'   ({r.errors})' if r.errors else ''}")
        ph, di = out.rps[("phloem", conns)], out.rps[("direct", conns)]
        say(f"   {conns:>4} conns  phloem/direct {ph / di:.2f}x")
    b.reaper.stop(direct)
    # The cold starts compare two platforms alike: no idle isolate left on one only.
    b.p.cli("functions", "delete", "nodemin")

    runs = b.args.cold_runs
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


def summary_rows(r: NodeResults, conns_list: tuple[int, ...]) -> list[str]:
    rows = []
    for conns in conns_list:
        if ("phloem", conns) in r.rps:
            ph, di = r.rps[("phloem", conns)], r.rps[("direct", conns)]
            rows.append(f"| Node (Hono) throughput, {conns} connections (req/s) | {ph:,.0f} | | "
                        f"{di:,.0f} | {ph / di:.2f}x @hono/node-server | |")
    if r.cold:
        rows += _cold.summary_rows(r.cold, "Node ", "bare node",
                                   f"<= {T_COLD_SANDBOX_MS:g} ms; <= {T_COLD_MS:g} ms")
    return rows
