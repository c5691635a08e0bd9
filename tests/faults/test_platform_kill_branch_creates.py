"""SIGKILL of ``phloem up`` at a random moment of branch creates, 10 rounds. After the
restart: every acknowledged object is there (each branch whose create returned), nothing
half-made is visible, and nothing of the killed run remains: no process (by pid and start
time), isolate cgroup, isolate socket file or half-made environment
(tests/faults/killing.py)."""

from __future__ import annotations

import functools
import os
import random
import time
from typing import Any

import psycopg

from phloem.project.client import Client, ClientError
from tests.faults.killing import GROW, ROUNDS, Killer, api, figure, in_background, timed


def test_kill_during_branch_creates(killer: Killer, reliability: Any) -> None:
    p = killer.p
    url = p.cli("connection-string", "--unpooled").stdout.strip()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE filler AS SELECT g, md5(g::text) v "
                     "FROM generate_series(1, 100000) g")
    passed, acknowledged = 0, 0
    with api(p) as client:
        window = 2 * timed(lambda: client.create_branch("warm", "main"))
        client.delete_branch("warm")
    for r in range(ROUNDS):
        name = f"kill-{r}"
        client = Client.from_environment(p.data_dir)
        creator, result = in_background(functools.partial(client.create_branch, name, "main"))
        time.sleep(random.uniform(0.0, window))
        killer.kill_and_restart()
        creator.join(30)
        assert not creator.is_alive()
        client.close()
        with api(p) as client:
            branches = {b["name"]: b for b in client.list_branches()}
            # Nothing half-made: every branch is whole, every branch directory a branch's.
            assert all(b["state"] == "ready" for b in branches.values()), branches
            ids = {b["id"] for b in branches.values()}
            assert set(os.listdir(p.data_dir / "branches")) == ids
            if "value" in result:
                acknowledged += 1
                assert name in branches and branches[name]["id"] == result["value"]["id"]
            else:
                assert isinstance(result["error"], ClientError), result
                window *= GROW  # the machine got slower than the warm-up: let some finish
            if name in branches:  # acknowledged, or finished before the kill: whole
                child = client.connection_string(name, pooled=False)
                with psycopg.connect(child, connect_timeout=10) as conn:
                    assert conn.execute("SELECT count(*) FROM filler").fetchone() == (100000,)
                client.delete_branch(name)  # keeps the next restarts short
        passed += 1
    assert acknowledged > 0, "no create finished before its kill: the delays are too short"
    reliability.record(rounds=ROUNDS, passed=passed,
                       figure=figure(killer, f"{acknowledged} acknowledged branch creates, "
                                             "0 lost, 0 half-made"))
