"""``phloem dev`` fires schedule triggers at the functions it serves: the platform's
request (headers, body) on the cron's minute, with a clock the test moves (no waiting for
a real minute). Runs the dev server in this process: no platform needed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from phloem.dev.server import DevServer
from phloem.metadata.triggers import TriggerSpec
from phloem.project.plan import DesiredFunction
from phloem.testing import free_port

APP = '''
import json, os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def hook(request):
    body = json.loads(await request.body())
    with open(os.environ["SEEN"], "a") as f:
        f.write(json.dumps({"headers": dict(request.headers), "body": body}) + "\\n")
    return PlainTextResponse("ok", status_code=202)

app = Starlette(routes=[Route("/hooks/tick", hook, methods=["POST"])])
'''


async def test_dev_fires_schedule_triggers(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "app.py").write_text(APP)
    seen = tmp_path / "seen.jsonl"
    want = DesiredFunction(slug="tick", name="tick", entry="app:app", runtime="python",
                           env={"SEEN": str(seen)}, limits={})
    now = [datetime(2026, 12, 1, 9, 7, 30, tzinfo=UTC)]
    server = DevServer(root, {"tick": want}, "br-dev", {}, port=free_port(),
                       say=lambda _line: None, triggers=[
                           TriggerSpec("every5", "tick", "*/5 * * * *", "/hooks/tick"),
                           TriggerSpec("off", "tick", "* * * * *", "/hooks/tick",
                                       enabled=False),
                           TriggerSpec("elsewhere", "other", "* * * * *")])
    server.triggers.set_clock(lambda: now[0])
    await server.start()
    try:
        assert [t.name for t in server.triggers.specs] == ["every5"]
        assert await server.triggers.tick() == {}  # 09:07: not yet
        now[0] += timedelta(minutes=3)  # 09:10:30
        assert await server.triggers.tick() == {"every5": 202}
        assert await server.triggers.tick() == {}  # once per minute due
    finally:
        await server.stop()
    [got] = [json.loads(line) for line in seen.read_text().splitlines()]
    headers, body = got["headers"], got["body"]
    assert headers["x-neon-trigger"] == "every5"
    assert headers["x-neon-invocation-id"] == body["invocation_id"]
    assert headers["traceparent"].startswith("00-")
    assert body["trigger"] == {"name": "every5", "type": "schedule", "cron": "*/5 * * * *"}
    assert body["data"] == {"scheduled_time": "2026-12-01T09:10:00Z", "attempt": 1}
