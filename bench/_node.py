"""The Node column of bench/runtime.py: the same minimal Hono app (bench/apps/node-minimal)
through phloem's gateway and on ``@hono/node-server`` directly, on the same Node 24.

* throughput: wrk at 32 and 256 connections, phloem (gateway -> one Node isolate on a Unix
  socket) vs the app served by @hono/node-server on TCP, one process each;
* cold start: a new deployment each run (so no isolate is live; the bundle is built at
  deploy time, so this is the start of a cached bundle), request -> full response, vs a
  bare ``node`` spawn of the same bundle -> first response.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from _load import run_wrk
from _procs import free_port, http_get, wait_answering

from phloem.runtimes.node.provision import NODE_SERVER_VERSION, ensure_toolchain
from phloem.testing import host_of

if TYPE_CHECKING:
    from runtime import Bench

APP = Path(__file__).resolve().parent / "apps" / "node-minimal"
T_COLD_MS = 100.0  # issue 5: Node cold start p50 with the bundle cached

SERVE = """
import {{ serve }} from "{server}";
const {{ default: app }} = await import(process.argv[2]);
serve({{ fetch: app.fetch, port: Number(process.argv[3]), hostname: "127.0.0.1" }});
"""


@dataclass
class NodeResults:
    rps: dict[tuple[str, int], float] = field(default_factory=dict)  # (way, conns)
    cold_ms: tuple[float, float] | None = None  # phloem, bare node (p50)


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

    runs = b.args.cold_runs
    say(f"   cold start, median of {runs}: a new deployment each run, request -> response; "
        "bare: node spawn -> first response")
    phloem_s: list[float] = []
    bare_s: list[float] = []
    for run in range(runs):
        cold = b.p.deploy("nodecold", APP, "--env", f"RUN={run}")
        time.sleep(0.2)  # let the retired isolate's SIGINT exit settle (not measured)
        t0 = time.perf_counter()
        status, body = http_get(port=b.p.gateway_port, host=host_of(cold["invocation_url"]))
        phloem_s.append(time.perf_counter() - t0)
        if status != 200 or body != b"hello world!":
            raise RuntimeError(f"cold node request answered {status} {body[:100]!r}")
        proc, elapsed = _spawn_direct(b, node_bin, script, _bundle_of(b, cold), free_port())
        bare_s.append(elapsed)
        b.reaper.stop(proc)
    p50, b50 = statistics.median(phloem_s) * 1000, statistics.median(bare_s) * 1000
    out.cold_ms = (p50, b50)
    say(f"   phloem     p50 {p50:7.1f} ms   min {min(phloem_s) * 1000:7.1f}   "
        f"max {max(phloem_s) * 1000:7.1f}")
    say(f"   bare node  p50 {b50:7.1f} ms   min {min(bare_s) * 1000:7.1f}   "
        f"max {max(bare_s) * 1000:7.1f}")
    say(f"   ratio phloem / bare node {p50 / b50:.2f}   target p50 <= {T_COLD_MS:g} ms: "
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
    if r.cold_ms:
        ph_ms, bare_ms = r.cold_ms
        rows.append(f"| Node cold start p50, request -> response (ms) | {ph_ms:.0f} | | "
                    f"{bare_ms:.0f} | {ph_ms / bare_ms:.2f}x bare node | <= 100 ms |")
    return rows
