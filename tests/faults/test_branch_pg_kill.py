"""A branch's PostgreSQL killed (kill -9 of its postmaster) under a running function:
the platform restarts it (crash recovery), PgBouncer reconnects, and the function answers
200 again without a redeploy, with every committed row still there. Its PgBouncer, or
the system database, killed: restarted as well."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psycopg

from phloem.system import procfs
from phloem.testing import EXAMPLE, host_of, platform_process, wait_for

ROUNDS = 5
#: From the kill to the function's next 200.
DEADLINE_S = 15.0


def postmaster(pgdata: Path) -> int:
    pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    assert procfs.exe_name(pid) == "postgres" and procfs.cwd_of(pid) == pgdata.resolve()
    return pid


def test_branch_postgres_killed_recovers(reliability) -> None:  # type: ignore[no-untyped-def]
    with platform_process() as p:
        p.deploy("pgkill", EXAMPLE)
        host = host_of(p.cli_json("functions", "get", "pgkill")["invocation_url"])
        main = p.cli_json("branches", "get", "main")
        pgdata = p.data_dir / "branches" / main["id"] / "pgdata"
        db_url = p.cli("connection-string", "--unpooled").stdout.strip()
        passed, recoveries = 0, []
        with p.gateway(host, timeout=10) as gw:
            assert gw.post("/todos", json={"title": "before"}).status_code == 201

            def answers() -> bool:
                try:
                    return gw.get("/todos").status_code == 200
                except httpx.HTTPError:
                    return False

            for n in range(ROUNDS):
                old = postmaster(pgdata)
                assert gw.get("/todos").status_code == 200
                os.kill(old, signal.SIGKILL)
                killed = time.monotonic()

                def restarted(old: int = old) -> int | None:
                    try:
                        pid = postmaster(pgdata)
                    except (OSError, ValueError, AssertionError):
                        return None
                    return pid if pid != old else None

                # (Backends of the killed postmaster may still answer for a moment.)
                new = wait_for(restarted, DEADLINE_S, f"round {n}: a new postmaster",
                               interval=0.01)
                wait_for(answers, DEADLINE_S, f"round {n}: the function to answer 200 again",
                         interval=0.02)
                recoveries.append(time.monotonic() - killed)
                assert not procfs.alive(old) and postmaster(pgdata) == new
                titles = [t["title"] for t in gw.get("/todos").json()]
                assert titles[0] == "before" and len(titles) == n + 1
                # Writes work again, through the pooler (the function) and directly.
                assert gw.post("/todos", json={"title": f"after {n}"}).status_code == 201
                with psycopg.connect(db_url, connect_timeout=5) as conn:
                    assert conn.execute("SELECT count(*) FROM todos").fetchone() == (n + 2,)
                passed += 1
            # Its PgBouncer killed: restarted too, and the function's pool reconnects.
            bouncer = int((pgdata.parent / "pgbouncer" / "pgbouncer.pid").read_text())
            assert procfs.exe_name(bouncer) == "pgbouncer"
            os.kill(bouncer, signal.SIGKILL)
            wait_for(lambda: procfs.alive(int((pgdata.parent / "pgbouncer" / "pgbouncer.pid")
                                               .read_text() or 0)), DEADLINE_S,
                     "a new pgbouncer", interval=0.01)
            wait_for(answers, DEADLINE_S, "the function to answer 200 after the pgbouncer kill",
                     interval=0.02)
            assert gw.post("/todos", json={"title": "after pgbouncer"}).status_code == 201
            # The system database killed: restarted, and the API answers again.
            system = p.data_dir / "system" / "pgdata"
            os.kill(postmaster(system), signal.SIGKILL)

            def api_answers() -> bool:
                with p.api() as api:
                    return api.get("/branches/main/functions/pgkill").status_code == 200

            wait_for(lambda: postmaster(system), DEADLINE_S, "a new system postmaster")
            wait_for(api_answers, DEADLINE_S, "the API to answer again", interval=0.05)
            assert answers()
        assert any("PgBouncer exited unexpectedly" in line for line in p.output)
        assert any("system database: PostgreSQL exited" in line for line in p.output)
        # The function was never redeployed; the restarts were said.
        assert len(p.cli_json("functions", "get", "pgkill")["deployment_id"]) > 0
        assert sum("branch" in line and "PostgreSQL exited unexpectedly" in line
                   for line in p.output) == ROUNDS
    reliability.record(rounds=ROUNDS, passed=passed,
                       figure=f"200 again {max(recoveries) * 1000:.0f} ms max after kill -9 "
                              "of the branch's postmaster")
