"""One PostgreSQL cluster: a data directory and the postmaster serving it.

    cluster = Cluster(bins, pgdata, socket_dir=..., port=25432, owner=ident, log_file=...)
    cluster.initialize(superuser_password="...")     # initdb, scram-sha-256 everywhere
    cluster.start()                # our child, tied to this process; waits until ready
    with cluster.connect(password="...") as conn: ...
    cluster.stop()

The calls block (they wait for the postmaster); async code runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from phloem.postgres.binaries import PgBinaries
from phloem.system import procfs
from phloem.system.identity import Identity, make_dir
from phloem.system.lifeline import spawn_tied

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
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False,
                                                  compare=False)

    # -- helpers -------------------------------------------------------------
    def _run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, capture_output=True, text=True, cwd="/", timeout=timeout, check=False,
            **self.owner.popen_kwargs(),
        )

    def _fail(self, what: str,
              proc: subprocess.CompletedProcess[str] | None = None) -> ClusterError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-15:])
        if proc is None:
            return ClusterError(f"{self.pgdata}: {what}\n{tail}".rstrip())
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

    def _argv(self) -> list[str]:
        settings = {
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "listen_addresses": self.listen_addresses,
            **self.extra_settings,
        }
        argv = [self.bins.tool("postgres"), "-D", str(self.pgdata)]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        return argv

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def _is_postmaster(self, pid: int) -> bool:
        """``pid`` is a live postmaster serving *this* data dir (it works in it), not a
        process that inherited the pid of one that died."""
        return (procfs.exe_name(pid) == "postgres"
                and procfs.cwd_of(pid) == self.pgdata.resolve())

    def postmaster_pid(self) -> int | None:
        """The live postmaster of this data dir (ours or one a killed platform left), or
        None."""
        self._reap()
        if self._proc is not None:
            return self._proc.pid
        pid = self._postmaster_pid()
        return pid if pid is not None and self._is_postmaster(pid) else None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def _processes(self) -> list[int]:
        """Every live PostgreSQL process working in this data dir: the postmaster and its
        children, or the children a killed postmaster left (they exit on their own soon,
        but keep the shared memory a new postmaster needs meanwhile)."""
        top = self.pgdata.resolve()
        return [pid for pid in procfs.pids()
                if procfs.exe_name(pid) == "postgres" and procfs.cwd_of(pid) == top]

    def start(self, timeout: float = 300, standby: bool = False) -> None:
        """Start the postmaster and wait until it accepts connections (``standby``: or
        read-only ones, as a hot standby does once consistent). A postmaster left running
        by a crashed phloem is stopped first so that our settings apply. The postmaster
        is our child, tied to this process (``phloem.system.lifeline``): if the platform dies,
        it gets SIGINT (a fast shutdown) instead of running on unsupervised."""
        if self.is_running():
            self.stop()
        self._clear_stale()
        make_dir(self.socket_dir, 0o755, self.owner)
        if not self.log_file.exists():
            self.log_file.touch()
        self.owner.own(self.log_file, 0o600)
        # Started without pg_ctl, whose postmaster would be init's child: ours can be tied
        # to the platform, and its exit is seen at once. Its status line in
        # postmaster.pid is polled every few ms (pg_ctl -w checks every 100 ms).
        try:
            with open(self.log_file, "ab") as log:
                proc = self._proc = spawn_tied(
                    self._argv(), signal.SIGINT, cwd="/", stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True,
                    **self.owner.popen_kwargs())
        except OSError as exc:
            raise ClusterError(f"cannot run postgres for {self.pgdata}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                raise self._fail(f"the postmaster exited with code {code} during start-up")
            status = self._postmaster_status()
            if (status == "ready" or (standby and status == "standby")) and \
                    self._postmaster_pid() == proc.pid:
                return
            if time.monotonic() > deadline:
                self.stop("immediate")
                raise self._fail(f"not ready after {timeout:.0f} s")
            time.sleep(0.003)

    def _clear_stale(self, timeout: float = 10) -> None:
        """With no postmaster: end what a killed one left (its children, which hold the
        shared memory) and a pid file naming a pid that is now another process's, which
        PostgreSQL would take for a running postmaster. Only after an unclean end: a
        clean shutdown removes postmaster.pid (and the scan of /proc costs ~50 ms)."""
        if self._postmaster_pid() is None:
            return
        leftovers = self._processes()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(procfs.alive(pid) for pid in leftovers) and time.monotonic() < deadline:
            time.sleep(0.005)
        named = self._postmaster_pid()
        if named is not None and not self._is_postmaster(named):
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def _postmaster_pid(self) -> int | None:
        """The pid postmaster.pid names (perhaps stale)."""
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _postmaster_status(self) -> str:
        """``ready``/``starting``/``stopping``/``standby`` from postmaster.pid (line 8),
        ``gone`` when there is no live postmaster."""
        pid = self.postmaster_pid()
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return "gone"
        if pid is None or not lines or lines[0].strip() != str(pid):
            return "gone" if pid is None else "starting"
        return lines[7].strip() if len(lines) > 7 else "starting"

    #: pg_ctl's shutdown modes and the signals they send.
    MODES = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

    def stop(self, mode: str = "fast", timeout: float = 120) -> None:
        """Shut down (``mode`` as pg_ctl's) and wait until every process of the cluster
        has exited; a postmaster still there after ``timeout`` gets an immediate
        shutdown, then SIGKILL. Idempotent; also stops one a killed platform left."""
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, self.MODES[mode])
            for sig, wait in ((None, timeout), (signal.SIGQUIT, 10.0),
                              (signal.SIGKILL, 10.0)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                if self._wait_gone(pid, wait):
                    break
            else:
                raise ClusterError(f"{self.pgdata}: postmaster {pid} survived SIGKILL")
        self._clear_stale()

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            if self.postmaster_pid() != pid:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.003)

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

