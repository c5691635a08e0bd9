"""Admission control for phloem's two listeners, the gateway and the control API: what
keeps idle or unfinished connections (a slowloris, a connection flood) from using up the
process's file descriptors and locking everyone else out.

    admission = Admission("gateway", AdmissionConfig(max_connections=9000, max_per_peer=1024,
                                                     head_timeout_s=10.0))
    listener = await Listener.open("127.0.0.1", 8787, lambda: MyProtocol(admission), admission)
    ...
    listener.close()

A :class:`Listener` accepts connections itself (not ``loop.create_server``, whose accept
loop, libuv's in uvloop, silently accepts and closes every pending connection once the
process is out of descriptors). For each accepted socket it asks its :class:`Admission`:

* **per peer**: a client address with ``max_per_peer`` connections open gets no more
  (``per_peer``). Peers in ``exempt`` (the gateway's trusted proxies, which carry many
  clients' connections) are not capped: the proxy in front limits its own clients.
* **per listener**: at ``max_connections`` the connection that has waited longest for a
  request head (a fresh connection that sent nothing, an unfinished head, an idle
  keep-alive connection, one still in its PROXY header or TLS handshake) is closed to make
  room (``evicted``); when every connection is busy with a request the new one is refused
  (``capacity``). The PROXY header and the TLS handshake together have ``head_timeout_s``.
* **descriptors**: each listener holds one spare descriptor. If ``accept`` still fails
  with EMFILE/ENFILE, the spare is released to accept the connection, which gets the
  room of the longest-waiting connection, or is closed (``descriptors``); the spare is
  taken back as soon as a descriptor is free. A refused connection gets a 503 and is closed.

The protocols report the rest: :meth:`Admission.waiting` when a connection starts waiting
for a request head, :meth:`Admission.closed` when it is gone, and
:meth:`Admission.limit_hit` (``head_timeout``) when a head did not arrive within
``head_timeout_s`` (the protocol closes it, with a 408 if part of a head came).

Every limit hit is counted per reason (``refused``, read by the metrics at scrape time) and
logged, at most one line per listener and reason every ``LOG_INTERVAL_S`` seconds, the
next line saying how many more there were.

:func:`plan_connections` splits the descriptor limit between the listeners and what the
platform needs besides (upstream connections to isolates, spawns, databases, logs).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, cast

__all__ = [
    "REASONS",
    "Admission",
    "AdmissionConfig",
    "ConnectionPlan",
    "Listener",
    "Tracked",
    "fd_limit",
    "plan_connections",
]

logger = logging.getLogger("phloem.gateway.admission")

#: Why a connection was refused or closed by a limit (the ``reason`` label).
REASONS = ("per_peer", "capacity", "evicted", "head_timeout", "descriptors")
#: At most one log line per listener and reason this often; the next one counts the rest.
LOG_INTERVAL_S = 10.0
#: Connections accepted per readiness event before other callbacks get the loop.
ACCEPT_BATCH = 128
#: After EMFILE with no spare descriptor left: wait this long before accepting again.
EMFILE_PAUSE_S = 0.1
#: Connections closed to make room after EMFILE: the new one may need more than its own
#: descriptor (the gateway's upstream connection for its request).
EMFILE_EVICT = 4
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The peer gave up before accept (or a transient network error): try the next one.
_SKIP = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                   errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                   errno.EOPNOTSUPP, errno.ENETUNREACH})
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")
_REFUSAL_BODY = (b'{"error": {"code": "too_many_connections", "message": "too many '
                 b'connections: %s"}}')


@dataclass(frozen=True)
class AdmissionConfig:
    #: Client connections open at once on the listener.
    max_connections: int
    #: Client connections open at once from one peer address; 0: no cap.
    max_per_peer: int = 1024
    #: Seconds a connection has to send a complete request head: from accept for the first
    #: request, from its first byte for later ones.
    head_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections: must be at least 1 (got {self.max_connections})")
        if self.max_per_peer < 0:
            raise ValueError(f"max_connections_per_peer: must be 0 (no cap) or more "
                             f"(got {self.max_per_peer})")
        if not (self.head_timeout_s > 0 and math.isfinite(self.head_timeout_s)):
            raise ValueError(f"head_timeout_s: must be a positive number of seconds "
                             f"(got {self.head_timeout_s})")


class Tracked(Protocol):
    """A connection as admission sees it (a gateway connection, an API protocol)."""

    @property
    def evictable(self) -> bool:
        """Waiting for a request head: nothing is lost by closing it."""
        ...

    def evict(self) -> None:
        """Close it now (its ``connection_lost`` follows)."""
        ...


class Admission:
    """One listener's connection counts, limits and refusal counters (event loop only)."""

    def __init__(self, name: str, config: AdmissionConfig,
                 exempt: Callable[[str], bool] | None = None) -> None:
        self.name = name
        self.config = config
        self._exempt = exempt
        self._peers: dict[str, int] = {}
        self._conns: dict[Tracked, str] = {}  # open connection -> its peer address
        # Connections waiting for a request head, longest waiting first; entries are
        # checked (and dropped if no longer evictable) only when room is needed.
        self._waiting: dict[Tracked, None] = {}
        # Loop time by which a connection handed over after its PROXY header or TLS
        # handshake must have sent its first request head (see first_head_timeout).
        self._head_due: dict[Tracked, float] = {}
        #: Connections refused or closed by a limit, per reason (REASONS).
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self._flush: dict[str, asyncio.TimerHandle] = {}

    @property
    def open(self) -> int:
        """Client connections open now."""
        return len(self._conns)

    # -- the listener's side ----------------------------------------------------------------

    def check(self, ip: str) -> str | None:
        """Whether a connection from ``ip`` may be opened: None, or the reason it may not.
        May close the longest-waiting connection to make room."""
        cap = self.config.max_per_peer
        if cap and self._peers.get(ip, 0) >= cap and not (self._exempt and self._exempt(ip)):
            self.limit_hit("per_peer", ip, f"{cap} connections from it are open "
                           "(max_connections_per_peer)")
            return "per_peer"
        if len(self._conns) >= self.config.max_connections:
            if not self.evict_one():
                self.limit_hit("capacity", ip, f"{len(self._conns)} connections are open "
                               "(max_connections) and every one is busy with a request")
                return "capacity"
            self.limit_hit("evicted", ip, f"{self.config.max_connections} connections are "
                           "open (max_connections): closed the one waiting longest for a "
                           "request head")
        return None

    def opened(self, conn: Tracked, ip: str) -> None:
        self._conns[conn] = ip
        self._peers[ip] = self._peers.get(ip, 0) + 1

    def replace(self, old: Tracked, new: Tracked, head_due: float) -> str | None:
        """``new`` takes ``old``'s place (same peer, same count), and must have sent its
        first request head by loop time ``head_due``; the peer's address, or None when
        ``old`` is no longer open (evicted)."""
        self._waiting.pop(old, None)
        ip = self._conns.pop(old, None)
        if ip is not None:
            self._conns[new] = ip
            self._head_due[new] = head_due
        return ip

    def first_head_timeout(self, conn: Tracked) -> float:
        """Seconds ``conn`` has left for its first request head: ``head_timeout_s`` from
        accept, of which its PROXY header and TLS handshake took their share. Asked once,
        when the protocol starts waiting for that head."""
        due = self._head_due.pop(conn, None)
        if due is None:
            return self.config.head_timeout_s
        return max(0.001, due - asyncio.get_running_loop().time())

    def evict_one(self) -> bool:
        """Close the connection waiting longest for a request head; False if none is."""
        waiting = self._waiting
        while waiting:
            conn = next(iter(waiting))
            del waiting[conn]
            if conn in self._conns and conn.evictable:
                self.closed(conn)  # counted out now: its close completes later
                conn.evict()
                return True
        return False

    # -- the protocol's side ----------------------------------------------------------------

    def waiting(self, conn: Tracked) -> None:
        """``conn`` now waits for a request head (fresh, or between requests)."""
        waiting = self._waiting
        waiting.pop(conn, None)
        waiting[conn] = None

    def closed(self, conn: Tracked) -> None:
        """``conn`` is gone (idempotent)."""
        self._waiting.pop(conn, None)
        if self._head_due:
            self._head_due.pop(conn, None)
        ip = self._conns.pop(conn, None)
        if ip is None:
            return
        n = self._peers.get(ip, 0) - 1
        if n > 0:
            self._peers[ip] = n
        else:
            self._peers.pop(ip, None)

    def limit_hit(self, reason: str, peer: str, detail: str) -> None:
        """Count a limit hit and log it (rate-limited)."""
        self.refused[reason] += 1
        now = time.monotonic()
        last = self._logged.get(reason)
        if last is None or now - last >= LOG_INTERVAL_S:
            self._logged[reason] = now
            logger.warning("%s: connection limit %s: %s (peer %s); further ones are "
                           "counted in phloem_connections_refused_total and summed up "
                           "here at most every %g s", self.name, reason, detail, peer or "?",
                           LOG_INTERVAL_S)
            return
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        if reason not in self._flush:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # summed up with the next line instead
            self._flush[reason] = loop.call_later(last + LOG_INTERVAL_S - now + 0.01,
                                                  self._log_unlogged, reason)

    def _log_unlogged(self, reason: str) -> None:
        self._flush.pop(reason, None)
        n = self._unlogged.pop(reason, 0)
        if n:
            self._logged[reason] = time.monotonic()
            logger.warning("%s: connection limit %s: %d more in the last %g s", self.name,
                           reason, n, LOG_INTERVAL_S)

    def close(self) -> None:
        for handle in self._flush.values():
            handle.cancel()
        self._flush.clear()


def fd_limit() -> int:
    """This process's descriptor limit (RLIMIT_NOFILE, soft)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@dataclass(frozen=True)
class ConnectionPlan:
    gateway: int
    api: int
    #: Descriptors left for everything else (upstream connections, spawns, databases).
    rest: int
    warning: str | None = None


def plan_connections(limit: int, gateway: int = 0, api: int = 256) -> ConnectionPlan:
    """Split ``limit`` descriptors: ``api`` for the control API, then a reserve for the
    platform's own files, pipes and database connections (an eighth of the limit, 64 to
    1024), and half of the rest for the gateway's clients (``gateway`` 0: auto), so each
    client connection in a request can also hold its upstream connection to an isolate.

        plan_connections(20000)  # ConnectionPlan(gateway=9360, api=256, rest=...)
    """
    reserve = min(1024, max(64, limit // 8))
    api = api or max(1, min(256, limit // 8))  # 0: auto, as for the gateway
    auto = max(16, (limit - reserve - api) // 2)
    gw = gateway or auto
    warning = None
    if gateway and gateway > auto:
        warning = (f"max_connections {gateway} is more than half of the {limit} descriptors "
                   f"this process may open, less the API's {api} and a reserve of "
                   f"{reserve}: a connection flood can leave none for isolates' connections")
    elif api > limit // 4:
        warning = (f"api_max_connections {api} is more than a quarter of the {limit} "
                   "descriptors this process may open: a flood of the API can leave too few "
                   "for the gateway and isolates")
    return ConnectionPlan(gw, api, limit - gw - api, warning)


#: ``preamble(sock, protocol) -> keep``: see :attr:`Listener.preamble`.
Preamble = Callable[[socket.socket, asyncio.Protocol], Awaitable[bool]]


class Listener(asyncio.AbstractServer):
    """A listening TCP socket whose accept loop asks an :class:`Admission` first; the
    admitted connections go to ``factory()`` protocols on the running loop."""

    def __init__(self, socks: list[socket.socket], factory: Callable[[], asyncio.Protocol],
                 admission: Admission, tls: ssl.SSLContext | None = None,
                 preamble: Preamble | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._socks = socks
        self._factory = factory
        self.admission = admission
        #: Connections are TLS (the handshake has ``head_timeout_s`` to complete).
        self.tls = tls
        #: Run on each admitted socket before TLS and the protocol (the PROXY protocol);
        #: False closes the connection.
        self.preamble = preamble
        self._spare: int | None = None
        self._serving = False
        self._tasks: set[asyncio.Task[object]] = set()
        self._retry: asyncio.TimerHandle | None = None

    @classmethod
    async def open(cls, host: str, port: int, factory: Callable[[], asyncio.Protocol],
                   admission: Admission, *, backlog: int = 1024,
                   tls: ssl.SSLContext | None = None,
                   preamble: Preamble | None = None) -> Listener:
        """Bind and listen on every address of ``host`` (as ``loop.create_server``);
        with ``tls``, each connection's handshake comes before its protocol."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        socks: list[socket.socket] = []
        try:
            for family, type_, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, type_, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in socks:
                sock.close()
            raise
        listener = cls(socks, factory, admission, tls, preamble)
        listener._take_spare()
        listener._start()
        return listener

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._socks)

    def _start(self) -> None:
        self._serving = True
        for sock in self._socks:
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)

    def _stop_reading(self) -> None:
        for sock in self._socks:
            self._loop.remove_reader(sock.fileno())

    def _take_spare(self) -> bool:
        if self._spare is None:
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def _on_readable(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._out_of_fds(sock, exc)
                    return
                if exc.errno in _SKIP or exc.errno == errno.ECONNRESET:
                    continue
                logger.exception("%s: accept failed", self.admission.name)
                return
            self._admit(conn, addr)
        if self._spare is None:
            self._take_spare()

    def _admit(self, conn: socket.socket, addr: object) -> None:
        ip = str(addr[0]) if isinstance(addr, tuple) and addr else ""
        reason = self.admission.check(ip)
        if reason is not None:
            _refuse(conn, reason, http=self.tls is None)
            return
        try:
            # The loop's transport makes the socket non-blocking and sets TCP_NODELAY
            # (uvloop's and asyncio's both): only a PROXY header, read before there is a
            # transport, needs it sooner. Two system calls fewer per connection.
            if self.preamble is not None:
                conn.setblocking(False)
            protocol = self._factory()
        except Exception:
            conn.close()
            logger.exception("%s: could not set up a connection", self.admission.name)
            return
        tracked = cast(Tracked, protocol)  # the factory's protocols implement Tracked
        if self.tls is None and self.preamble is None:
            # Plain: the protocol is made at once and tracks itself.
            self.admission.opened(tracked, ip)
            task = self._loop.create_task(self._connect(protocol, protocol, tracked, conn))
        else:
            # A PROXY header and a TLS handshake come before the protocol is made: until
            # then the connection is tracked, and evictable, as an _Opening.
            opening = _Opening(self.admission, protocol, tracked,
                               self._loop.time() + self.admission.config.head_timeout_s)
            self.admission.opened(opening, ip)
            self.admission.waiting(opening)
            task = opening.task = self._loop.create_task(
                self._connect(protocol, _Handover(opening), opening, conn))
            # Evicted before the task ran: its coroutine never starts, so close here.
            task.add_done_callback(lambda t: conn.close() if t.cancelled() else None)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, protocol: asyncio.Protocol, start: asyncio.Protocol,
                       tracked: Tracked, conn: socket.socket) -> None:
        """Read the PROXY header, make the transport (after the TLS handshake) with
        ``start`` (``protocol`` or its _Handover), all within the head timeout."""
        loop = self._loop
        deadline = (tracked.head_due if isinstance(tracked, _Opening)
                    else loop.time() + self.admission.config.head_timeout_s)
        try:
            if self.preamble is not None and not await self.preamble(conn, protocol):
                self.admission.closed(tracked)
                conn.close()
                return
            if self.tls is None:
                await loop.connect_accepted_socket(lambda: start, conn)
            else:
                # The PROXY header and the handshake share the head timeout.
                await loop.connect_accepted_socket(
                    lambda: start, conn, ssl=self.tls,
                    ssl_handshake_timeout=max(0.001, deadline - loop.time()))
        except (Exception, asyncio.CancelledError) as exc:
            # The transport (if made) closes the socket; close() only drops our reference.
            self.admission.closed(tracked)
            conn.close()
            if isinstance(exc, asyncio.CancelledError):
                if isinstance(tracked, _Opening) and tracked.evicted:
                    return  # closed to make room before its handshake completed
                raise
            if self.tls is not None and isinstance(exc, (ssl.SSLError, OSError,
                                                         TimeoutError)):
                # A client that cannot or will not complete a handshake (an old TLS
                # version, a scanner, a timeout) is not the platform's problem.
                logger.debug("%s: TLS handshake failed: %s", self.admission.name, exc)
                return
            logger.warning("%s: a connection failed to start: %s", self.admission.name, exc)

    def _out_of_fds(self, sock: socket.socket, exc: OSError) -> None:
        """accept failed for want of a descriptor: use the spare one to take the
        connection, make room for it or refuse it, and never leave it unanswered."""
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            try:
                conn, addr = sock.accept()
            except OSError:
                conn = None
            if conn is not None:
                ip = str(addr[0]) if isinstance(addr, tuple) and addr else ""
                evicted = sum(self.admission.evict_one() for _ in range(EMFILE_EVICT))
                if evicted:
                    self.admission.limit_hit("descriptors", ip, f"accept failed ({exc.strerror}): "
                                             f"closed the {evicted} connection(s) waiting "
                                             "longest for a request head to admit a new one")
                    self._admit(conn, addr)
                else:
                    self.admission.limit_hit("descriptors", ip, f"accept failed "
                                             f"({exc.strerror}) and no connection is idle: "
                                             "refused the new one")
                    _refuse(conn, "descriptors", http=self.tls is None)
                    self._take_spare()
        else:
            self.admission.limit_hit("descriptors", "", f"accept failed ({exc.strerror}) "
                                     f"and the spare descriptor is in use: pausing accepts "
                                     f"for {EMFILE_PAUSE_S:g} s")
        if self._spare is None:
            # Nothing more can be accepted until a descriptor is free: stop polling (the
            # listening socket stays readable) and try again shortly.
            self._stop_reading()
            if self._retry is None:
                self._retry = self._loop.call_later(EMFILE_PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._serving:
            return
        if self._take_spare():
            self._start()
        else:
            self._retry = self._loop.call_later(EMFILE_PAUSE_S, self._resume)

    # -- asyncio.AbstractServer ---------------------------------------------------------------

    def close(self) -> None:
        if self._serving:
            self._stop_reading()
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self._socks:
            sock.close()
        self._socks = []
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self.admission.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        return None


class _Opening:
    """A connection whose protocol does not exist yet (its PROXY header or TLS handshake
    is under way), as admission tracks it: evictable (nothing is lost by closing it, and a
    flood of slow handshakes must not lock the listener), then handed over to the protocol
    once the handshake is done (:meth:`handover` stands in as the protocol until then)."""

    __slots__ = ("_admission", "_protocol", "_tracked", "evicted", "head_due", "task")

    def __init__(self, admission: Admission, protocol: asyncio.Protocol,
                 tracked: Tracked, head_due: float) -> None:
        self._admission = admission
        self._protocol = protocol
        self._tracked = tracked
        #: Loop time by which the first request head must be complete (head_timeout_s
        #: after accept): the PROXY header and the handshake come out of it.
        self.head_due = head_due
        self.task: asyncio.Task[None] | None = None
        self.evicted = False

    @property
    def evictable(self) -> bool:
        return True

    def evict(self) -> None:
        # The handshake is cancelled: the loop aborts its transport (uvloop and asyncio
        # close it on a cancelled connect_accepted_socket), _connect drops the socket.
        self.evicted = True
        if self.task is not None:
            self.task.cancel()

    def made(self, transport: asyncio.BaseTransport) -> None:
        """The handshake is done: the protocol takes the transport, and this
        connection's place in admission."""
        admission = self._admission
        ip = admission.replace(self, self._tracked, self.head_due)
        transport.set_protocol(self._protocol)
        if ip is None:  # evicted in the same loop iteration as the handshake completed
            cast(asyncio.Transport, transport).abort()
            return
        self._protocol.connection_made(transport)


class _Handover(asyncio.Protocol):
    """The protocol a TLS or PROXY connection starts with; gone at ``connection_made``."""

    __slots__ = ("_opening",)

    def __init__(self, opening: _Opening) -> None:
        self._opening = opening

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._opening.made(transport)


def _refuse(conn: socket.socket, reason: str, http: bool = True) -> None:
    """Answer 503 without waiting (the send buffer of a new socket is empty) and close
    (only close on a TLS listener: plain bytes would be garbage to a TLS client)."""
    body = _REFUSAL_BODY % reason.replace("_", " ").encode()
    try:
        conn.setblocking(False)
        if http:
            conn.send(_REFUSAL % (len(body), body))
    except OSError:
        pass
    conn.close()
