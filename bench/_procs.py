"""Process plumbing for the benchmarks: spawn and always reap servers (uvicorn, nginx,
HAProxy), check for external tools, read a process's RSS / CPU / fds, raw HTTP GETs.

    with Reaper() as reaper:
        app = spawn_uvicorn(reaper, APP_DIR, port=free_port())
        nginx = start_nginx(reaper, tmp, port, "/tmp/x/app.sock")
        haproxy = start_haproxy(reaper, tmp, free_port(), "/tmp/x/app.sock")
    # every process spawned through the reaper is gone here, on every path
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import TypeVar

from phloem.server.lifecycle import MMAP_THRESHOLD, TRIM_THRESHOLD
from phloem.testing import free_port as free_port  # re-exported for the benches

T = TypeVar("T")

TOOLS = {
    "wrk": "apt-get install -y wrk",
    "nginx": "apt-get install -y nginx-light",
    "h2load": "apt-get install -y nghttp2-client",
    "haproxy": "apt-get install -y haproxy",
}

UVICORN_FLAGS = [
    # As phloem's isolates run uvicorn (phloem.runtimes.python.host.serve).
    "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
    "--no-server-header", "--timeout-keep-alive", "3600", "--lifespan", "auto",
]


def missing_tools(names: list[str]) -> list[str]:
    """Lines naming each missing tool and the command that installs it."""
    return [f"  {name}: not found; install with: {TOOLS[name]}"
            for name in names if shutil.which(name) is None]


class Reaper:
    """Owns subprocesses; on exit each gets SIGTERM, then SIGKILL after ``grace`` s."""

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def __enter__(self) -> Reaper:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)




def spawn_uvicorn(reaper: Reaper, app_dir: Path, *, port: int | None = None,
                  uds: str | None = None) -> subprocess.Popen[bytes]:
    """uvicorn serving ``main:app`` from ``app_dir`` on TCP ``port`` or Unix socket ``uds``;
    returns once it answers."""
    where = ["--uds", uds] if uds else ["--host", "127.0.0.1", "--port", str(port)]
    proc = reaper.spawn([sys.executable, "-m", "uvicorn", "main:app", *where, *UVICORN_FLAGS],
                        cwd=app_dir, stdin=subprocess.DEVNULL)
    wait_answering(proc, port=port, uds=uds, what="uvicorn")
    return proc


NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    # An access line per request, buffered, as phloem's gateway writes one for every
    # request (equal work on both sides).
    log_format access '$time_iso8601 gateway access $request_method $uri $status '
                      '$request_time rid=$request_id';
    access_log {tmp}/access.log access buffer=64k flush=1s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    upstream app {{
        server unix:{sock};
        # Idle upstream connections kept: enough for every client of the 256-connection
        # runs, as phloem keeps its pooled ones while busy and HAProxy reuses without a cap
        # (with 64, nginx closed and reopened one for half the requests at 256).
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 3600s;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl} backlog=1024;{tls}
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The headers phloem's gateway adds, so both do the same work.
            proxy_set_header Host $host;
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
"""


#: The server block's TLS lines for ``start_nginx(tls=...)``, as
#: phloem.gateway.tls.server_context: TLS 1.2/1.3, the same 1.2 ciphers, OpenSSL's default
#: groups and 1.3 suites, tickets on, no session cache (phloem keeps none either).
NGINX_TLS = """
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;
        ssl_prefer_server_ciphers off;
        ssl_ecdh_curve auto;
        ssl_session_tickets on;
        ssl_session_cache off;"""


def start_nginx(reaper: Reaper, tmp: Path, port: int, sock: str,
                tls: tuple[Path, Path] | None = None) -> subprocess.Popen[bytes]:
    """nginx, one worker, proxying 127.0.0.1:``port`` to the Unix socket ``sock``; its
    files go in a directory of ``tmp`` named after the port (several may run). With
    ``tls`` (certificate, key) it terminates TLS on that port, otherwise the same."""
    home = tmp / f"nginx-{port}"
    home.mkdir()
    conf = home / "nginx.conf"
    user = "user root root;" if os.geteuid() == 0 else ""  # the socket is in a 0700 dir
    tls_lines = NGINX_TLS.format(cert=tls[0], key=tls[1]) if tls else ""
    conf.write_text(NGINX_CONF.format(user=user, tmp=home, sock=sock, port=port,
                                      ssl=" ssl" if tls else "", tls=tls_lines))
    proc = reaper.spawn(["nginx", "-p", str(home), "-e", str(home / "error.log"), "-c",
                         str(conf)], stdin=subprocess.DEVNULL)
    try:
        wait_answering(proc, port=port, what="nginx")
    except RuntimeError:
        log = home / "error.log"
        raise RuntimeError("nginx did not start:\n"
                           + (log.read_text() if log.exists() else "(no error.log)")) from None
    return proc


HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 8192  # as nginx's worker_connections (2 fds each within RLIMIT_NOFILE)
# An access line per request into an in-memory ring, as phloem's gateway writes one for
# every request (HAProxy writes logs to syslog-style sinks, not files).
ring access
    format raw
    maxlen 512
    size 1048576
defaults
    mode http
    log ring@access local0
    log-format "%t gateway access %HM %HP %ST %Ta rid=%ID"
    timeout connect 5s
    timeout client 60s
    timeout server 3600s
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always
frontend bench
    bind 127.0.0.1:{port} backlog 1024
    # The headers phloem's gateway adds (as nginx is set up to), so all do the same work.
    unique-id-format %[uuid]
    unique-id-header X-Request-Id
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend app
backend app
    server app unix@{sock}
"""


def start_haproxy(reaper: Reaper, tmp: Path, port: int, sock: str) -> subprocess.Popen[bytes]:
    """HAProxy, one process with one thread, keeping idle upstream connections for reuse
    (``http-reuse always``), proxying 127.0.0.1:``port`` to the Unix socket ``sock``."""
    conf = tmp / f"haproxy-{port}.cfg"
    conf.write_text(HAPROXY_CONF.format(port=port, sock=sock))
    log = tmp / f"haproxy-{port}.log"
    # -db: stay in the foreground, no master process (SIGTERM stops it).
    with log.open("wb") as out:
        proc = reaper.spawn(["haproxy", "-db", "-f", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_answering(proc, port=port, what="haproxy")
    except RuntimeError:
        raise RuntimeError(f"haproxy did not start:\n{log.read_text()}") from None
    return proc


FORWARDER = Path(__file__).resolve().parent / "apps" / "forwarder.py"


def start_forwarder(reaper: Reaper, port: int, sock: str,
                    tls: tuple[Path, Path] | None = None,
                    pool: bool = False) -> subprocess.Popen[bytes]:
    """bench/apps/forwarder.py (the floor of a Python proxy: uvloop + httptools, one
    upstream connection per client; with ``pool``, shared ones) proxying
    127.0.0.1:``port`` to the Unix socket ``sock``; with ``tls`` (certificate, key) it
    terminates TLS on that port. Returns once it answers (over TLS: once it accepts a
    connection; a plain GET would not do)."""
    tls_args = ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else []
    pool_args = ["--pool"] if pool else []
    # The allocator setting phloem's gateway makes (phloem.server.lifecycle.
    # keep_large_blocks_on_heap): without it, every TLS read here cost an mmap, an mremap
    # and a munmap, and the floor read low.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
           "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    proc = reaper.spawn([sys.executable, str(FORWARDER), "--port", str(port), "--uds", sock,
                         *tls_args, *pool_args], stdin=subprocess.DEVNULL, env=env)
    if tls is None:
        wait_answering(proc, port=port, what="the forwarder")
    else:
        wait_until(proc, lambda: socket.create_connection(("127.0.0.1", port), 1).close(),
                   what="the TLS forwarder")
    return proc


def http_get(*, port: int | None = None, uds: str | None = None, host: str = "bench",
             path: str = "/", timeout: float = 60.0) -> tuple[int, bytes]:
    """One ``Connection: close`` GET on a fresh socket; (status, body). Raises OSError when
    the server cannot be reached."""
    if uds is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: object = uds
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("127.0.0.1", port)
    with sock:
        sock.settimeout(timeout)
        sock.connect(address)  # type: ignore[arg-type]
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ConnectionError(f"no HTTP response (got {raw[:80]!r})")
    return int(head.split(b" ", 2)[1]), body


def wait_answering(proc: subprocess.Popen[bytes], *, port: int | None = None,
                   uds: str | None = None, what: str, timeout: float = 30.0,
                   poll_s: float = 0.02) -> tuple[int, bytes]:
    """Poll ``proc``'s server every ``poll_s`` until it answers a GET; returns that first
    answer (status, body). Cold-start timers poll every millisecond."""
    return wait_until(proc, lambda: http_get(port=port, uds=uds, timeout=2.0), what=what,
                      timeout=timeout, poll_s=poll_s)


def wait_until(proc: subprocess.Popen[bytes], probe: Callable[[], T], *, what: str,
               timeout: float = 30.0, poll_s: float = 0.02) -> T:
    """Call ``probe`` every ``poll_s`` until it raises no OSError; returns what it returned.
    Fails at once if ``proc`` exits first, else after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            return probe()
        except OSError:
            time.sleep(poll_s)
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s")


# -- /proc ------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(") ", 1)[1].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def tree_cpu_ticks(roots: list[int]) -> int:
    """User + system CPU clock ticks of ``roots`` and every live process below them."""
    total = 0
    for pid in {*roots, *(d for root in roots for d in descendants(root))}:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def wait_quiet(roots: list[int], *, window_s: float = 0.1, max_ticks: int = 1,
               timeout: float = 5.0) -> float:
    """Wait until the process trees of ``roots`` use at most ``max_ticks`` clock ticks of
    CPU in ``window_s`` (a retired isolate has exited, a standby has been replaced, a
    deploy's work is done); returns the seconds waited (``timeout`` if they never were)."""
    t0 = time.monotonic()
    before = tree_cpu_ticks(roots)
    while time.monotonic() - t0 < timeout:
        time.sleep(window_s)
        now = tree_cpu_ticks(roots)
        if now - before <= max_ticks:
            break
        before = now
    return time.monotonic() - t0


def in_other_mount_ns(pid: int) -> list[int]:
    """Processes below ``pid`` in a mount namespace other than ours (sandboxed ones)."""
    ours = os.readlink("/proc/self/ns/mnt")
    found = []
    for child in descendants(pid):
        try:
            if os.readlink(f"/proc/{child}/ns/mnt") != ours:
                found.append(child)
        except OSError:
            continue
    return found


def busiest_descendant(pid: int) -> int | None:
    """The process below ``pid`` holding the most descriptors (with thousands of streams
    open, the isolate serving them, however it was spawned or forked)."""
    best: tuple[int, int] | None = None
    for child in descendants(pid):
        try:
            n = fd_count(child)
        except OSError:
            continue
        if best is None or n > best[0]:
            best = (n, child)
    return best[1] if best else None


def machine() -> str:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{os.cpu_count()} cores ({cpu or 'unknown cpu'}), {mem_kib / 2**20:.1f} GiB RAM, "
            f"Linux {os.uname().release}, Python {sys.version.split()[0]}")


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the caller's cleanup


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so a bench's platforms and servers are
    stopped (``with exit_on_signals(): ...``)."""
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
