"""``phloem up`` as a process: start, stop with SIGINT leaving nothing behind, restart
with everything back, clear errors; and the same lifecycle in a test's own loop
(``running_platform``)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess

import httpx
import psycopg
import pytest

from phloem.project.client import Client
from phloem.server.leftovers import stop_processes
from phloem.system.settings import Settings
from phloem.testing import (
    EXAMPLE,
    PHLOEM,
    PlatformProcess,
    db_port_base,
    free_port,
    host_of,
    new_data_dir,
    pick_isolate_uid_base,
    platform_process,
    processes_mentioning,
    refused_start,
    running_platform,
    wait_for,
    wait_for_async,
)
from tests.supervisor.test_runtime import APP


def test_restart_brings_back_branches_and_deployments() -> None:
    with platform_process(["--deploy", str(EXAMPLE)]) as p:
        out = "\n".join(p.output)
        fn = p.cli_json("functions", "get", "hellopython")
        url = fn["invocation_url"]
        assert url in out  # `up --deploy` prints the URL ...
        assert f"curl -H 'Host: {host_of(url)}' http://127.0.0.1:{p.gateway_port}/" in out
        with p.gateway(host_of(url)) as gw:
            assert gw.get("/").status_code == 200
            assert gw.post("/todos", json={"title": "survive restart"}).status_code == 201
        db_url = p.cli("connection-string", "--unpooled").stdout.strip()

        assert p.stop() == 0
        # Nothing is left running: no postgres, no isolate.
        assert processes_mentioning(str(p.data_dir)) == []
        # The isolate ran its lifespan shutdown on SIGINT before the database stopped.
        p.launch()
        p.wait_ready()
        with psycopg.connect(db_url) as conn:
            events = [r[0] for r in conn.execute("SELECT event FROM lifecycle_events ORDER BY id")]
        assert events[:2] == ["startup", "shutdown"]
        with p.gateway(host_of(url)) as gw:
            titles = [t["title"] for t in gw.get("/todos").json()]
        assert titles == ["survive restart"]
        assert p.cli_json("functions", "get", "hellopython")["deployment_id"] == \
            fn["deployment_id"]


def test_port_in_use_is_a_clear_error() -> None:
    data_dir = new_data_dir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = PlatformProcess(data_dir, free_port(), port)
        proc = subprocess.run(p.args(), env=p.env, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode != 0
    assert f"gateway_port: 127.0.0.1:{port} is already in use" in " ".join(
        (proc.stderr + proc.stdout).split())
    assert processes_mentioning(str(data_dir)) == []


def test_an_address_not_of_this_machine_is_refused_by_name() -> None:
    # --listen (PHLOEM_GATEWAY_HOST) of a public service, mistyped: 192.0.2.1 (TEST-NET-1)
    # is on no interface here. Refused before anything is made, naming the setting.
    assert ("gateway_host: 192.0.2.1 is not an address of this machine" in
            refused_start({"PHLOEM_GATEWAY_HOST": "192.0.2.1"}))
    assert ("api_listen: 192.0.2.1 is not an address of this machine" in
            refused_start({"PHLOEM_API_LISTEN": "192.0.2.1:18789"}))


@pytest.mark.parametrize(("env", "message"), [
    ({"PHLOEM_TRUSTED_PROXIES": "10.0.0.0/8 10.0.0.300/8"},
     "trusted_proxies: '10.0.0.300/8' is not an IP address or a network in CIDR notation"),
    ({"PHLOEM_TRUSTED_PROXIES": "192.168.1.7/24"},
     "trusted_proxies: '192.168.1.7/24' is not an IP address or a network in CIDR notation "
     "without host bits"),
    ({"PHLOEM_METRICS_TOKEN": "short"}, "metrics_token: must be 16-512 characters (got 5)"),
    ({"PHLOEM_METRICS_TOKEN": "sixteen chars or more"},
     "metrics_token: may contain only letters, digits and -._~+/"),
])
def test_bad_security_settings_are_refused_by_name(env: dict[str, str], message: str) -> None:
    assert message in refused_start(env)


def test_second_platform_on_same_data_dir_is_refused(platform: PlatformProcess) -> None:
    other = PlatformProcess(platform.data_dir, free_port(), free_port())
    proc = subprocess.run(other.args(), env=other.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "another phloem is running" in proc.stderr + proc.stdout


def test_cli_without_platform_says_what_to_do() -> None:
    data_dir = new_data_dir()
    proc = subprocess.run([PHLOEM, "functions", "list"], capture_output=True, text=True,
                          env={"PHLOEM_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "phloem up" in proc.stderr


def test_sigint_during_requests_stops_cleanly() -> None:
    with platform_process() as p:
        fn = p.deploy("hello", EXAMPLE)
        with p.gateway(host_of(fn["invocation_url"])) as gw:
            assert gw.get("/").status_code == 200
        pids = [pid for pid, _ in processes_mentioning(str(p.data_dir))]
        assert pids
        assert p.stop() == 0
        wait_for(lambda: processes_mentioning(str(p.data_dir)) == [], 10,
                 "every platform process to exit")


async def test_running_platform_serves_then_drains_on_stop() -> None:
    """``Platform.serve`` in this loop, as ``phloem up`` runs it: a deploy answers; a
    stop lets the request in flight finish, then closes the gateway and ends every
    process of the platform."""
    data_dir = new_data_dir()
    settings = Settings(data_dir=data_dir, api_port=free_port(), gateway_port=free_port(),
                        pg_port_base=db_port_base(), eviction_grace_s=5.0,
                        isolate_uid_base=pick_isolate_uid_base())
    try:
        async with running_platform(settings) as platform:
            gateway = platform.running.gateway
            client = Client.from_environment(data_dir)
            dep = await asyncio.to_thread(client.deploy, "main", "slow", APP, "main:app")
            assert dep["status"] == "ready", dep
            fn = await asyncio.to_thread(client.get_function, "main", "slow")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}",
                                         headers={"Host": host_of(fn["invocation_url"])},
                                         timeout=60) as gw:
                assert (await gw.get("/info")).status_code == 200
                slow = asyncio.create_task(gw.get("/slow", params={"s": "2"}))
                await wait_for_async(lambda: gateway.inflight == 1, 30,
                                     "the slow request to be in flight")
                platform.request_stop()
                await wait_for_async(lambda: gateway.draining, 10, "the gateway to drain")
                assert (await slow).status_code == 200  # drained, not cut
            await platform.wait_stopped()
            assert not gateway.serving
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{gateway.port}/", timeout=5)
        assert processes_mentioning(str(data_dir)) == []
    finally:
        stop_processes(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
