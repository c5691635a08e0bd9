"""SIGKILL of ``phloem up`` at a random moment of writes, 10 rounds. After the restart:
every acknowledged object is there (each committed row), nothing half-made is visible, and
nothing of the killed run remains: no process (by pid and start time), isolate cgroup,
isolate socket file or half-made environment (tests/faults/killing.py)."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg

from phloem.testing import wait_for
from tests.faults.killing import ROUNDS, Killer, figure, in_background, serve


def test_kill_during_writes(killer: Killer, reliability: Any) -> None:
    p = killer.p
    url = p.cli("connection-string", "--unpooled").stdout.strip()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE writes (round int, n int, PRIMARY KEY (round, n))")
    passed, committed = 0, 0
    for r in range(ROUNDS):
        assert serve(p, "probe").status_code == 200
        acked: list[int] = []
        stop = threading.Event()

        def write(r: int = r, acked: list[int] = acked, stop: threading.Event = stop) -> None:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                n = 0
                while not stop.is_set():
                    if n % 10 == 9:  # some transactions of several rows
                        with conn.transaction():
                            for i in range(n, n + 5):
                                conn.execute("INSERT INTO writes VALUES (%s, %s)", (r, i))
                        acked.extend(range(n, n + 5))
                        n += 5
                    else:
                        conn.execute("INSERT INTO writes VALUES (%s, %s)", (r, n))
                        acked.append(n)
                        n += 1

        writer, _ = in_background(write)
        wait_for(lambda acked=acked: acked, 10, "the first acknowledged write")
        time.sleep(random.uniform(0.0, 0.5))  # the kill's moment, varied on purpose
        killer.kill_and_restart(databases_die=True)
        stop.set()
        writer.join(10)
        assert not writer.is_alive()
        with psycopg.connect(url) as conn:
            stored = {row[0] for row in conn.execute(
                "SELECT n FROM writes WHERE round = %s", (r,))}
        missing = set(acked) - stored
        assert not missing, f"round {r}: {len(missing)} committed rows lost"
        committed += len(acked)
        passed += 1
    reliability.record(rounds=ROUNDS, passed=passed,
                       figure=figure(killer, f"{committed} committed rows, 0 lost; "
                                     "PostgreSQL and PgBouncer gone "
                                     f"{max(killer.databases_down_s):.1f} s max after "
                                     "the kill, before any restart"))
