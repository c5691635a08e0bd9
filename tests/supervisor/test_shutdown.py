"""Platform shutdown gives ``wait_until`` work its budget, not just the SIGINT grace; a
second signal ends it at once."""

from __future__ import annotations

import signal
import time

import httpx
import psycopg

from phloem.testing import host_of, platform_process, processes_mentioning, wait_for
from tests.conftest import Reliability
from tests.supervisor.test_runtime import APP

GRACE_S = 2.0
WORK_S = 4.0  # twice the grace


def test_shutdown_waits_for_wait_until_work_beyond_the_grace(
        reliability: Reliability) -> None:
    with platform_process(["--grace", f"{GRACE_S:g}"]) as p:
        fn = p.deploy("later", APP)
        assert fn["status"] == "ready", fn
        db_url = p.cli("connection-string", "--unpooled").stdout.strip()
        with p.gateway(host_of(fn["invocation_url"])) as gw:
            resp = gw.get("/wait", params={"s": f"{WORK_S:g}", "tag": "at-shutdown"})
        assert resp.status_code == 202
        asked = time.monotonic()
        assert p.stop() == 0  # SIGINT right after the response
        took = time.monotonic() - asked
        out = "\n".join(p.output)
        # The work ran to its end with its database still up, then the app's shutdown.
        p.launch()
        p.wait_ready()
        with psycopg.connect(db_url) as conn:
            events = [r[0] for r in conn.execute(
                "SELECT event FROM runtime_events ORDER BY at")]
        assert events == ["background:at-shutdown", "shutdown"]
        assert "waiting for wait_until work of 1 isolate(s)" in out
        logs = p.cli("functions", "logs", "later").stdout
        assert "wait_until work pending at shutdown" in logs
        assert "SIGKILL" not in logs
        # Not a minute of it either: the platform exits once the work is done.
        assert WORK_S - 1 < took < WORK_S + GRACE_S + 30
        with httpx.Client() as client:  # and the restarted platform serves it again
            r = client.get(f"http://127.0.0.1:{p.gateway_port}/info",
                           headers={"Host": host_of(fn["invocation_url"])}, timeout=60)
        assert r.status_code == 200
    reliability.record(rounds=1, passed=1,
                       figure=f"{WORK_S:g} s of work done at shutdown with a {GRACE_S:g} s "
                              f"grace; stop took {took:.1f} s")


def test_second_signal_forces_exit_at_once() -> None:
    with platform_process() as p:
        fn = p.deploy("busy", APP)
        assert fn["status"] == "ready", fn
        with p.gateway(host_of(fn["invocation_url"])) as gw:  # a minute of work to wait for
            resp = gw.get("/wait", params={"s": "60", "tag": "forced"})
        assert resp.status_code == 202
        assert p.proc is not None
        p.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any("waiting for wait_until work" in line for line in p.output),
                 60, "the graceful stop to wait for the isolate's work")
        asked = time.monotonic()
        p.proc.send_signal(signal.SIGINT)
        assert p.proc.wait(30) == 130
        assert time.monotonic() - asked < 10
        wait_for(lambda: "forced exit" in "\n".join(p.output), 10, "the reader to see EOF")
        # Isolates were SIGKILLed; databases and poolers end with the process (lifeline).
        wait_for(lambda: processes_mentioning(str(p.data_dir)) == [], 20,
                 "every platform process to end")
