"""The TLS column of bench/runtime.py (``--only tls``): phloem's gateway terminating TLS
(``phloem up --tls files``) vs nginx terminating TLS with the same certificate and key, in
front of the same upstream (bench/apps/fixed: a fixed response from ``data_received``, so
the proxy is what is measured), with equal settings:

* both: TLS 1.2 and 1.3 (the client, wrk's OpenSSL, negotiates 1.3), the same TLS 1.2
  ciphers, OpenSSL's default groups (X25519 first), session tickets on, ALPN http/1.1;
  the negotiated protocol, cipher and group of each are printed (``openssl s_client``);
* phloem: the gateway (1 process) -> 1 isolate (max_isolates=1); nginx: 1 worker,
  keepalive 1024 -> 1 process of the same app on a Unix socket, the headers phloem adds
  (as bench/_procs.py's plain nginx row).

Measured, 3 rounds interleaved (the order rotating per round), every run printed with the
proxy's CPU per request and the load average, then medians and phloem/nginx; with them,
bench/apps/forwarder.py terminating TLS with Python's ``ssl`` (the floor of a Python
proxy: uvloop + httptools, nothing else) and phloem/forwarder, forwarder/nginx; beside them,
for context, the same two without TLS (``nginx-http``, ``phloem-http``: runtime.py's
plain nginx and platform in front of the same app), so that what TLS adds to each shows
apart from the proxies' plain request paths:

1. keep-alive throughput over https: ``wrk -t1`` at 32 and 256 connections;
2. new TLS connections per second: ``wrk -t1 -c32 -H 'Connection: close'``: each request
   is a TCP connect, a TLS handshake, one request and a close (the server closes after
   the response; wrk reconnects). wrk rather than a client loop: a Python client would be
   slower than either server on this 2-core machine, so it would measure itself. wrk
   resumes sessions: it keeps each connection's TLS 1.3 ticket for the next one (a probe
   against nginx logged ``$ssl_session_reused`` "r" for 225 of 229 requests), so these
   are resumed handshakes (PSK with an X25519 key exchange, no certificate signature),
   as returning clients make; full handshakes are not measured separately.

    .venv/bin/python bench/runtime.py --only tls [--duration 10]
"""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from _compare import (
    Table,
    Way,
    floor_ratios,
    interleaved,
    machine_cpu,
    own_cpu,
    report,
    report_floor,
    steal_note,
    steal_percent,
    tree_cpu,
)
from _procs import free_port, start_forwarder, start_nginx

from phloem.gateway.tls import LocalCA
from phloem.testing import host_of, platform_process

if TYPE_CHECKING:
    from runtime import Bench

FIXED = Path(__file__).resolve().parent / "apps" / "fixed"
CONNECTIONS = (32, 256)
HANDSHAKE_CONNECTIONS = 32
T_THROUGHPUT = 0.85  # issue 13: phloem / nginx, 32 and 256 connections
T_HANDSHAKES = 0.7  # issue 13: new TLS connections per second, phloem / nginx

@dataclass
class HandshakeRun:
    rps: float
    cpu_us: float  # the proxy's CPU per new connection
    load: float
    errors: str


@dataclass
class TlsResults:
    tables: dict[int, Table] = field(default_factory=dict)  # conns -> keep-alive runs
    handshakes: dict[str, list[HandshakeRun]] = field(default_factory=dict)

    def handshake_ratios(self, a: str = "phloem", b: str = "nginx") -> list[float]:
        return [x.rps / y.rps for x, y in
                zip(self.handshakes[a], self.handshakes[b], strict=True)]


def negotiated(port: int, ca: Path, host: str) -> str:
    """Protocol, cipher and key-exchange group of one handshake (``openssl s_client``)."""
    if shutil.which("openssl") is None:
        return "(openssl not installed: not shown)"
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                           "-servername", host, "-CAfile", str(ca), "-alpn", "http/1.1",
                           "-brief"], input="", capture_output=True, text=True, timeout=30)
    out = proc.stdout + proc.stderr
    keep = ("Protocol version", "Ciphersuite", "Negotiated TLS1.3 group",
            "Server Temp Key", "Peer signature type", "ALPN", "Verification")
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(keep)]
    return "; ".join(lines) or out.strip()[:200]


def wrk_close(url: str, *, connections: int, duration: float,
              host: str | None) -> tuple[float, int, str]:
    """wrk with ``Connection: close``: (requests/s, requests, errors)."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout",
            "10s", "-H", "Connection: close"]
    if host:
        args += ["-H", f"Host: {host}"]
    proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration + 60)
    out = proc.stdout
    if proc.returncode != 0 or "Requests/sec:" not in out:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}\n{proc.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = []
    if m := re.search(r"Socket errors: (.*)", out):
        errors.append("socket errors: " + m.group(1).strip())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors.append(f"{m.group(1)} non-2xx/3xx responses")
    return rps, requests, "; ".join(errors)


def _cpu_median(table: Table, way: str) -> float:
    return statistics.median(r.cpu_us for r in table.runs[way])


def _cpu(way: Way) -> float:
    return way.cpu() if way.cpu else math.nan


def handshakes(ways: list[Way], *, duration: float, rounds: int, results: TlsResults,
               say: Callable[[str], None]) -> None:
    results.handshakes = {w.name: [] for w in ways}
    for i in range(rounds):
        shift = i % len(ways)
        for way in ways[shift:] + ways[:shift]:
            load = os.getloadavg()[0]
            cpu0, machine0 = _cpu(way), machine_cpu()
            rps, n, errors = wrk_close(way.url, connections=HANDSHAKE_CONNECTIONS,
                                       duration=duration, host=way.host)
            cpu_us = (_cpu(way) - cpu0) / max(n, 1) * 1e6
            stolen = steal_percent(machine0, machine_cpu())
            results.handshakes[way.name].append(HandshakeRun(rps, cpu_us, load, errors))
            note = f"   ({errors})" if errors else ""
            say(f"   run {i + 1}  new connections  {way.name:<8} {rps:>8,.0f} conn/s   "
                f"{cpu_us:6.1f} us CPU/conn   load {load:.2f}{steal_note(stolen)}{note}")
    med = {name: statistics.median(r.rps for r in runs)
           for name, runs in results.handshakes.items()}
    per = results.handshake_ratios()
    ratio = statistics.median(per)
    hits = sum(x >= T_HANDSHAKES for x in per)
    say("   median new connections/s: "
        + "   ".join(f"{name} {rate:,.0f}" for name, rate in med.items()))
    cpu = {name: statistics.median(r.cpu_us for r in runs)
           for name, runs in results.handshakes.items()}
    say("   median CPU per new connection: "
        + "   ".join(f"{name} {us:,.0f} us" for name, us in cpu.items()))
    say(f"   phloem/nginx per run {' / '.join(f'{x:.2f}' for x in per)}; median {ratio:.2f}x"
        f"   target >= {T_HANDSHAKES:g}x: {'met' if ratio >= T_HANDSHAKES else 'MISSED'} "
        f"(met in {hits} of {len(per)} runs)")
    for a, b in (("phloem", "forwarder"), ("forwarder", "nginx")):
        per = results.handshake_ratios(a, b)
        say(f"   {a}/{b} per run {' / '.join(f'{x:.2f}' for x in per)}; median "
            f"{statistics.median(per):.2f}x")


def tls(b: Bench, rounds: int, say: Callable[[str], None]) -> TlsResults:
    d = b.args.duration
    results = TlsResults()
    version = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    if "--with-http_ssl_module" not in version:
        raise RuntimeError("this nginx is built without ssl (--with-http_ssl_module)")
    ca = LocalCA.ensure(b.tmp / "tls-ca")
    # One certificate for both: the names phloem's hosts and the nginx URL use.
    cert, key = ca.issue(b.tmp, ["fn.localhost", "*.fn.localhost", "localhost", "127.0.0.1"],
                         stem="bench-tls")
    sock = str(b.tmp / "fixed-tls.sock")
    b.spawn_upstream("fixed", uds=sock)
    nginx_port, https_port = free_port(), free_port()
    nginx = start_nginx(b.reaper, b.tmp, nginx_port, sock, tls=(cert, key))
    forwarder_port = free_port()
    forwarder = start_forwarder(b.reaper, forwarder_port, sock, tls=(cert, key))
    say(f"## tls: phloem --tls files vs nginx terminating TLS, same certificate (ECDSA P-256,"
        f" {cert.name}) and settings, fixed upstream; wrk -t1 over https, {d:g} s per run, "
        f"{rounds} rounds interleaved, the order rotating (load average (1 min) "
        f"{os.getloadavg()[0]:.2f})")
    with platform_process(["--tls", "files", "--tls-cert", str(cert), "--tls-key", str(key),
                           "--https-port", str(https_port), "--http-port", str(free_port()),
                           "--max-connections-per-peer", "0"]) as p:
        fn = p.deploy("fixed", FIXED, "--limit", "max_isolates=1")
        host = host_of(fn["invocation_url"])
        assert p.proc is not None
        tls_ways = [Way("nginx", f"https://127.0.0.1:{nginx_port}/", "fixed.fn.localhost",
                        cpu=tree_cpu(nginx.pid)),
                    Way("phloem", f"https://127.0.0.1:{https_port}/", host,
                        cpu=own_cpu(p.proc.pid)),
                    # The floor of a Python proxy with Python's ssl (bench/apps/forwarder.py).
                    Way("forwarder", f"https://127.0.0.1:{forwarder_port}/",
                        "fixed.fn.localhost", cpu=own_cpu(forwarder.pid))]
        # For context, the same without TLS (runtime.py's plain nginx and platform): what
        # TLS adds to each, apart from the proxies' plain request paths.
        plain = {w.name: w for w in b.ways("fixed")}
        ways = [*tls_ways, *(replace(plain[n], name=f"{n}-http") for n in ("nginx", "phloem"))]
        say(f"   nginx  negotiated: {negotiated(nginx_port, ca.cert_path, 'fixed.fn.localhost')}")
        say(f"   phloem negotiated: {negotiated(https_port, ca.cert_path, host.split(':')[0])}")
        from _load import run_wrk

        for w in ways:  # the paths, the isolates and pooled upstream connections first
            # 32 connections: 256 new ones can take seconds to handshake on a loaded machine.
            r = run_wrk(w.url, connections=32, duration=1 if b.args.quick else 2, host=w.host)
            if r.errors or r.requests == 0:
                raise RuntimeError(f"{w.name} over https: {r.errors or 'no requests'}\n"
                                   f"{r.output}")
        say("   -- keep-alive throughput (req/s; CPU/req = the proxy's CPU / requests)")
        for conns in CONNECTIONS:
            say(f"   (load average (1 min) {os.getloadavg()[0]:.2f} before the {conns}-"
                "connection runs)")
            table = interleaved(ways, connections=conns, duration=d, rounds=rounds, say=say)
            results.tables[conns] = table
            report(table, subject="phloem",
                   against={"nginx": T_THROUGHPUT, "forwarder": math.nan}, say=say)
            report_floor(table, say)
            report(table, subject="phloem-http", against={"nginx-http": math.nan}, say=say)
            say(f"   {conns:>4} conns  CPU/req added by TLS (median, TLS - plain): "
                + "   ".join(f"{n} {_cpu_median(table, n) - _cpu_median(table, n + '-http'):+.1f}"
                           " us" for n in ("nginx", "phloem")))
        say(f"   -- new TLS connections per second: wrk -t1 -c{HANDSHAKE_CONNECTIONS} -H "
            "'Connection: close' (connect + TLS 1.3 resumption + 1 request + close each; the "
            "-http "
            "ways: the same without TLS)")
        handshakes(ways, duration=d, rounds=rounds, results=results, say=say)
    say("")
    return results


def summary_rows(r: TlsResults, rounds: int) -> list[str]:
    rows = []
    for conns, t in r.tables.items():
        ph, ng = t.median_rps("phloem"), t.median_rps("nginx")
        runs = "; ".join(f"{w} " + " / ".join(f"{x:,.0f}" for x in t.rps(w))
                         for w in ("phloem", "nginx", "forwarder"))
        per = " / ".join(f"{x:.2f}" for x in t.ratios("phloem", "nginx"))
        rows.append(f"| TLS throughput (https, keep-alive), fixed upstream, {conns} connections,"
                    f" median of {rounds} (req/s; runs: {runs}) | {ph:,.0f} | nginx "
                    f"{ng:,.0f} (same cert, TLS 1.3) | | {t.ratio('phloem', 'nginx'):.2f}x "
                    f"nginx (runs {per}); {floor_ratios(t)} | "
                    f">= {T_THROUGHPUT:g}x nginx |")
    if r.handshakes:
        ph_runs, ng_runs = r.handshakes["phloem"], r.handshakes["nginx"]
        hs_per = r.handshake_ratios()
        rows.append(
            f"| new TLS connections/s (wrk -c{HANDSHAKE_CONNECTIONS}, Connection: close, "
            f"resumed handshakes), median of {rounds} (runs: phloem "
            + " / ".join(f"{x.rps:,.0f}" for x in ph_runs) + "; nginx "
            + " / ".join(f"{x.rps:,.0f}" for x in ng_runs) + ") | "
            f"{statistics.median(x.rps for x in ph_runs):,.0f} | nginx "
            f"{statistics.median(x.rps for x in ng_runs):,.0f} | | "
            f"{statistics.median(hs_per):.2f}x nginx (runs "
            + " / ".join(f"{x:.2f}" for x in hs_per) + "); "
            f"{statistics.median(r.handshake_ratios('phloem', 'forwarder')):.2f}x the Python "
            f"floor (which is {statistics.median(r.handshake_ratios('forwarder', 'nginx')):.2f}x"
            f" nginx) | >= {T_HANDSHAKES:g}x nginx |")
    return rows
