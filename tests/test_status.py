"""``phloem status`` reports what is really running: stop one component of a running
platform (SIGSTOP or SIGKILL of its PostgreSQL or PgBouncer) and see it ``down``, with a
non-zero exit, within the probe timeout; resume it and see it back."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from phloem.server.health import PROBE_TIMEOUT_S
from phloem.testing import PlatformProcess, platform_process, wait_for
from tests.conftest import Reliability

APP = Path(__file__).parent / "apps" / "envprobe"
#: The API round trip and the fast probes, on a loaded 2-core machine.
SLACK_S = 2.0


@pytest.fixture(scope="module")
def plat() -> Iterator[PlatformProcess]:
    with platform_process() as p:
        yield p


def status(p: PlatformProcess) -> tuple[int, dict[str, Any], str]:
    """Exit code, the JSON and stderr of ``phloem status -o json``."""
    proc = p.cli("status", "--output", "json", check=False, timeout=60)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def timed_status(p: PlatformProcess) -> tuple[float, dict[str, Any]]:
    """Seconds the status request took (the CLI's own start left out) and its JSON."""
    with p.api() as api:
        started = time.monotonic()
        resp = api.get("/status")
        took = time.monotonic() - started
    assert resp.status_code == 200, resp.text
    return took, resp.json()


def main_branch(data: dict[str, Any]) -> dict[str, Any]:
    return next(b for b in data["branches"] if b["name"] == "main")


def cluster_pids(pgdata: Path) -> list[int]:
    """The postmaster of ``pgdata`` first, then its children (the backends)."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


@contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` (in order: a postmaster before the children it could fork) and
    SIGCONT them on the way out, whatever happens."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def healthy(p: PlatformProcess) -> dict[str, Any] | None:
    code, data, _ = status(p)
    return data if code == 0 else None


def test_status_reports_each_component_running(plat: PlatformProcess) -> None:
    fn = plat.deploy("probe", APP)
    with plat.gateway(fn["invocation_url"].split("://", 1)[1]) as gw:
        assert gw.get("/").status_code == 200
    code, data, stderr = status(plat)
    assert code == 0, stderr
    assert data["healthy"] is True and data["down"] == []
    c = data["components"]
    assert c["system_database"]["state"] == "running"
    assert c["system_database"]["probe_ms"] < PROBE_TIMEOUT_S * 1000
    assert c["api"]["state"] == "running"
    assert c["gateway"]["state"] == "running"
    assert c["gateway"]["address"].endswith(f":{plat.gateway_port}")
    assert c["supervisor"]["state"] == "running"
    assert c["supervisor"]["isolates"] == len(data["isolates"]) >= 1
    assert data["branches_listed"] == "now"
    main = main_branch(data)
    assert (main["database"], main["pooler"]) == ("running", "running")
    text = plat.cli("status").stdout
    assert "gateway" in text and "branch main" in text


def test_branch_database_and_pooler_stopped_are_down(plat: PlatformProcess,
                                                    reliability: Reliability) -> None:
    main = main_branch(timed_status(plat)[1])
    pgdata = plat.data_dir / "branches" / main["id"] / "pgdata"
    with stopped(cluster_pids(pgdata)):
        took, timed = timed_status(plat)
        code, data, stderr = status(plat)
    assert main_branch(timed)["database"] == "down"
    assert code == 1
    got = main_branch(data)
    assert (got["database"], got["pooler"]) == ("down", "down")
    assert "no answer within" in got["database_probe"]["error"]
    assert "down: branch main database, branch main pooler" in " ".join(stderr.split())
    assert data["components"]["system_database"]["state"] == "running"
    assert took < PROBE_TIMEOUT_S + SLACK_S
    back = wait_for(lambda: healthy(plat), 20, "the branch to answer again")
    assert main_branch(back)["database"] == "running"
    reliability.record(rounds=1, passed=1,
                       figure=f"branch database down reported in {took:.1f} s")


def test_system_database_stopped_is_down_within_probe_timeout(
        plat: PlatformProcess, reliability: Reliability) -> None:
    pgdata = plat.data_dir / "system" / "pgdata"
    rounds, took_max = 3, 0.0
    for _ in range(rounds):
        with stopped(cluster_pids(pgdata)):
            took, timed = timed_status(plat)
            code, data, stderr = status(plat)
        took_max = max(took_max, took)
        assert timed["components"]["system_database"]["state"] == "down"
        assert code == 1, data
        system = data["components"]["system_database"]
        assert system["state"] == "down"
        assert system["error"] == f"no answer within {PROBE_TIMEOUT_S:g} s"
        assert data["down"] == ["system_database"]
        assert "down: system_database" in stderr
        # The branches still show, as last listed, and their databases still answer.
        assert data["branches_listed"] == "cache"
        assert main_branch(data)["database"] == "running"
        assert took < PROBE_TIMEOUT_S + SLACK_S
        back = wait_for(lambda: healthy(plat), 30, "the system database to answer again")
        assert back["components"]["system_database"]["state"] == "running"
    reliability.record(rounds=rounds, passed=rounds,
                       figure=f"down within {took_max:.1f} s (probe timeout "
                              f"{PROBE_TIMEOUT_S:g} s)")


def test_stopped_pooler_is_down_and_a_killed_one_comes_back(
        plat: PlatformProcess, reliability: Reliability) -> None:
    main = main_branch(timed_status(plat)[1])
    pid_file = plat.data_dir / "branches" / main["id"] / "pgbouncer" / "pgbouncer.pid"
    pid = int(pid_file.read_text().strip())
    # A stopped PgBouncer is alive (the branch manager leaves it be) but answers nothing.
    os.kill(pid, signal.SIGSTOP)
    try:
        took, timed = timed_status(plat)
        assert main_branch(timed)["pooler"] == "down"
        code, data, stderr = status(plat)
        assert code == 1
        got = main_branch(data)
        assert (got["database"], got["pooler"]) == ("running", "down")
        assert data["down"] == ["branch main pooler"]
        assert "down: branch main pooler" in stderr
        assert "pooler down" in plat.cli("status", check=False).stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    back = wait_for(lambda: healthy(plat), 30, "the pooler to answer again")
    assert main_branch(back)["pooler"] == "running"
    # A killed one is started again by the platform, without a restart of phloem up.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid_file.exists() and int(pid_file.read_text().strip() or 0) != pid,
             30, "a new PgBouncer")
    back = wait_for(lambda: healthy(plat), 30, "the new pooler to answer")
    assert main_branch(back)["pooler"] == "running"
    reliability.record(rounds=1, passed=1, figure=f"pooler down reported in {took:.1f} s")


def test_status_without_a_platform_exits_non_zero(plat: PlatformProcess) -> None:
    # Last in this module: the platform stays stopped.
    assert plat.stop() == 0
    proc = plat.cli("status", check=False, timeout=60)
    assert proc.returncode == 1
    assert "error:" in proc.stderr
