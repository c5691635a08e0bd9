"""SIGKILL of ``phloem up`` at a random moment of deploys, 10 rounds. After the restart:
every acknowledged object is there (each deployment whose deploy returned ready), nothing
half-made is visible, and nothing of the killed run remains: no process (by pid and start
time), isolate cgroup, isolate socket file or half-made environment
(tests/faults/killing.py)."""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path
from typing import Any

from phloem.project.client import Client, ClientError
from tests.faults.killing import (
    GROW,
    ROUNDS,
    Killer,
    api,
    figure,
    in_background,
    serve,
    timed,
)

APP = '''\
ROUND = {round}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({{"type": msg["type"] + ".complete"}})
            if msg["type"] == "lifespan.shutdown":
                return
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": f"round {{ROUND}}".encode()}})
'''


def test_kill_during_deploys(killer: Killer, reliability: Any, tmp_path: Path) -> None:
    p = killer.p
    passed, acknowledged = 0, 0
    #: Round and id of the last deployment whose deploy returned.
    last: tuple[int, str] | None = None
    # Kills fall anywhere in a deploy's span (and a bit after: some deploys finish).
    warm = tmp_path / "warm"
    warm.mkdir()
    (warm / "main.py").write_text(APP.format(round=-1))
    (warm / "requirements.txt").write_text("six\n# warm-up\n")
    with api(p) as client:
        client.deploy("main", "warm", warm, "main:app")  # fills the pip cache
        (warm / "requirements.txt").write_text("six\n# warm-up 2\n")
        window = 2 * timed(lambda: client.deploy("main", "warm", warm, "main:app"))
    for r in range(ROUNDS):
        app = tmp_path / f"r{r}"
        app.mkdir()
        (app / "main.py").write_text(APP.format(round=r))
        # A new dependency environment each round: a kill during pip leaves a .tmp-*.
        (app / "requirements.txt").write_text(f"six\n# round {r}\n")
        client = Client.from_environment(p.data_dir)
        deployer, result = in_background(
            functools.partial(client.deploy, "main", "dep", app, "main:app"))
        time.sleep(random.uniform(0.0, window))
        killer.kill_and_restart()
        deployer.join(30)
        assert not deployer.is_alive()
        client.close()
        dep = result.get("value")
        if dep is not None and dep["status"] == "failed":
            # Its last poll came after the restart: the build was cut short, and it says so.
            assert "interrupted by a platform restart" in dep["error"], dep
        elif dep is not None:
            assert dep["status"] == "ready", dep
            acknowledged += 1
            last = (r, dep["id"])
        else:
            assert isinstance(result["error"], ClientError), result
            window *= GROW  # the machine got slower than the warm-up: let some finish
        if last is None:
            passed += 1
            continue
        with api(p) as client:
            fn = client.get_function("main", "dep")
            active = client.get_deployment(fn["deployment_id"])
        # The last acknowledged deployment, or a later one that finished whole.
        assert active["status"] == "ready", active
        assert (p.data_dir / "deployments" / active["id"]).is_dir()
        served = serve(p, "dep")
        assert served.status_code == 200 and served.text.startswith("round ")
        served_round = int(served.text.split()[1])
        if active["id"] == last[1]:
            assert served_round == last[0]
        else:
            assert last[0] < served_round <= r
        passed += 1
    assert acknowledged > 0, "no deploy finished before its kill: the delays are too short"
    reliability.record(rounds=ROUNDS, passed=passed,
                       figure=figure(killer, f"{acknowledged} acknowledged deployments, "
                                             "0 lost, 0 half-made"))
