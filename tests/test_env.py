"""Deploy-time env: carry-over and deletion, limits, and values sealed at rest."""

from __future__ import annotations

from pathlib import Path

from phloem.testing import PlatformProcess, host_of

APPS = Path(__file__).parent / "apps"
SECRET = "sk-live-7f3a9c1e5d2b8046-phloem-test-secret"


def test_env_carries_over_sets_and_deletes(platform: PlatformProcess) -> None:
    platform.deploy("envy", APPS / "envprobe", "--env", "A=1", "--env", "B=2",
                    "--env", "GREETING=hello")
    assert platform.cli_json("functions", "get", "envy", "--list-env")["env"] == \
        ["A", "B", "GREETING"]
    fn = platform.deploy("envy", APPS / "envprobe", "--env", "B=", "--env", "C=3")
    shown = platform.cli_json("functions", "get", "envy", "--list-env", "--show-values")
    assert shown["env"] == {"A": "1", "C": "3", "GREETING": "hello"}
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").json()["env"]["GREETING"] == "hello"
    names_only = platform.cli("functions", "get", "envy", "--list-env").stdout.split()
    assert names_only == ["A", "C", "GREETING"]


def test_env_limits_are_named(platform: PlatformProcess) -> None:
    with platform.api() as api:
        sha = platform.cli_json("functions", "deploy", "limited", "--path",
                                str(APPS / "envprobe"))["deployment"]["artifact_sha256"]
        url = "/branches/main/functions/limited/deployments"
        many = api.post(url, json={"artifact_sha256": sha, "entry": "main:app",
                                   "env": {f"V{i}": "x" for i in range(1001)}})
        assert many.status_code == 400
        assert "at most 1000 variables" in many.json()["error"]["message"]
        big = api.post(url, json={"artifact_sha256": sha, "entry": "main:app",
                                  "env": {"BIG": "x" * (64 * 1024)}})
        assert big.status_code == 400
        assert "at most 65536 bytes" in big.json()["error"]["message"]
        reserved = api.post(url, json={"artifact_sha256": sha, "entry": "main:app",
                                       "env": {"NEON_X": "1"}})
        assert reserved.status_code == 400
        assert reserved.json()["error"]["field"] == "env.NEON_X"


def test_secret_values_are_not_stored_in_clear(platform: PlatformProcess) -> None:
    fn = platform.deploy("sealed", APPS / "envprobe", "--env", f"API_KEY={SECRET}")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").status_code == 200
    needle = SECRET.encode()
    leaks = []
    for path in platform.data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    leaks.append(str(path))
            except OSError:
                continue
    assert leaks == []
    assert SECRET not in platform.cli("functions", "logs", "sealed").stdout
    assert SECRET not in platform.cli("functions", "get", "sealed", "--output", "json").stdout
