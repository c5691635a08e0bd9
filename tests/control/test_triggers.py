"""Schedule triggers on a running platform: declared through the API, fired now (``run``)
or by the scheduler's clock, delivered to a real function that records what it got."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool

from phloem.control.triggers import TriggerScheduler
from phloem.metadata.triggers import TriggerRow, TriggerStore
from phloem.testing import PlatformProcess, host_of, platform_process, wait_for

APP = Path(__file__).parent.parent / "apps" / "triggerprobe"
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
#: Crons no real minute of these tests matches, so the platform's own scheduler (real
#: clock) never fires them: the tests fire them now or with a clock of their own.
NEVER_NOW = "0 0 1 1 *"


@pytest.fixture(scope="module")
def probe(platform: PlatformProcess) -> Iterator[dict[str, Any]]:
    # One isolate: the /seen list is the one the trigger's POST landed in.
    fn: dict[str, Any] = platform.deploy("tprobe", APP, "--entry", "main:app",
                                         "--limit", "max_isolates=1")
    assert fn["status"] == "ready", fn
    yield fn
    # The session's platform is shared: leave main without these tests' triggers.
    with platform.api() as api:
        assert put_triggers(api, {}).status_code == 200


def put_triggers(api: httpx.Client, triggers: dict[str, Any],
                 branch: str = "main") -> httpx.Response:
    return api.put(f"/branches/{branch}/triggers", json={"triggers": triggers})


def finished_run(api: httpx.Client, name: str, run_id: str, timeout: float = 30,
                 branch: str = "main") -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        runs = api.get(f"/branches/{branch}/triggers/{name}/history").json()
        run = next((r for r in runs if r["id"] == run_id), None)
        return run if run and run["status"] != "running" else None
    found: dict[str, Any] = wait_for(done, timeout, f"run {run_id} of {name} to finish")
    return found


def seen(platform: PlatformProcess, probe: dict[str, Any]) -> list[dict[str, Any]]:
    with platform.gateway(host_of(probe["invocation_url"])) as gw:
        out: list[dict[str, Any]] = gw.get("/seen").json()
    return out


def test_run_now_delivers_body_and_headers(platform: PlatformProcess,
                                           probe: dict[str, Any]) -> None:
    """~2 s: the function gets the POST at functionPath with Neon's headers and body."""
    with platform.api() as api:
        declared = put_triggers(api, {"ping": {"function": "tprobe", "cron": NEVER_NOW,
                                               "functionPath": "/hook?x=1"}})
        assert declared.status_code == 200, declared.text
        assert [(t["name"], t["enabled"], t["functionPath"]) for t in declared.json()] == \
            [("ping", True, "/hook?x=1")]
        started = api.post("/branches/main/triggers/ping/run")
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        run = finished_run(api, "ping", run_id)
    assert (run["status"], run["attempts"], run["http_status"], run["reason"]) == \
        ("succeeded", 1, 200, "manual")
    got = [s for s in seen(platform, probe)
           if s["headers"].get("x-neon-invocation-id") == run_id]
    assert len(got) == 1
    req = got[0]
    assert (req["method"], req["path"]) == ("POST", "/hook")
    assert req["headers"]["x-neon-trigger"] == "ping"
    assert TRACEPARENT.match(req["headers"]["traceparent"])
    assert req["headers"]["content-type"] == "application/json"
    body = json.loads(req["body"])
    assert body["version"] == 1
    assert body["invocation_id"] == run_id
    assert body["trigger"] == {"name": "ping", "type": "schedule", "cron": NEVER_NOW}
    assert body["data"]["attempt"] == 1
    assert datetime.fromisoformat(body["data"]["scheduled_time"]).tzinfo is not None
    # The delivery is in the function's log, as a request through the gateway is.
    logs = platform.cli("functions", "logs", "tprobe").stdout
    assert f"invocation={run_id}" in logs


def test_retries_a_500_then_records_success(platform: PlatformProcess,
                                            probe: dict[str, Any]) -> None:
    """~3 s: the first attempt gets a 500, the retry (1 s later) a 200."""
    with platform.api() as api:
        assert put_triggers(api, {"flaky": {"function": "tprobe", "cron": NEVER_NOW,
                                            "functionPath": "/flaky"}}).status_code == 200
        run_id = api.post("/branches/main/triggers/flaky/run").json()["id"]
        run = finished_run(api, "flaky", run_id)
    assert (run["status"], run["attempts"], run["http_status"], run["error"]) == \
        ("succeeded", 2, 200, None)
    attempts = [s for s in seen(platform, probe)
                if s["headers"].get("x-neon-invocation-id") == run_id]
    # At least once: both attempts carry the same invocation id.
    assert [json.loads(a["body"])["data"]["attempt"] for a in attempts] == [1, 2]


def test_client_sent_x_neon_headers_are_stripped(platform: PlatformProcess,
                                                 probe: dict[str, Any]) -> None:
    """<1 s: a client cannot forge what the platform tells a function."""
    with platform.gateway(host_of(probe["invocation_url"])) as gw:
        sent = gw.post("/forged", content=b"{}", headers={
            "X-Neon-Invocation-Id": "inv-forged", "x-neon-trigger": "ping",
            "X-Neonish": "kept"})
        assert sent.status_code == 200
    forged = [s for s in seen(platform, probe) if s["path"] == "/forged"]
    assert len(forged) == 1
    headers = forged[0]["headers"]
    assert not [k for k in headers if k.startswith("x-neon-")], headers
    assert headers["x-neonish"] == "kept"


def test_bad_cron_is_refused_naming_the_field(platform: PlatformProcess) -> None:
    """<1 s."""
    with platform.api() as api:
        before = api.get("/branches/main/triggers").json()
        for spec, field, rule in [
            ({"function": "tprobe", "cron": "*/5 * * *"}, "triggers.bad.cron",
             "must have 5 fields"),
            ({"function": "tprobe", "cron": "61 * * * *"}, "triggers.bad.cron",
             "minute: 61 is out of range 0-59"),
            ({"function": "Bad Fn", "cron": "* * * * *"}, "triggers.bad.function",
             "must match ^[a-z0-9]{1,20}$"),
            ({"function": "tprobe", "cron": "* * * * *", "functionPath": "hook"},
             "triggers.bad.functionPath", "must match ^/"),
            ({"function": "tprobe", "cron": "* * * * *", "enabled": "yes"},
             "triggers.bad.enabled", "boolean"),
            ({"function": "tprobe", "cron": "* * * * *", "schedule": "x"},
             "triggers.bad.schedule", "Extra inputs are not permitted"),
        ]:
            refused = put_triggers(api, {"bad": spec})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert (error["code"], error["field"]) == ("invalid_input", field)
            assert rule in error["message"]
        bad_name = put_triggers(api, {"no spaces": {"function": "tprobe",
                                                   "cron": "* * * * *"}})
        assert bad_name.status_code == 400
        assert bad_name.json()["error"]["field"] == "triggers.no spaces"
        # Nothing was written.
        assert api.get("/branches/main/triggers").json() == before


def test_child_branch_inherits_triggers_disabled(platform: PlatformProcess,
                                                 probe: dict[str, Any]) -> None:
    """~5 s (a branch create)."""
    with platform.api() as api:
        assert put_triggers(api, {"nightly": {"function": "tprobe", "cron": "0 3 * * *",
                                              "functionPath": "/n"}}).status_code == 200
        created = api.post("/branches", json={"name": "trig-child", "parent": "main"})
        assert created.status_code == 201, created.text
        try:
            child = api.get("/branches/trig-child/triggers").json()
            assert [(t["name"], t["cron"], t["functionPath"], t["enabled"])
                    for t in child] == [("nightly", "0 3 * * *", "/n", False)]
            parent = api.get("/branches/main/triggers").json()
            assert [t["enabled"] for t in parent] == [True]
            enabled = api.post("/branches/trig-child/triggers/nightly/enable").json()
            assert enabled["enabled"] is True
        finally:
            api.delete("/branches/trig-child")


# -- the schedule: the scheduler with a clock the test moves -------------------------
async def test_schedule_fires_on_its_minute_and_disable_stops_it(
        platform: PlatformProcess, probe: dict[str, Any]) -> None:
    """~1 s: a scheduler over the platform's own system database and a clock of this
    test; what it fires is delivered by the platform (``run``'s path is the delivery
    tested above), so here the delivery is the platform API's history."""
    secret = json.loads((platform.data_dir / "secrets" / "system.json").read_text())
    conninfo = (f"host={platform.data_dir / 'run' / 'pg' / 'system'} port=5432 "
                f"user=postgres password={secret['superuser_password']} dbname=phloem")
    with platform.api() as api:
        assert put_triggers(api, {"tick": {"function": "tprobe",
                                           "cron": "30 10 15 6 *"}}).status_code == 200
        branch_id = api.get("/branches/main").json()["id"]
    now = datetime(2031, 6, 15, 10, 28, 40, tzinfo=UTC)
    delivered: list[tuple[str, str, datetime, int]] = []

    async def deliver(row: TriggerRow, run_id: str, scheduled_for: datetime,
                      attempt: int) -> int:
        delivered.append((row.name, run_id, scheduled_for, attempt))
        return 204

    async with AsyncConnectionPool(conninfo, min_size=1, max_size=2, open=False) as pool:
        store = TriggerStore(pool)
        ours = await store.get(branch_id, "tick")
        assert ours is not None
        scheduler = TriggerScheduler(store, deliver, clock=lambda: now)

        async def tick() -> list[str]:
            fired = await scheduler.tick()
            # Until every run it fired is finished in the history (what `phloem triggers
            # history` shows), within 10 s.
            async with asyncio.timeout(10):
                while any(run is not None and run.status == "running"
                          for run in [await store.get_run(r) for r in fired]):
                    await asyncio.sleep(0.01)
            return [r for r in fired if any(d[1] == r and d[0] == "tick" for d in delivered)]

        assert await tick() == []                     # first sight: starts from now
        now += timedelta(minutes=1)                   # 10:29:40
        assert await tick() == []
        now += timedelta(seconds=25)                  # 10:30:05: its minute
        fired = await tick()
        assert len(fired) == 1
        assert [d[2:] for d in delivered if d[1] == fired[0]] == \
            [(datetime(2031, 6, 15, 10, 30, tzinfo=UTC), 1)]
        (run,) = [r for r in await store.history(ours.id) if r.id == fired[0]]
        assert (run.status, run.reason, run.http_status) == ("succeeded", "schedule", 204)
        now += timedelta(seconds=20)                  # same minute: not again
        assert await tick() == []
        # Next year's minute, but disabled: nothing.
        with platform.api() as api:
            assert api.post("/branches/main/triggers/tick/disable").json()["enabled"] is False
        now = datetime(2032, 6, 15, 10, 29, 59, tzinfo=UTC)
        await tick()
        now += timedelta(minutes=2)
        assert await tick() == []
        await scheduler.stop()


def test_a_run_cut_by_a_stop_is_delivered_at_the_next_start() -> None:
    """~35 s (a platform of its own, started twice): at least once across a restart."""
    with platform_process() as p:
        fn = p.deploy("tprobe", APP, "--entry", "main:app")
        assert fn["status"] == "ready", fn
        with p.api() as api:
            assert put_triggers(api, {"slow": {"function": "tprobe", "cron": NEVER_NOW,
                                               "functionPath": "/slow"}}).status_code == 200
            run_id = api.post("/branches/main/triggers/slow/run").json()["id"]
        # The function answers 3 s after the POST reached it: stop inside that window (on
        # a loaded machine the delivery can come late, and a stop before it cuts nothing).
        wait_for(lambda: any(s["path"] == "/slow" for s in seen(p, fn)), 30,
                 "the /slow delivery to reach the function")
        assert p.stop() == 0
        p.launch()
        p.wait_ready()
        with p.api() as api:
            run = finished_run(api, "slow", run_id, timeout=60)
        assert (run["status"], run["http_status"]) == ("succeeded", 200)
        lines = [line for line in p.cli("functions", "logs", "tprobe").stdout.splitlines()
                 if f"invocation={run_id}" in line]
        # Cut (no status) by the stop, then delivered again and answered.
        assert [" POST /slow - " in line for line in lines] == [True, False], lines
        assert " POST /slow 200 " in lines[1]
