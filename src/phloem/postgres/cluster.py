"""One PostgreSQL cluster: a data directory and the postmaster serving it.

    cluster = Cluster(bins, pgdata, socket_dir=..., port=25432, owner=ident, log_file=...)
    cluster.initialize(superuser_password="...")     # initdb, scram-sha-256 everywhere
    cluster.start()                                  # pg_ctl start -w
    with cluster.connect(password="...") as conn: ...
    cluster.stop()

The calls block (they wait on pg_ctl); async code runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from phloem.identity import Identity, make_dir
from phloem.postgres.binaries import PgBinaries

SUPERUSER = "postgres"

# Modest, fixed settings every phloem cluster shares (per-instance ones such as port and
# socket directory go on the command line so a copied data directory never carries them).
BASE_CONF = """
# --- phloem ---
max_connections = 200
shared_buffers = 64MB
max_wal_size = 256MB
checkpoint_timeout = 5min
wal_level = replica
max_wal_senders = 4
max_replication_slots = 8
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
"""


class ClusterError(RuntimeError):
    pass


@dataclass
class Cluster:
    bins: PgBinaries
    pgdata: Path
    socket_dir: Path
    port: int
    owner: Identity
    log_file: Path
    listen_addresses: str = ""
    extra_settings: dict[str, str] = field(default_factory=dict)

    # -- helpers -------------------------------------------------------------
    def _run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, capture_output=True, text=True, cwd="/", timeout=timeout, check=False,
            **self.owner.popen_kwargs(),
        )

    def _fail(self, what: str, proc: subprocess.CompletedProcess[str]) -> ClusterError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-15:])
        return ClusterError(
            f"{what} failed for {self.pgdata} (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()}\n{tail}".rstrip()
        )

    @property
    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    # -- lifecycle -----------------------------------------------------------
    def initialize(self, superuser_password: str) -> None:
        """initdb with scram-sha-256 for local and host connections, superuser
        ``postgres`` with ``superuser_password``."""
        make_dir(self.pgdata.parent, 0o700, self.owner)
        make_dir(self.pgdata, 0o700, self.owner)
        with tempfile.NamedTemporaryFile("w", dir=self.pgdata.parent, delete=False) as f:
            f.write(superuser_password + "\n")
            pwfile = Path(f.name)
        try:
            self.owner.own(pwfile, 0o600)
            proc = self._run([
                self.bins.tool("initdb"), "-D", str(self.pgdata), "-U", SUPERUSER,
                f"--pwfile={pwfile}", "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                "--no-instructions",
            ])
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise self._fail("initdb", proc)
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(BASE_CONF)

    def _options(self) -> str:
        settings = {
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "listen_addresses": self.listen_addresses,
            **self.extra_settings,
        }
        return " ".join(f"-c {k}='{v}'" for k, v in settings.items())

    def is_running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        proc = self._run([self.bins.tool("pg_ctl"), "status", "-D", str(self.pgdata)], 30)
        return proc.returncode == 0

    def start(self, timeout: float = 300, standby: bool = False) -> None:
        """Start the postmaster and wait until it accepts connections (``standby``: or
        read-only ones, as a hot standby does once consistent). A postmaster left running
        by a crashed phloem is stopped first so that our settings apply."""
        if self.is_running():
            self.stop()
        make_dir(self.socket_dir, 0o755, self.owner)
        if not self.log_file.exists():
            self.log_file.touch()
        self.owner.own(self.log_file, 0o600)
        # pg_ctl -w checks readiness only every 100 ms; it is started without waiting and
        # the postmaster's own status line is polled every few ms instead.
        stale = self._postmaster_pid()  # a crashed postmaster's file, not ours
        proc = self._run([
            self.bins.tool("pg_ctl"), "start", "-W",
            "-D", str(self.pgdata), "-l", str(self.log_file), "-o", self._options(),
        ], 60)
        if proc.returncode != 0:
            raise self._fail("pg_ctl start", proc)
        deadline = time.monotonic() + timeout
        while True:
            status = self._postmaster_status()
            if (status == "ready" or (standby and status == "standby")) and \
                    self._postmaster_pid() != stale:
                return
            if status == "gone" and time.monotonic() > deadline - timeout + 5:
                raise self._fail("the postmaster exited during start-up", proc)
            if time.monotonic() > deadline:
                raise self._fail(f"not ready after {timeout:.0f} s", proc)
            time.sleep(0.003)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _postmaster_status(self) -> str:
        """``ready``/``starting``/``stopping``/``standby`` from postmaster.pid (line 8),
        ``gone`` when there is no live postmaster."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return "gone"
        return lines[7].strip() if len(lines) > 7 else "starting"

    def stop(self, mode: str = "fast", timeout: float = 120) -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        proc = self._run([
            self.bins.tool("pg_ctl"), "stop", "-W", "-m", mode, "-D", str(self.pgdata),
        ], 60)
        deadline = time.monotonic() + timeout
        while self._postmaster_status() != "gone" and time.monotonic() < deadline:
            time.sleep(0.003)
        if proc.returncode != 0 and self.is_running():
            raise self._fail("pg_ctl stop", proc)

    def promote(self, password: str, timeout: float = 60) -> None:
        """End recovery of a hot standby and wait until it takes writes. Unlike the end
        of crash recovery, a promotion does not wait for a checkpoint: it writes an
        end-of-recovery record and lets the checkpointer spread the next one."""
        with self.connect(password) as conn:
            conn.execute("SELECT pg_promote(false)")
            deadline = time.monotonic() + timeout
            while True:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(f"{self.pgdata}: still in recovery {timeout:.0f} s "
                                       "after pg_promote()")
                time.sleep(0.003)

    # -- connections ---------------------------------------------------------
    def admin_conninfo(self, password: str, dbname: str = "postgres") -> str:
        """Superuser connection over the private Unix socket."""
        return psycopg.conninfo.make_conninfo(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, password=password,
            dbname=dbname,
        )

    def connect(
        self, password: str, dbname: str = "postgres"
    ) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.admin_conninfo(password, dbname), autocommit=True)


def free_port(host: str, start: int, taken: set[int] | frozenset[int] = frozenset()) -> int:
    """First port >= ``start`` that is not in ``taken`` and can be bound on ``host``."""
    import socket

    port = start
    while port < 65535:
        if port not in taken:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    port += 1
                    continue
                return port
        port += 1
    raise ClusterError(f"no free TCP port at or above {start}")


def random_secret(nbytes: int = 24) -> str:
    import secrets

    return secrets.token_urlsafe(nbytes)

