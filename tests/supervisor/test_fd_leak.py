"""Descriptors of ``phloem up`` after isolates exit: an exited isolate's pipes (stdout,
stderr, status) are all closed, whether it was killed (``kill -9``) or retired by a
redeploy. The soak bench (bench/soak.py) found two pipes left open per exited isolate:
the stdout and stderr of isolates forked from the Python zygote, whose transports uvloop
keeps open at EOF (issue 11).

Its own platform: the count must not move with other tests' isolates."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from phloem.testing import host_of, platform_process, wait_for
from tests.conftest import Reliability

APP = Path(__file__).parent.parent / "apps" / "fdleak"
ROUNDS = 5  # kills, and as many redeploys
SLACK = 1  # pipes above the baseline still taken as "back to it"
SETTLE_S = 5.0  # for an exited isolate's pipes to be closed


def pipes(pid: int) -> int:
    """Pipes open in process ``pid``."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return count


def test_exited_isolates_leave_no_pipes(reliability: Reliability) -> None:
    started = time.monotonic()
    with platform_process() as p:
        assert p.proc is not None
        platform_pid = p.proc.pid
        fn = p.deploy("fdleak", APP, "--limit", "max_isolates=1")
        host = host_of(fn["invocation_url"])
        with p.api() as api, p.gateway(host, timeout=30) as gw:

            def serving() -> dict[str, Any]:
                """The isolate that answers ``GET /`` now, as ``/status`` lists it."""
                resp = gw.get("/")
                assert resp.status_code == 200, resp.text
                [iso] = [i for i in api.get("/status").json()["isolates"]
                         if i["id"] == resp.text]
                assert iso["pid"]
                return iso

            current = serving()
            baseline = pipes(platform_pid)
            counts: list[int] = []
            leaking = False
            for n in range(2 * ROUNDS):
                if n % 2 == 0:
                    os.kill(current["pid"], signal.SIGKILL)
                else:
                    p.deploy("fdleak", APP, "--limit", "max_isolates=1", "--env",
                             f"ROUND={n}")
                proc_dir = f"/proc/{current['pid']}"
                wait_for(lambda d=proc_dir: not os.path.exists(d), 30,
                         f"isolate {current['id']} to exit")
                replacement = serving()
                assert replacement["id"] != current["id"]
                current = replacement
                # Once a round has shown the leak the others only measure it (bounded).
                deadline = time.monotonic() + (0 if leaking else SETTLE_S)
                while (count := pipes(platform_pid)) > baseline + SLACK \
                        and time.monotonic() < deadline:
                    time.sleep(0.05)
                leaking = count > baseline + SLACK
                counts.append(count)
    passed = sum(c <= baseline + SLACK for c in counts)
    reliability.record(rounds=len(counts), passed=passed,
                       figure=f"pipes of phloem up {baseline} -> {counts[-1]} after "
                              f"{ROUNDS} kill -9 + {ROUNDS} redeploys (max {max(counts)})")
    assert passed == len(counts), (
        f"pipes of phloem up: {baseline} with one isolate, then {counts} after each "
        f"isolate killed (even rounds) or retired by a redeploy (odd); took "
        f"{time.monotonic() - started:.0f} s")
