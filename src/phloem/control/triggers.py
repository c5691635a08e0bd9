"""Schedule triggers: a named cron schedule per branch that POSTs to one of its functions.

Declared as ``@neon/config`` 1.8 declares them (``triggers: { name: { function, cron,
functionPath?, enabled? } }``) in ``neon.ts``, or ``triggers=`` in ``phloemfile.py``; the
project deploy sends them to ``PUT /api/v1/branches/{ref}/triggers``. The platform's
:class:`TriggerScheduler` fires each enabled one at the minutes its cron names (UTC) and
:class:`Delivery` sends the request straight to an isolate of the function's active
deployment, leased from the supervisor as the gateway leases one (same isolate limits and
scaling), with an access line in the function's log::

    POST <functionPath>
    X-Neon-Invocation-Id: inv-…            (the same on every attempt of one invocation)
    X-Neon-Trigger: <name>
    traceparent: 00-<trace id>-<span id>-01
    {"version": 1, "invocation_id": "inv-…", "trigger": {"name", "type": "schedule",
     "cron"}, "data": {"scheduled_time": "…Z", "attempt": 1}}

The gateway drops every ``X-Neon-*`` header a client sends, so a function can trust them.
Delivery is at least once: a non-2xx answer or a failure is retried with exponential
backoff up to ``attempts`` times, and a run left unfinished by a stop is delivered again at
the next start. Every run is in the history (``phloem triggers history NAME``).

    scheduler = TriggerScheduler(TriggerStore(pool), delivery, clock=lambda: now)
    await scheduler.start()
    run_id = await scheduler.fire(row, "manual")    # phloem triggers run NAME
    await scheduler.tick()                          # what the loop does every tick_s
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from phloem.control.cron import CronError, parse_cron
from phloem.control.logs import FunctionLogs
from phloem.control.routes import RoutingTable
from phloem.metadata.store import new_id
from phloem.metadata.triggers import TriggerRow, TriggerSpec, TriggerStore
from phloem.supervisor import IsolateFailed, Supervisor
from phloem.system.validation import SLUG_RE, InvalidInput

#: Bucket names (as services/storage/state.py checks them for neon.ts's buckets).
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

logger = logging.getLogger(__name__)

#: Trigger names: what a neon.ts record key may be here (it ends up in a header).
NAME_MAX = 63
TRIGGER_KEYS = {"type", "function", "cron", "functionPath", "enabled"}
#: What a ``type: "storage_object_created"`` trigger has: it fires when an object is created
#: in ``bucket`` (of its branch) under the key ``prefix``.
STORAGE_KEYS = {"type", "function", "bucket", "prefix", "functionPath", "enabled"}
TRIGGER_TYPES = ("schedule", "storage_object_created")
PAYLOAD_VERSION = 1
#: Seconds an attempt may take to get its answer when the function sets no ttfb limit.
ATTEMPT_TIMEOUT_S = 60.0
#: Bytes of an answer read (and dropped) before the connection is closed.
ANSWER_CAP = 1 << 20
#: Runs kept in each trigger's history.
HISTORY_KEEP = 1000


def _is_name(name: str) -> bool:
    return (0 < len(name) <= NAME_MAX and name[0].isalnum()
            and all(c.isalnum() or c in "-_" for c in name) and name.isascii())


def check_triggers(raw: Any, field: str = "triggers") -> list[TriggerSpec]:
    """The declared record, checked: raises :class:`InvalidInput` naming the field
    (``triggers.<name>.cron``) and the rule."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        raise InvalidInput(field, "must be a record of trigger name -> { function, cron, "
                                  "functionPath?, enabled? }")
    out = []
    for name, spec in raw.items():
        where = f"{field}.{name}"
        if not isinstance(name, str) or not _is_name(name):
            raise InvalidInput(where, f"a trigger name is 1-{NAME_MAX} letters, digits, "
                                      "'-' or '_', starting with a letter or digit")
        if not isinstance(spec, Mapping):
            raise InvalidInput(where, "must be { function, cron, functionPath?, enabled? }")
        kind = spec.get("type", "schedule")
        if kind not in TRIGGER_TYPES:
            raise InvalidInput(f"{where}.type", f"must be one of {', '.join(TRIGGER_TYPES)}, "
                               f"got {kind!r}")
        keys = TRIGGER_KEYS if kind == "schedule" else STORAGE_KEYS
        unknown = sorted(set(spec) - keys)
        if unknown:
            raise InvalidInput(f"{where}.{unknown[0]}", f"unknown key (a {kind} trigger "
                               f"has {', '.join(sorted(keys))})")
        fn = spec.get("function")
        if not isinstance(fn, str) or not SLUG_RE.match(fn):
            raise InvalidInput(f"{where}.function", "must name a function of the project "
                               f"(^[a-z0-9]{{1,20}}$, got {fn!r})")
        if kind == "schedule":
            cron = spec.get("cron")
            if not isinstance(cron, str):
                raise InvalidInput(f"{where}.cron", "must be a string of five fields (minute "
                                   f"hour day-of-month month day-of-week, UTC), got {cron!r}")
            try:
                expression = parse_cron(cron).expression
            except CronError as exc:
                raise InvalidInput(f"{where}.cron", str(exc)) from None
            bucket, prefix = None, ""
        else:
            expression, bucket, prefix = "", spec.get("bucket"), spec.get("prefix", "")
            if not isinstance(bucket, str) or not BUCKET_RE.match(bucket):
                raise InvalidInput(f"{where}.bucket", "must name a bucket of the project "
                                   f"(3-63 of a-z, 0-9, '.', '-'), got {bucket!r}")
            if not isinstance(prefix, str) or len(prefix.encode()) > 1024:
                raise InvalidInput(f"{where}.prefix", "must be a key prefix (a string of at "
                                   f"most 1024 bytes), got {prefix!r}")
        path = spec.get("functionPath", "/")
        if (not isinstance(path, str) or not path.startswith("/") or len(path) > 2048
                or any(ord(c) <= 0x20 or ord(c) >= 0x7f for c in path)):
            raise InvalidInput(f"{where}.functionPath", "must be a path starting with '/' "
                               f"(printable ASCII, no spaces), got {path!r}")
        enabled = spec.get("enabled", True)
        if not isinstance(enabled, bool):
            raise InvalidInput(f"{where}.enabled", f"must be true or false, got {enabled!r}")
        out.append(TriggerSpec(name, fn, expression, path, enabled, kind, bucket, prefix))
    return out


def payload(row: TriggerRow, run_id: str, scheduled_for: datetime, attempt: int,
            event: Mapping[str, Any] | None = None) -> bytes:
    """The body POSTed to the function. A storage run's ``data`` is its object (``bucket``,
    ``key``, ``size``, ``etag``, ``content_type``, ``event_time``); a manual run of a
    storage trigger has none."""
    if row.kind == "schedule":
        trigger: dict[str, Any] = {"name": row.name, "type": "schedule", "cron": row.cron}
        data: dict[str, Any] = {"scheduled_time": scheduled_for.astimezone(UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")}
    else:
        trigger = {"name": row.name, "type": row.kind, "bucket": row.bucket,
                   "prefix": row.key_prefix}
        data = dict(event or {})
    return json.dumps({"version": PAYLOAD_VERSION, "invocation_id": run_id,
                       "trigger": trigger, "data": {**data, "attempt": attempt}},
                      separators=(",", ":")).encode()


class DeliveryFailed(Exception):
    """An attempt that got no answer (no deployment, no isolate, a timeout)."""


class Deliver(Protocol):
    async def __call__(self, row: TriggerRow, run_id: str, scheduled_for: datetime,
                       attempt: int, event: Mapping[str, Any] | None = None) -> int:
        """Send one attempt; the answer's status, or raise :class:`DeliveryFailed`."""
        ...


class Delivery:
    """Sends an attempt to an isolate of the function's active deployment."""

    def __init__(self, routes: RoutingTable, supervisor: Supervisor, logs: FunctionLogs,
                 host_of: Callable[[str, str], str]) -> None:
        self.routes = routes
        self.supervisor = supervisor
        self.logs = logs
        self.host_of = host_of

    async def __call__(self, row: TriggerRow, run_id: str, scheduled_for: datetime,
                       attempt: int, event: Mapping[str, Any] | None = None) -> int:
        spec = self.routes.get((row.branch_id, row.function_slug))
        if spec is None:
            raise DeliveryFailed(f"function {row.function_slug!r} has no active deployment "
                                 "on this branch")
        started = time.monotonic()
        try:
            lease = await self.supervisor.acquire(spec)
        except IsolateFailed as exc:
            raise DeliveryFailed(f"no isolate: {exc}") from exc
        body = payload(row, run_id, scheduled_for, attempt, event)
        trace = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        head = (f"POST {row.function_path} HTTP/1.1\r\n"
                f"Host: {self.host_of(row.branch_id, row.function_slug)}\r\n"
                "Content-Type: application/json\r\nUser-Agent: phloem-trigger\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                f"X-Request-Id: {run_id}-{attempt}\r\nX-Neon-Invocation-Id: {run_id}\r\n"
                f"X-Neon-Trigger: {row.name}\r\ntraceparent: {trace}\r\n\r\n")
        limits = lease.limits
        timeout = (limits.ttfb_timeout if limits and limits.ttfb_timeout
                   else ATTEMPT_TIMEOUT_S)
        status: int | None = None
        try:
            lease.writer.write(head.encode("latin-1") + body)
            await lease.writer.drain()
            line = await asyncio.wait_for(lease.reader.readline(), timeout)
            parts = line.split(b" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise DeliveryFailed(f"not an HTTP answer: {line[:80]!r}")
            status = int(parts[1])
            # Read the rest (bounded) so the function finishes its answer before we close.
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(_drain(lease.reader, ANSWER_CAP), timeout)
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise DeliveryFailed(f"no answer: {type(exc).__name__} {exc}".strip()) from exc
        finally:
            lease.release(reusable=False)
            ms = (time.monotonic() - started) * 1000
            self.logs.write(spec.log_path, "trigger", "access",
                            f"POST {row.function_path} {status or '-'} {ms:.1f}ms "
                            f"trigger={row.name} invocation={run_id} attempt={attempt}")
        return status


async def _drain(reader: asyncio.StreamReader, cap: int) -> None:
    """Read to EOF (the request said ``Connection: close``) or ``cap`` bytes."""
    read = 0
    while read < cap:
        chunk = await reader.read(65536)
        if not chunk:
            return
        read += len(chunk)


def utc_now() -> datetime:
    return datetime.now(UTC)


class TriggerScheduler:
    """Fires enabled triggers when their minute comes (checked every ``tick_s``) and
    delivers each run with retries. ``clock`` is injectable: a test moves time and calls
    :meth:`tick`."""

    def __init__(self, store: TriggerStore, deliver: Deliver,
                 clock: Callable[[], datetime] = utc_now, *, tick_s: float = 2.0,
                 attempts: int = 4, backoff_s: float = 1.0) -> None:
        self.store = store
        self.deliver = deliver
        self.clock = clock
        self.tick_s = tick_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        #: Per trigger id: (its cron, the minute up to which it has been considered).
        self._seen: dict[str, tuple[str, datetime]] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for run, row in await self.store.unfinished_runs():
            self._spawn(row, run.id, run.scheduled_for, run.attempts, run.event)
        self._loop = asyncio.create_task(self._run_loop(), name="trigger-scheduler")

    async def stop(self) -> None:
        """Stop firing and cancel deliveries in flight (they stay ``running`` in the
        history and are delivered again at the next start)."""
        tasks = [t for t in (self._loop, *self._runs) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None

    async def _run_loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the database may be down for a while: keep ticking
                logger.exception("trigger tick failed")
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> list[str]:
        """Fire every enabled trigger whose next minute has come; the run ids. A trigger
        first seen (or changed) starts from now: missed minutes are not caught up."""
        now = self.clock()
        fired = []
        rows = await self.store.list_triggers()
        self._seen = {k: v for k, v in self._seen.items() if k in {r.id for r in rows}}
        for row in rows:
            if row.kind != "schedule":
                continue   # fired by object_created
            seen = self._seen.get(row.id)
            if not row.enabled or seen is None or seen[0] != row.cron:
                self._seen[row.id] = (row.cron, now)
                continue
            due = parse_cron(row.cron).next_after(seen[1])
            if due <= now:
                self._seen[row.id] = (row.cron, now)
                fired.append(await self.fire(row, "schedule", due))
        return fired

    async def fire(self, row: TriggerRow, reason: str,
                   scheduled_for: datetime | None = None,
                   event: dict[str, Any] | None = None) -> str:
        """Start a run of ``row`` now (``reason``: schedule, manual or object_created);
        its id."""
        run_id = new_id("inv", 8)
        when = scheduled_for or self.clock()
        await self.store.start_run(run_id, row.id, when, reason, event)
        self._spawn(row, run_id, when, 0, event)
        return run_id

    async def object_created(self, branch_id: str, bucket: str, key: str,
                             object_info: dict[str, Any]) -> list[str]:
        """Fire the branch's enabled storage triggers on ``bucket`` whose prefix ``key``
        starts with; the run ids. ``object_info``: size, etag, content_type."""
        fired = []
        for row in await self.store.list_triggers(branch_id):
            if (row.kind == "storage_object_created" and row.enabled and row.bucket == bucket
                    and key.startswith(row.key_prefix)):
                event = {"bucket": bucket, "key": key, **object_info,
                         "event_time": self.clock().strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
                fired.append(await self.fire(row, "object_created", event=event))
        return fired

    def _spawn(self, row: TriggerRow, run_id: str, when: datetime, done: int,
               event: dict[str, Any] | None = None) -> None:
        task = asyncio.create_task(self._deliver(row, run_id, when, done, event),
                                   name=f"trigger-{row.name}")
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def _deliver(self, row: TriggerRow, run_id: str, when: datetime,
                       done: int, event: dict[str, Any] | None) -> None:
        for attempt in range(done + 1, self.attempts + 1):
            status: int | None = None
            error: str | None = None
            try:
                # A schedule run calls with four arguments, as before storage triggers.
                status = await (self.deliver(row, run_id, when, attempt, event) if event
                                else self.deliver(row, run_id, when, attempt))
                if not 200 <= status < 300:
                    error = f"the function answered {status}"
            except DeliveryFailed as exc:
                error = str(exc)
            except Exception as exc:
                logger.exception("trigger %s delivery failed", row.name)
                error = f"{type(exc).__name__}: {exc}"
            final = error is None or attempt == self.attempts
            state = "running" if not final else ("succeeded" if error is None else "failed")
            await self.store.record_attempt(run_id, attempt, status, error, state)
            if final:
                await self.store.prune_runs(row.id, HISTORY_KEEP)
                return
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
