"""Cold start: first-request latency of examples/hello-python through phloem, beside the
time to spawn the same app with bare uvicorn and get its first response.

    .venv/bin/python bench/cold_start.py [--runs 10]

Each phloem run deploys a fresh deployment (a changed env var, same artifact and cached
environment) so the next request finds no live isolate; the time measured is from sending
that request to receiving the whole response, as a client sees it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from phloem.testing import EXAMPLE, PlatformProcess, host_of, platform_process


def phloem_cold_start(p: PlatformProcess, run: int) -> float:
    fn = p.deploy("cold", EXAMPLE, "--env", f"RUN={run}")
    with p.gateway(host_of(fn["invocation_url"])) as gw:
        t0 = time.perf_counter()
        resp = gw.get("/")
        elapsed = time.perf_counter() - t0
        assert resp.status_code == 200, resp.text
    return elapsed


def bare_uvicorn_cold_start(database_url: str) -> float:
    """Spawn uvicorn on a Unix socket and poll until the first response arrives."""
    env = {**os.environ, "DATABASE_URL": database_url}
    with tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "app.sock")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--uds", sock, "--loop", "uvloop",
             "--http", "httptools", "--log-level", "warning"],
            cwd=EXAMPLE, env=env)
        try:
            transport = httpx.HTTPTransport(uds=sock)
            with httpx.Client(transport=transport, base_url="http://app") as client:
                while True:
                    try:
                        resp = client.get("/")
                        break
                    except (OSError, httpx.ConnectError):
                        time.sleep(0.002)
            elapsed = time.perf_counter() - t0
            assert resp.status_code == 200
        finally:
            proc.terminate()
            proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    phloem: list[float] = []
    bare: list[float] = []
    with platform_process() as p:
        db_url = p.cli("connection-string").stdout.strip()
        for run in range(args.runs):  # interleaved, so drift hits both alike
            phloem.append(phloem_cold_start(p, run))
            bare.append(bare_uvicorn_cold_start(db_url))
    p50, b50 = statistics.median(phloem), statistics.median(bare)
    print(f"cold start, examples/hello-python, median of {args.runs}")
    print(f"  phloem (request -> response, isolate spawned)  {p50 * 1000:8.1f} ms")
    print(f"  bare uvicorn (spawn -> first response)          {b50 * 1000:8.1f} ms")
    print(f"  ratio phloem / bare uvicorn                     {p50 / b50:8.2f}")


if __name__ == "__main__":
    main()
