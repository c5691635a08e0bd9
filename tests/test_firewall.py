"""Network rules for isolates and builds, against real platforms and real nftables rules:
a deployed function tries TCP connections from inside its isolate and reports how each
went; the test process checks every refused target is really listening (a refusal that
only the rules can explain)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phloem.firewall import ConfinedUids, NftablesFirewall, find_nft, table_name
from phloem.firewall.nftables import render_table
from phloem.system.identity import build_uid
from phloem.testing import (
    PlatformProcess,
    free_port,
    host_of,
    new_data_dir,
    pick_isolate_uid_base,
    platform_process,
)

APPS = Path(__file__).parent / "apps"
NFT = find_nft()

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network rules on isolate uids need root "
                                                 "(isolates run as phloem's own user "
                                                 "otherwise)"),
    pytest.mark.skipif(NFT is None, reason="nft not found (Debian's nftables package)"),
]

#: A refusal by a rule arrives at once; a timeout would mean a drop or no route.
FAST_MS = 1000


# -- helpers -----------------------------------------------------------------------
def nft(*args: str) -> str:
    assert NFT is not None
    return subprocess.run([NFT, *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def tables() -> list[str]:
    return [line.split()[-1] for line in nft("list", "tables").splitlines()]


def function_ports(table: str) -> set[tuple[int, int]]:
    """The (uid, port) elements of the table's allow set."""
    data = json.loads(nft("-j", "list", "set", "inet", table, "function_ports"))
    found = set()
    for item in data["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            uid, port = elem["concat"]
            found.add((int(uid), int(port)))
    return found


def host_addresses() -> list[str]:
    """The machine's own global addresses (not loopback, not link-local)."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    out = subprocess.run([ip, "-j", "addr", "show"], capture_output=True, text=True,
                         check=False).stdout
    addrs = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            if a.get("scope") == "global" and not a["local"].startswith("127."):
                addrs.append(a["local"])
    return addrs


def connects_from_here(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


class Listener:
    """A TCP listener of the test process on every IPv4 and IPv6 address: 'anything else
    listening locally'."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def probe(platform: PlatformProcess, host: str, targets: list[tuple[str, int]],
          timeout: float = 3) -> dict[tuple[str, int], dict[str, Any]]:
    """Connect from inside the function's isolate; (host, port) -> result."""
    with platform.gateway(host) as gw:
        r = gw.post("/", json={"targets": targets, "timeout": timeout})
    assert r.status_code == 200, r.text
    return {(x["host"], x["port"]): x for x in r.json()["results"]}


def probe_uid(platform: PlatformProcess, host: str) -> int:
    with platform.gateway(host) as gw:
        return int(gw.post("/", json={"targets": []}).json()["uid"])


def branch_status(platform: PlatformProcess, name: str) -> dict[str, Any]:
    return next(b for b in platform.cli_json("status")["branches"] if b["name"] == name)


def assert_refused(results: dict[tuple[str, int], dict[str, Any]],
                   targets: list[tuple[str, int]]) -> None:
    for t in targets:
        assert connects_from_here(*t), f"{t} must be listening for the check to mean much"
        got = results[t]
        assert got["result"] == "refused" and got["ms"] < FAST_MS, (t, got)


# -- the nftables backend alone -------------------------------------------------------
@pytest.fixture
def backend() -> Iterator[NftablesFirewall]:
    assert NFT is not None
    data_dir = new_data_dir()
    fw = NftablesFirewall(NFT, data_dir, ConfinedUids.for_base(pick_isolate_uid_base()))
    yield fw
    subprocess.run([NFT, "-f", "-"], input=f"table inet {fw.table}\n"
                   f"delete table inet {fw.table}\n", text=True, check=False)
    shutil.rmtree(data_dir, ignore_errors=True)


async def test_backend_changes_only_the_elements_asked_for(backend: NftablesFirewall) -> None:
    a, b = backend.uids.isolate_first + 1, backend.uids.isolate_first + 2
    await backend.start([8787], {a: {100, 101}})
    assert backend.state == "active"
    assert function_ports(backend.table) == {(a, 100), (a, 101)}
    await backend.allow_function(a, {102})  # a redeploy elsewhere replaces, never adds
    await backend.allow_function(b, {100})
    assert function_ports(backend.table) == {(a, 102), (b, 100)}
    await backend.forget_function(a)
    await backend.forget_function(a)  # already gone: nothing to do, no error
    assert function_ports(backend.table) == {(b, 100)}
    assert backend.describe()["functions"] == 1
    await backend.stop()
    assert backend.table not in tables()
    assert backend.state == "unavailable: stopped"


async def test_backend_that_cannot_run_nft_says_why(tmp_path: Path) -> None:
    fw = NftablesFirewall("/nonexistent/nft", tmp_path, ConfinedUids.for_base(2_000_000))
    await fw.start([8787], {2_000_001: {100}})
    assert fw.state.startswith(f"unavailable: could not install table inet {fw.table}: "
                               "could not run /nonexistent/nft"), fw.state
    await fw.allow_function(2_000_002, {100})  # no rules: nothing to change, no error
    await fw.stop()


async def test_backend_removes_tables_of_gone_data_dirs_and_warns_of_overlaps(
        backend: NftablesFirewall, caplog: pytest.LogCaptureFixture) -> None:
    assert NFT is not None
    base = backend.uids.isolate_first
    gone = Path(new_data_dir())
    shutil.rmtree(gone)
    live = new_data_dir()
    leftover, other = table_name(gone), table_name(live)
    for table, data_dir in ((leftover, gone), (other, live)):
        script = render_table(table, backend.uids, [1], {},
                              f"phloem uid_base={base} data_dir={data_dir}")
        subprocess.run([NFT, "-f", "-"], input=script, text=True, check=True)
    try:
        with caplog.at_level(logging.WARNING, "phloem.firewall"):
            await backend.start([8787], {})
        assert backend.state == "active"
        assert leftover not in tables()
        assert other in tables()  # its data dir exists: maybe a live platform
        assert f"table inet {other}" in caplog.text and "--isolate-uid-base" in caplog.text
    finally:
        subprocess.run([NFT, "-f", "-"], input=f"table inet {other}\n"
                       f"delete table inet {other}\n", text=True, check=False)
        shutil.rmtree(live, ignore_errors=True)
        await backend.stop()


# -- a platform whose API listens on every address -----------------------------------
@pytest.fixture(scope="module")
def fw() -> Iterator[PlatformProcess]:
    with platform_process(["--api-host", "0.0.0.0"]) as p:
        yield p


@pytest.fixture(scope="module")
def netprobe(fw: PlatformProcess) -> str:
    fn = fw.deploy("netprobe", APPS / "netprobe")
    assert fn["status"] == "ready", fn
    return host_of(fn["invocation_url"])


@pytest.fixture(scope="module")
def other_branch(fw: PlatformProcess) -> Iterator[dict[str, Any]]:
    with fw.api() as api:
        r = api.post("/branches", json={"name": "fw-other"})
        assert r.status_code == 201, r.text
        yield branch_status(fw, "fw-other")
        api.delete("/branches/fw-other")


@pytest.fixture
def listener() -> Iterator[Listener]:
    sock = Listener()
    yield sock
    sock.close()


def test_isolate_reaches_its_branch_databases_and_the_gateway(
        fw: PlatformProcess, netprobe: str) -> None:
    main = branch_status(fw, "main")
    assert main["pooler_port"], "PgBouncer is installed by scripts/install"
    targets = [("127.0.0.1", main["port"]), ("127.0.0.1", main["pooler_port"]),
               ("127.0.0.1", fw.gateway_port)]
    results = probe(fw, netprobe, targets)
    for t in targets:
        assert results[t]["result"] == "connected", (t, results[t])


def test_isolate_is_refused_the_api_and_other_branches(
        fw: PlatformProcess, netprobe: str, other_branch: dict[str, Any]) -> None:
    targets = [("127.0.0.1", fw.api_port), ("127.0.0.1", other_branch["port"]),
               ("127.0.0.1", other_branch["pooler_port"])]
    assert_refused(probe(fw, netprobe, targets), targets)


def test_isolate_is_refused_every_local_address(fw: PlatformProcess, netprobe: str,
                                                listener: Listener) -> None:
    """127.0.0.0/8, ::1 and the host's own addresses, for the API (listening on all of
    IPv4) and for any other listener."""
    addrs = host_addresses()
    if not addrs:
        pytest.skip("this machine has no non-loopback address")
    targets = [(a, listener.port) for a in ("127.0.0.1", "127.0.0.2", "::1", *addrs)]
    targets += [(a, fw.api_port) for a in addrs if ":" not in a]
    assert_refused(probe(fw, netprobe, targets), targets)


def test_link_local_refused_at_once_and_outside_world_not_refused(
        fw: PlatformProcess, netprobe: str) -> None:
    metadata, outside = ("169.254.169.254", 80), ("203.0.113.1", 80)  # TEST-NET-3
    results = probe(fw, netprobe, [metadata, outside], timeout=1)
    assert results[metadata]["result"] == "refused", results[metadata]
    assert results[metadata]["ms"] < FAST_MS, results[metadata]
    # No route or no answer, but no rule of ours: never a refusal.
    assert results[outside]["result"] != "refused", results[outside]


def test_build_uid_reaches_no_local_port(fw: PlatformProcess, listener: Listener) -> None:
    python = shutil.which("python3", path="/usr/bin") or "/usr/bin/python3"
    main = branch_status(fw, "main")
    code = ("import socket, sys\n"
            "for port in map(int, sys.argv[1:]):\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', port), timeout=3).close()\n"
            "        print(port, 'connected')\n"
            "    except ConnectionRefusedError:\n"
            "        print(port, 'refused')\n"
            "    except OSError as exc:\n"
            "        print(port, exc)\n")
    ports = [fw.api_port, main["port"], fw.gateway_port, listener.port]
    uid = build_uid(fw.isolate_uid_base)
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           python, "-c", code, *map(str, ports)],
                          capture_output=True, text=True, timeout=60, check=True)
    for port in ports:
        assert connects_from_here("127.0.0.1", port)
    assert proc.stdout.split("\n")[:-1] == [f"{p} refused" for p in ports], proc.stdout


def test_status_and_rules_follow_functions_and_branches(
        fw: PlatformProcess, netprobe: str, other_branch: dict[str, Any]) -> None:
    table = table_name(fw.data_dir)
    status = fw.cli_json("status")["components"]["firewall"]
    assert status["state"] == "active", status
    assert status["table"] == f"inet {table}"
    main = branch_status(fw, "main")
    uid = probe_uid(fw, netprobe)
    assert {(uid, main["port"]), (uid, main["pooler_port"])} <= function_ports(table)

    # A function on the other branch gets that branch's ports, and can use them.
    fn = fw.deploy("netprobe", APPS / "netprobe", branch="fw-other")
    assert fn["status"] == "ready", fn
    host = host_of(fn["invocation_url"])
    other_uid = probe_uid(fw, host)
    theirs = {(other_uid, other_branch["port"]), (other_uid, other_branch["pooler_port"])}
    assert theirs <= function_ports(table)
    own = [("127.0.0.1", other_branch["port"]), ("127.0.0.1", main["port"])]
    results = probe(fw, host, own)
    assert results[own[0]]["result"] == "connected", results
    assert results[own[1]]["result"] == "refused", results

    fw.cli("functions", "delete", "netprobe", "--branch", "fw-other")
    assert not theirs & function_ports(table)

    fw.deploy("netprobe", APPS / "netprobe", branch="fw-other")
    third_uid = probe_uid(fw, host)
    assert (third_uid, other_branch["port"]) in function_ports(table)
    # Deleting the branch forgets its functions.
    with fw.api() as api:
        assert api.delete("/branches/fw-other").status_code == 200
    assert not {p for p in function_ports(table) if p[0] == third_uid}
    assert (uid, main["port"]) in function_ports(table)


# -- lifecycle -----------------------------------------------------------------------
def test_stale_table_is_replaced_at_start_and_removed_at_stop() -> None:
    data_dir = new_data_dir()
    table = table_name(data_dir)
    # What a killed run leaves: a table of the same name, here with a marker chain.
    subprocess.run([NFT or "nft", "-f", "-"], input=f"table inet {table} {{\n"
                   "chain stale {\n}\n}\n", text=True, check=True)
    p = PlatformProcess(data_dir, *_two_ports())
    try:
        p.launch()
        p.wait_ready()
        listing = nft("list", "table", "inet", table)
        assert "chain stale" not in listing
        assert "chain confined" in listing
        fn = p.deploy("netprobe", APPS / "netprobe")
        host = host_of(fn["invocation_url"])
        uid = probe_uid(p, host)
        main = branch_status(p, "main")
        assert p.stop() == 0
        assert table not in tables()

        # Functions recorded before are allowed again at start, with no redeploy.
        p.launch()
        p.wait_ready()
        assert (uid, main["port"]) in function_ports(table)
        target = ("127.0.0.1", main["port"])
        assert probe(p, host, [target])[target]["result"] == "connected"
        assert p.stop() == 0
        assert table not in tables()
    finally:
        p.cleanup()
        subprocess.run([NFT or "nft", "-f", "-"], input=f"table inet {table}\n"
                       f"delete table inet {table}\n", text=True, check=False)


def test_firewall_off_installs_nothing() -> None:
    with platform_process(["--no-firewall"]) as p:
        status = p.cli_json("status")["components"]["firewall"]
        assert status["state"].startswith("unavailable: turned off"), status
        assert table_name(p.data_dir) not in tables()
        assert any("firewall unavailable: turned off" in line for line in p.output)


def test_bad_uid_base_is_refused_naming_the_field() -> None:
    data_dir = new_data_dir()
    try:
        p = PlatformProcess(data_dir, *_two_ports(), isolate_uid_base=1000)
        proc = subprocess.run(p.args(), env=p.env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0
        assert "isolate_uid_base: must be between 65537" in " ".join(
            (proc.stderr + proc.stdout).split())
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _two_ports() -> tuple[int, int]:
    return free_port(), free_port()
