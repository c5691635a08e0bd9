"""Deploy-time env: carry-over and deletion, limits; env values and branch passwords
sealed at rest."""

from __future__ import annotations

from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from phloem.metadata.secrets import SecretBox
from phloem.metadata.store import branch_secret_context
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


def branch_passwords(platform: PlatformProcess) -> dict[str, str]:
    """Every branch's owner and superuser password, opened from the system database with
    the platform's key; the owner's must equal the one in its connection string."""
    box = SecretBox.from_data_dir(platform.data_dir / "secrets")
    with platform.system_db() as conn:
        rows = conn.execute("SELECT id, name, role_password_sealed, "
                            "superuser_password_sealed FROM branches").fetchall()
    out = {}
    for branch_id, name, role_sealed, superuser_sealed in rows:
        out[f"{name} owner"] = box.open_text(
            role_sealed, branch_secret_context(branch_id, "role_password"))
        out[f"{name} superuser"] = box.open_text(
            superuser_sealed, branch_secret_context(branch_id, "superuser_password"))
    url = platform.cli("connection-string", "--unpooled").stdout.strip()
    assert conninfo_to_dict(url)["password"] == out["main owner"]
    return out


def test_secrets_are_not_stored_in_clear(platform: PlatformProcess) -> None:
    """Deployed env values and branch database passwords appear in no file of the data
    dir (heap and WAL included): PostgreSQL keeps SCRAM verifiers, PgBouncer's auth file
    the SCRAM secrets, the system database sealed tokens."""
    platform.cli_json("branches", "create", "--name", "sealed-kid")
    fn = platform.deploy("sealed", APPS / "envprobe", "--env", f"API_KEY={SECRET}",
                         branch="sealed-kid")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").status_code == 200  # an isolate connected with them
    needles = {"env value": SECRET, **branch_passwords(platform)}
    assert {"main owner", "sealed-kid owner", "sealed-kid superuser"} <= set(needles)
    with platform.system_db() as conn:
        conn.execute("CHECKPOINT")  # what the system database holds is on disk
        table = repr(conn.execute("SELECT * FROM branches").fetchall())
    assert [what for what, value in needles.items() if value in table] == []
    leaks = []
    for path in platform.data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            leaks += [f"{what} in {path}" for what, value in needles.items()
                      if value.encode() in data]
    assert leaks == []
    assert SECRET not in platform.cli("functions", "logs", "sealed", "--branch",
                                      "sealed-kid").stdout
    assert SECRET not in platform.cli("functions", "get", "sealed", "--branch", "sealed-kid",
                                      "--output", "json").stdout
