"""One PgBouncer per database branch, in transaction mode, in front of its cluster.

    binary = find_pgbouncer()                       # None: pooled URLs fall back to direct
    pooler = Pooler(binary, run_dir=branch_dir / "pgbouncer", owner=ident,
                    listen_host="127.0.0.1", port=55433, backend_host="127.0.0.1",
                    backend_port=25432, database="phloemdb",
                    log_file=branch_dir / "pgbouncer.log")
    with cluster.connect(superuser_password) as conn:
        pooler.write_config(scram_secrets(conn, ["phloemdb_owner"]))
    pooler.start()                                  # waits until it listens on :55433
    ...                                             # ALTER ROLE ... PASSWORD ...
    pooler.stop()
    pooler.write_config(scram_secrets(conn, ["phloemdb_owner"]))
    pooler.start()                                  # a restart, never a SIGHUP reload

Authentication is SCRAM pass-through (PgBouncer >= 1.14): the auth file holds the roles'
SCRAM secrets exactly as ``pg_authid.rolpassword`` has them, never a password. PgBouncer
checks the client's proof against the secret and, from that same exchange, recovers the
ClientKey it needs to log in to PostgreSQL as that role. That only works while PgBouncer's
secret is byte-identical to the server's (same salt and iterations), so after every
password change the secrets are re-read from ``pg_authid`` and the pooler restarted.

A restart, not a reload (SIGHUP): PgBouncer keeps the key from the *last* client SCRAM
login per role for its server logins and a reload does not drop it (1.18): after a
rotation new server logins would fail until a client logged in with the new password.

Transaction mode means a client's session state does not survive its transaction, and
may leak into another client's (nothing resets a server between clients): no session
``SET``, advisory locks, ``LISTEN`` or protocol-level prepared statements (1.18 cannot
track them; psycopg users pass ``prepare_threshold=None``).

PgBouncer runs as ``owner`` (it refuses root) as our child process, not with ``-d``: we
then reap it ourselves, which matters where PID 1 does not reap orphans (containers), and
it is tied to our process (``phloem.system.lifeline``), so it shuts down when a killed platform
can no longer. Its pidfile and config path still let a later phloem find one left
behind. The calls block; async code runs them in a thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from phloem.system.identity import Identity, make_dir
from phloem.system.lifeline import spawn_tied

SCRAM_PREFIX = "SCRAM-SHA-256$"
# PgBouncer reads an unquoted [databases] key only in this alphabet; phloem's database
# names are plain identifiers, so anything else is refused rather than quoted.
DATABASE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
HOST_RE = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
# Where distributions put it; sbin is often missing from a non-root PATH.
SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


class PoolerError(RuntimeError):
    pass


def find_pgbouncer() -> str | None:
    """The pgbouncer executable on PATH or in the usual sbin/bin directories, or None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    for d in SEARCH_DIRS:
        candidate = os.path.join(d, "pgbouncer")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def scram_secrets(conn: psycopg.Connection[Any], roles: list[str]) -> dict[str, str]:
    """role -> SCRAM secret from ``pg_authid`` (needs a superuser connection). Every role
    must exist and have a SCRAM password: an MD5 or missing one cannot be passed through."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                    [list(roles)])
        found: dict[str, str | None] = {str(r[0]): r[1] for r in cur.fetchall()}
    secrets: dict[str, str] = {}
    for role in roles:
        if role not in found:
            raise PoolerError(f"scram_secrets: role {role!r} does not exist")
        secret = found[role]
        if secret is None or not secret.startswith(SCRAM_PREFIX):
            raise PoolerError(f"scram_secrets: role {role!r} has no SCRAM-SHA-256 password "
                              "(PgBouncer can pass through only SCRAM secrets)")
        secrets[role] = secret
    return secrets


def _quote(value: str) -> str:
    """An auth-file field: double quotes, inner ones doubled."""
    return '"' + value.replace('"', '""') + '"'


def _proc_net_address(host: str, port: int) -> tuple[str, str]:
    """(table, "ADDR:PORT") as /proc/<pid>/net/tcp{,6} print a local address: each 32-bit
    word of the address in host byte order, then the port, in upper-case hex."""
    addr = ipaddress.ip_address(host)
    packed = addr.packed
    words = "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}"
                    for i in range(0, len(packed), 4))
    return ("tcp6" if addr.version == 6 else "tcp"), f"{words}:{port:04X}"


def _cmdline(pid: int) -> list[str] | None:
    """argv of a live (not zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if stat.rsplit(") ", 1)[-1][:1] in ("Z", "X"):  # dead, waiting for a reaper
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


@dataclass
class Pooler:
    binary: str
    run_dir: Path
    owner: Identity
    listen_host: str
    port: int
    backend_host: str
    backend_port: int
    database: str
    log_file: Path
    pool_size: int = 20
    max_client_conn: int = 1000
    #: Tied to this process (``phloem.system.lifeline``): SIGINT when it dies. Off only to
    #: reproduce what an untied PgBouncer of a killed platform leaves (tests).
    tied: bool = True
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False,
                                                  compare=False)

    # -- files -----------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.run_dir / "pgbouncer.ini"

    @property
    def auth_file(self) -> Path:
        return self.run_dir / "userlist.txt"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "pgbouncer.pid"

    @property
    def unix_socket(self) -> Path:
        return self.run_dir / f".s.PGSQL.{self.port}"

    def _check(self) -> None:
        if not DATABASE_RE.match(self.database):
            raise PoolerError(f"database: must be a plain identifier [A-Za-z_][A-Za-z0-9_]* "
                              f"(got {self.database!r})")
        try:
            # The listening check finds the socket in /proc/net by address; a name could
            # resolve to several.
            ipaddress.ip_address(self.listen_host)
        except ValueError:
            raise PoolerError(f"listen_host: must be an IP address "
                              f"(got {self.listen_host!r})") from None
        if not HOST_RE.match(self.backend_host):
            raise PoolerError(f"backend_host: must be a host name or IP address "
                              f"(got {self.backend_host!r})")
        for name in ("run_dir", "log_file"):
            if any(c in str(getattr(self, name)) for c in "\n\r"):
                raise PoolerError(f"{name}: must not contain line breaks "
                                  "(PgBouncer's ini syntax cannot quote them)")
        if len(str(self.unix_socket).encode()) > UNIX_PATH_MAX:
            raise PoolerError(f"run_dir: too long for a Unix socket path "
                              f"({self.unix_socket} is over {UNIX_PATH_MAX} bytes)")
        if self.owner.uid == 0:
            raise PoolerError("owner: PgBouncer refuses to run as root; "
                              "pass the unprivileged service identity")

    def _ini(self) -> str:
        return f"""\
; written by phloem; rewritten on every start and password rotation
[databases]
{self.database} = host={self.backend_host} port={self.backend_port} dbname={self.database}

[pgbouncer]
listen_addr = {self.listen_host}
listen_port = {self.port}
unix_socket_dir = {self.run_dir}
pidfile = {self.pid_file}
logfile = {self.log_file}
; functions may connect per request: a line per connection (and stats every minute)
; would grow the log without bound; errors and failed logins are still logged
log_connections = 0
log_disconnections = 0
log_stats = 0

; SCRAM pass-through: the database entry names no user, so PgBouncer logs in as the
; client's role with the key recovered from the client's own SCRAM exchange
auth_type = scram-sha-256
auth_file = {self.auth_file}

pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = {self.max_client_conn}
; not run in transaction mode anyway; empty says so
server_reset_query =
; drivers send these at startup (JDBC: extra_float_digits); PgBouncer would refuse them
ignore_startup_parameters = extra_float_digits,options
; a branch reset restarts the cluster: do not lock clients out for the 15 s default
server_login_retry = 1
"""

    def _write(self, path: Path, text: str) -> None:
        """Replace ``path`` atomically (PgBouncer may re-read it at any moment), 0600 and
        owner-owned: the auth file's secrets let anyone holding them log in to the pooler."""
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            self.owner.own(Path(tmp), 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write_config(self, users: dict[str, str]) -> None:
        """Write the config and the auth file with ``users`` (role -> SCRAM secret as in
        ``pg_authid.rolpassword``). A running pooler sees them after :meth:`reload`."""
        self._check()
        lines = []
        for role, secret in sorted(users.items()):
            if not role or any(c in role for c in "\0\n\r"):
                raise PoolerError(f"users: invalid role name {role!r}")
            if not secret.startswith(SCRAM_PREFIX) or any(c in secret for c in '"\n\r'):
                # No plaintext or MD5 on disk, and only SCRAM can be passed through.
                raise PoolerError(f"users: the secret for {role!r} must be a SCRAM-SHA-256 "
                                  "secret as in pg_authid.rolpassword")
            lines.append(f"{_quote(role)} {_quote(secret)}\n")
        make_dir(self.run_dir, 0o700, self.owner)
        self._write(self.auth_file, "".join(lines))
        self._write(self.config_file, self._ini())

    # -- processes -------------------------------------------------------------
    def _is_ours(self, pid: int) -> bool:
        """``pid`` is a live PgBouncer started with our config (not a recycled pid)."""
        argv = _cmdline(pid)
        return (argv is not None and bool(argv) and "pgbouncer" in os.path.basename(argv[0])
                and str(self.config_file) in argv[1:])

    def _pidfile_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _pids(self) -> set[int]:
        """Every live PgBouncer running our config: the child, the pidfile's, and any
        other (a pidfile can be lost; the config path in argv cannot)."""
        pids: set[int] = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and self._is_ours(int(entry)):
                pids.add(int(entry))
        return pids

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def _pid(self) -> int | None:
        self._reap()
        if self._proc is not None:
            return self._proc.pid
        pid = self._pidfile_pid()
        return pid if pid is not None and self._is_ours(pid) else None

    def is_running(self) -> bool:
        return self._pid() is not None

    def _listening(self, pid: int) -> bool:
        """``pid`` itself holds a listening socket on listen_host:port. A plain connect
        cannot tell: PgBouncer only warns when the TCP port is taken and carries on with
        its Unix socket, and the connect would reach whoever holds the port."""
        table, local = _proc_net_address(self.listen_host, self.port)
        inodes: set[str] = set()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[1] == local and cols[3] == "0A":  # 0A: LISTEN
                    inodes.add(cols[9])
        if not inodes:
            return False
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return True
        return False

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> bytes:
        try:
            with open(self.log_file, "rb") as f:
                if f.seek(0, os.SEEK_END) < offset:  # truncated meanwhile
                    offset = 0
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    def _tail(self, offset: int = 0, lines: int = 15) -> str:
        """The last log lines written since ``offset`` (all of the log if none were)."""
        text = self._log_since(offset) or self._log_since(0)
        return "\n".join(text.decode(errors="replace").splitlines()[-lines:])

    def _fail(self, what: str, offset: int) -> PoolerError:
        return PoolerError(f"pgbouncer on {self.listen_host}:{self.port}: {what}\n"
                           f"{self._tail(offset)}".rstrip())

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout: float = 30) -> None:
        """Start PgBouncer and wait until it listens on listen_host:port. One left running
        by a crashed phloem (found by its pidfile or config path) is stopped first so
        that the current config applies; needs :meth:`write_config` to have run once."""
        self._check()
        if not self.auth_file.exists():
            raise PoolerError(f"pgbouncer on {self.listen_host}:{self.port}: no auth file "
                              f"{self.auth_file}; call write_config() first")
        self.stop()
        make_dir(self.run_dir, 0o700, self.owner)
        for partial in self.run_dir.glob(".*.*"):  # a write a killed platform left half-done
            if partial.name.startswith((f".{self.config_file.name}.",
                                        f".{self.auth_file.name}.")):
                partial.unlink(missing_ok=True)
        self._write(self.config_file, self._ini())
        # A pidfile whose process died (perhaps a zombie nobody reaps, which PgBouncer's
        # own check would take for alive) must not block the new one.
        self.pid_file.unlink(missing_ok=True)
        if not self.log_file.exists():
            self.log_file.touch()
        self.owner.own(self.log_file, 0o600)
        offset = self._log_size()
        try:
            # -q: everything goes to the log file, which PgBouncer opens while reading its
            # config. A new session keeps a terminal's Ctrl-C away from it: the platform
            # decides when it stops.
            argv = [self.binary, "-q", str(self.config_file)]
            kwargs: dict[str, Any] = {
                "cwd": "/", "stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                "stderr": subprocess.DEVNULL, "start_new_session": True,
                **self.owner.popen_kwargs()}
            # Tied: a killed platform's PgBouncer gets SIGINT (its safe shutdown) instead
            # of serving on unsupervised until the next start.
            self._proc = (spawn_tied(argv, signal.SIGINT, **kwargs) if self.tied
                          else subprocess.Popen(argv, **kwargs))
        except OSError as exc:
            raise PoolerError(f"pgbouncer: cannot run {self.binary}: {exc}") from exc
        proc = self._proc
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                raise self._fail(f"exited with code {code} while starting", offset)
            # PgBouncer binds its listeners, then writes the pidfile: from then on the
            # listening check is final.
            if self._pidfile_pid() == proc.pid:
                if self._listening(proc.pid) and self._accepts():
                    return
                error = self._fail("started but does not listen on that TCP port "
                                   "(port in use?)", offset)
                self.stop()
                raise error
            if time.monotonic() > deadline:
                error = self._fail(f"not ready after {timeout:g} s", offset)
                self.stop()
                raise error
            time.sleep(0.01)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.listen_host, self.port), timeout=5):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> None:
        """SIGINT (PgBouncer's safe shutdown: running transactions finish, idle clients
        are disconnected), then SIGKILL for whatever is left after ``timeout``.
        Idempotent; also stops a PgBouncer left by an earlier phloem process."""
        self._reap()
        pids = self._pids()
        if self._proc is not None:
            pids.add(self._proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        if not self._wait_gone(pids, timeout):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not self._wait_gone(pids, 10):
                raise PoolerError(f"pgbouncer on {self.listen_host}:{self.port}: pids "
                                  f"{sorted(pids)} survived SIGKILL")
        # After a SIGKILL they are stale; after a clean exit PgBouncer removed them.
        self.pid_file.unlink(missing_ok=True)
        self.unix_socket.unlink(missing_ok=True)

    def _wait_gone(self, pids: set[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            child = self._proc.pid if self._proc is not None else None
            if not any(pid == child or self._is_ours(pid) for pid in pids):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
