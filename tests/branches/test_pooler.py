"""PgBouncer in front of a real PostgreSQL cluster: SCRAM pass-through, password rotation,
transaction pooling, the prepared-statement limitation, and process management."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from phloem.branches.pooler import Pooler, PoolerError, find_pgbouncer, scram_secrets
from phloem.postgres import Cluster, install_binaries
from phloem.system.identity import Identity
from phloem.testing import free_port, processes_mentioning, wait_for

PGBOUNCER = find_pgbouncer()
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed")

HOST = "127.0.0.1"
DATABASE = "phloemdb"
ROLE = "phloemdb_owner"
SUPER_PASSWORD = "super-secret-pw"
ROLE_PASSWORD = "owner-pw-1"


@dataclass
class Env:
    root: Path
    cluster: Cluster
    owner: Identity

    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        return self.cluster.connect(SUPER_PASSWORD)

    def secrets(self, *roles: str) -> dict[str, str]:
        with self.admin() as conn:
            return scram_secrets(conn, list(roles))


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    # Not pytest's tmp_path: it sits under a 0700 directory the service user cannot cross.
    root = Path(tempfile.mkdtemp(prefix="phloem-pooler-", dir="/tmp"))
    os.chmod(root, 0o711)
    owner = Identity.service("phloem")
    bins = install_binaries(root / "pginstall")
    branch = root / "branch"
    cluster = Cluster(bins, branch / "pgdata", socket_dir=root / "run" / "pg", port=free_port(),
                      owner=owner, log_file=branch / "postgres.log", listen_addresses=HOST)
    try:
        cluster.initialize(SUPER_PASSWORD)  # scram-sha-256 for host connections too
        cluster.start()
        with cluster.connect(SUPER_PASSWORD) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(ROLE_PASSWORD)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(DATABASE), sql.Identifier(ROLE)))
        yield Env(root, cluster, owner)
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_pooler(env: Env) -> Iterator[Callable[..., Pooler]]:
    """Poolers on fresh ports, each with its own run dir; all stopped at the end."""
    made: list[Pooler] = []

    def make(roles: tuple[str, ...] = (ROLE,), start: bool = True, **kw: Any) -> Pooler:
        base = Path(tempfile.mkdtemp(prefix="pooler-", dir=env.root / "branch"))
        pooler = Pooler(
            binary=str(PGBOUNCER), run_dir=base / "run", owner=env.owner, listen_host=HOST,
            port=kw.pop("port", None) or free_port(), backend_host=HOST,
            backend_port=env.cluster.port, database=DATABASE, log_file=base / "pgbouncer.log",
            **kw,
        )
        env.owner.own(base, 0o700)
        made.append(pooler)
        pooler.write_config(env.secrets(*roles))
        if start:
            pooler.start()
        return pooler

    yield make
    for pooler in made:
        pooler.stop()
        assert not pgbouncers(pooler), "a pgbouncer outlived the test"


def connect(pooler: Pooler, password: str, user: str = ROLE, **kw: Any
            ) -> psycopg.Connection[tuple[Any, ...]]:
    kw.setdefault("prepare_threshold", None)
    kw.setdefault("autocommit", True)
    return psycopg.connect(host=pooler.listen_host, port=pooler.port, user=user,
                           password=password, dbname=pooler.database, connect_timeout=10,
                           **kw)


def pgbouncers(pooler: Pooler) -> list[tuple[int, str]]:
    """Live (non-zombie) processes running this pooler's config."""
    return [(pid, cmd) for pid, cmd in processes_mentioning(str(pooler.config_file))
            if "pgbouncer" in cmd]


def one(conn: psycopg.Connection[tuple[Any, ...]], query: str, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return row[0]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


# -- authentication --------------------------------------------------------------------------


def test_scram_pass_through(env: Env, make_pooler: Callable[..., Pooler]) -> None:
    pooler = make_pooler()
    with connect(pooler, ROLE_PASSWORD) as conn:
        # The backend is the branch cluster, reached over TCP as the client's own role:
        # PgBouncer logged in with nothing but the SCRAM secret and the client's proof.
        assert one(conn, "SELECT current_user") == ROLE
        assert one(conn, "SELECT current_database()") == DATABASE
        assert one(conn, "SELECT inet_server_port()") == env.cluster.port
        assert one(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False

    # On disk: SCRAM secrets only, private to the service user.
    text = pooler.auth_file.read_text()
    assert ROLE_PASSWORD not in text and SUPER_PASSWORD not in text
    assert text.startswith(f'"{ROLE}" "SCRAM-SHA-256$')
    for path, mode in ((pooler.run_dir, 0o700), (pooler.auth_file, 0o600),
                       (pooler.config_file, 0o600)):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == mode, path
        assert (st.st_uid, st.st_gid) == (env.owner.uid, env.owner.gid), path
    ini = pooler.config_file.read_text()
    assert "pool_mode = transaction" in ini and "auth_type = scram-sha-256" in ini
    assert (pooler.run_dir / f".s.PGSQL.{pooler.port}").is_socket()


def test_wrong_password_is_refused(make_pooler: Callable[..., Pooler]) -> None:
    pooler = make_pooler()
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        connect(pooler, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        connect(pooler, ROLE_PASSWORD, user="nobody")
    with connect(pooler, ROLE_PASSWORD) as conn:  # and the pooler is still fine
        assert one(conn, "SELECT 1") == 1


def test_password_rotation(env: Env, make_pooler: Callable[..., Pooler]) -> None:
    role = "rotating"
    with env.admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'old-pw'").format(
            sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(DATABASE), sql.Identifier(role)))
    pooler = make_pooler(roles=(role,))
    with connect(pooler, "old-pw", user=role) as conn:
        old_backend = one(conn, "SELECT pg_backend_pid()")

    with env.admin() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD 'new-pw'").format(sql.Identifier(role)))
    pooler.stop()  # what the branch manager does: a restart (a reload keeps stale keys)
    pooler.write_config(env.secrets(role))
    pooler.start()

    with connect(pooler, "new-pw", user=role) as conn:
        assert one(conn, "SELECT current_user") == role
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        connect(pooler, "old-pw", user=role)

    # Pooled server connections were made with the old secret. Close them, so the next
    # client needs a fresh server login: PgBouncer must make it with the key from the new
    # password's exchange.
    with env.admin() as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE usename = %s", [role])
    wait_for(lambda: not has_backends(env, role), 10, "the old backends to end")
    deadline = time.monotonic() + 10
    while True:
        try:
            with connect(pooler, "new-pw", user=role) as conn:
                new_backend = one(conn, "SELECT pg_backend_pid()")
            break
        except psycopg.OperationalError:
            # PgBouncer may hand out a server it has not yet noticed is dead once; the
            # client gets an error and the server is dropped.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert new_backend != old_backend


def has_backends(env: Env, role: str) -> bool:
    with env.admin() as conn:
        return bool(one(conn, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                        role))


def test_scram_secrets_refuses_roles_without_scram(env: Env) -> None:
    with env.admin() as conn:
        conn.execute("CREATE ROLE no_password LOGIN")
        with pytest.raises(PoolerError, match=r"no_password.*no SCRAM"):
            scram_secrets(conn, ["no_password"])
        with pytest.raises(PoolerError, match="'missing' does not exist"):
            scram_secrets(conn, [ROLE, "missing"])


def test_write_config_refuses_plaintext(make_pooler: Callable[..., Pooler]) -> None:
    pooler = make_pooler(start=False)
    before = pooler.auth_file.read_text()
    with pytest.raises(PoolerError, match="must be a SCRAM-SHA-256 secret"):
        pooler.write_config({ROLE: ROLE_PASSWORD})
    assert pooler.auth_file.read_text() == before


@pytest.mark.parametrize(("change", "message"), [
    ({"database": "my-db"}, "database: must be a plain identifier"),
    ({"listen_host": "localhost"}, "listen_host: must be an IP address"),
    ({"backend_host": "host=evil"}, "backend_host: must be a host name or IP address"),
    ({"owner": Identity(0, 0)}, "owner: PgBouncer refuses to run as root"),
])
def test_bad_settings_are_refused(make_pooler: Callable[..., Pooler],
                                  change: dict[str, Any], message: str) -> None:
    pooler = replace(make_pooler(start=False), **change)
    with pytest.raises(PoolerError, match=message):
        pooler.write_config({})
    with pytest.raises(PoolerError, match=message):
        pooler.start()


# -- pooling ---------------------------------------------------------------------------------


def test_transaction_mode(make_pooler: Callable[..., Pooler]) -> None:
    # One server connection, two clients connected at once: in session mode the second
    # would wait for the first to disconnect; in transaction mode both are served, by the
    # same backend, one transaction at a time.
    pooler = make_pooler(pool_size=1)
    with connect(pooler, ROLE_PASSWORD) as a, connect(pooler, ROLE_PASSWORD) as b:
        pid_a = one(a, "SELECT pg_backend_pid()")
        pid_b = one(b, "SELECT pg_backend_pid()")
        assert pid_a == pid_b
        # Session state is not the client's: a plain SET leaks to the next client of the
        # backend (why server_reset_query does not matter and apps must not rely on SET).
        a.execute("SET statement_timeout = '4321s'")
        assert one(b, "SHOW statement_timeout") == "4321s"
        assert one(a, "SELECT pg_backend_pid()") == pid_a


def test_prepared_statements(make_pooler: Callable[..., Pooler]) -> None:
    """PgBouncer 1.18 does not track protocol-level prepared statements. psycopg prepares a
    query server-side (as ``_pg3_0``, ``_pg3_1``, ... per connection) on its 6th run with
    the default prepare_threshold=5, and later runs only name it. Through the pooler that
    breaks both ways: the name is missing on another backend, or already taken on a backend
    another client prepared it on. With prepare_threshold=None psycopg never prepares."""
    pooler = make_pooler()
    query = "SELECT pg_backend_pid() + 0 * %s::int"
    prepared = "SELECT array_agg(name) FROM pg_prepared_statements"

    with connect(pooler, ROLE_PASSWORD, prepare_threshold=5) as a, \
            connect(pooler, ROLE_PASSWORD, autocommit=False) as b:
        # Alone, a client keeps getting the most recently used backend, so it "works".
        backends = {one(a, query, i) for i in range(10)}
        assert len(backends) == 1
        assert one(a, prepared) == ["_pg3_0"]
        # b's open transaction holds that backend; a's next run goes to a new one, where
        # the statement does not exist.
        assert one(b, "SELECT pg_backend_pid()") in backends
        with pytest.raises(psycopg.errors.InvalidSqlStatementName,
                           match='prepared statement "_pg3_0" does not exist'):
            one(a, query, 10)
        b.rollback()

    # The first backend (released last, so handed out first) still has a's statement,
    # since nothing resets a backend in transaction mode: a new client preparing its
    # first statement under the same name collides with it.
    with connect(pooler, ROLE_PASSWORD, prepare_threshold=5) as c:
        for i in range(5):
            assert one(c, query, i) in backends
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement,
                           match='prepared statement "_pg3_0" already exists'):
            one(c, query, 5)

    # prepare_threshold=None: the same interleaving, on two backends, all fine.
    with connect(pooler, ROLE_PASSWORD) as a, \
            connect(pooler, ROLE_PASSWORD, autocommit=False) as b:
        first = {one(a, query, i) for i in range(10)}
        assert one(b, "SELECT pg_backend_pid()") in first
        second = {one(a, query, i) for i in range(10, 20)}
        assert len(first) == len(second) == 1 and first != second
        b.rollback()


# -- processes -------------------------------------------------------------------------------


def test_stop_leaves_nothing(make_pooler: Callable[..., Pooler]) -> None:
    pooler = make_pooler()
    assert pooler.is_running() and len(pgbouncers(pooler)) == 1
    with connect(pooler, ROLE_PASSWORD) as idle:  # an idle client does not hold it up
        one(idle, "SELECT 1")
        started = time.monotonic()
        pooler.stop(timeout=20)
        assert time.monotonic() - started < 5
    assert not pooler.is_running()
    assert pgbouncers(pooler) == []
    assert not pooler.pid_file.exists()
    assert port_is_free(pooler.port)
    pooler.stop()  # idempotent
    pooler.start()  # and restartable
    with connect(pooler, ROLE_PASSWORD) as conn:
        assert one(conn, "SELECT 1") == 1


def test_stop_kills_what_does_not_exit(make_pooler: Callable[..., Pooler]) -> None:
    pooler = make_pooler()
    busy = connect(pooler, ROLE_PASSWORD, autocommit=False)
    try:
        one(busy, "SELECT 1")  # a transaction left open: the safe shutdown waits for it
        started = time.monotonic()
        pooler.stop(timeout=1)
        elapsed = time.monotonic() - started
    finally:
        busy.close()
    assert 1 <= elapsed < 10
    assert pgbouncers(pooler) == []
    assert "got SIGINT" in pooler.log_file.read_text()


def test_start_refuses_a_taken_port(make_pooler: Callable[..., Pooler]) -> None:
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        pooler = make_pooler(start=False, port=port)
        with pytest.raises(PoolerError, match=r"(?s)port in use.*cannot listen on "
                                              rf"{HOST}:{port}.*Address already in use"):
            pooler.start(timeout=10)
    assert pgbouncers(pooler) == []
    assert not pooler.is_running()


CRASHING_PLATFORM = """
import json, sys, time
from pathlib import Path
from phloem.branches.pooler import Pooler
from phloem.system.identity import Identity
a = json.loads(sys.argv[1])
p = Pooler(a["binary"], Path(a["run_dir"]), Identity(a["uid"], a["gid"]), a["host"],
           a["port"], a["host"], a["backend_port"], a["database"], Path(a["log_file"]),
           tied=a["tied"])
p.start()
print(p._pid(), flush=True)
time.sleep(600)
"""


def test_start_after_a_crashed_platform(env: Env, make_pooler: Callable[..., Pooler]) -> None:
    pooler = make_pooler(start=False)
    args = {"binary": pooler.binary, "run_dir": str(pooler.run_dir), "uid": env.owner.uid,
            "gid": env.owner.gid, "host": HOST, "port": pooler.port,
            "backend_port": pooler.backend_port, "database": pooler.database,
            "log_file": str(pooler.log_file)}
    # A platform process starts the pooler and is SIGKILLed: its PgBouncer, tied to it,
    # shuts down by itself.
    platform = subprocess.Popen([sys.executable, "-c", CRASHING_PLATFORM,
                                 json.dumps({**args, "tied": True})],
                                stdout=subprocess.PIPE, text=True)
    assert platform.stdout is not None
    tied = int(platform.stdout.readline())
    assert [pid for pid, _ in pgbouncers(pooler)] == [tied]
    platform.kill()
    platform.wait()
    wait_for(lambda: not pgbouncers(pooler), 10, "the tied pgbouncer to exit")

    # One that was not tied (as an older platform's) lives on, an orphan with a pidfile.
    # The next platform's start() replaces it.
    platform = subprocess.Popen([sys.executable, "-c", CRASHING_PLATFORM,
                                 json.dumps({**args, "tied": False})],
                                stdout=subprocess.PIPE, text=True)
    assert platform.stdout is not None
    orphan = int(platform.stdout.readline())
    platform.kill()
    platform.wait()
    assert [pid for pid, _ in pgbouncers(pooler)] == [orphan]
    assert pooler.is_running()  # seen through the pidfile
    pooler.start()
    assert [pid for pid, _ in pgbouncers(pooler)] == [pooler._pid()] != [orphan]
    with connect(pooler, ROLE_PASSWORD) as conn:
        assert one(conn, "SELECT 1") == 1

    # PgBouncer itself SIGKILLed: a stale pidfile (and socket) and a dead pid, possibly a
    # zombie where PID 1 does not reap. A new instance (a new platform) starts anyway.
    killed = pooler._pid()
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: not pgbouncers(pooler), 10, "the killed pgbouncer to die")
    assert pooler.pid_file.exists()
    fresh = replace(pooler)
    assert not fresh.is_running()
    fresh.start()
    with connect(fresh, ROLE_PASSWORD) as conn:
        assert one(conn, "SELECT 1") == 1
    fresh.stop()
    assert pgbouncers(pooler) == []
