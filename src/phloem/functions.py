"""Helpers for function code running in a phloem isolate.

Copied into every Python isolate's runtime: standard library only.

    from phloem.functions import wait_until

    async def webhook(request):
        wait_until(send_follow_up(request))      # runs on after the response
        return Response(status_code=202)

Work given to :func:`wait_until` keeps the isolate alive (it is not evicted for idleness,
and a redeploy or shutdown waits for it) for at most the function's ``wait_until`` budget
(default 15 min), after which it is cancelled and a line is logged.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

_pending: set[asyncio.Task[Any]] = set()
_notify: Callable[[bool], None] | None = None


def _budget() -> float:
    try:
        return float(os.environ.get("PHLOEM_WAIT_UNTIL_S", "900"))
    except ValueError:
        return 900.0


def set_notifier(notify: Callable[[bool], None]) -> None:
    """Called by the isolate host: ``notify(True)`` when background work starts pending,
    ``notify(False)`` when none is left."""
    global _notify
    _notify = notify


async def _run(work: Awaitable[Any], budget: float) -> None:
    started = time.monotonic()
    try:
        await asyncio.wait_for(work, budget)
    except TimeoutError:
        print(f"phloem: wait_until work cancelled after its {budget:g} s budget",
              file=sys.stderr, flush=True)
    except asyncio.CancelledError:
        print(f"phloem: wait_until work cancelled after {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
        raise
    except Exception as exc:  # the response is long gone: report, never crash the isolate
        print(f"phloem: wait_until work failed: {exc!r}", file=sys.stderr, flush=True)


def wait_until(work: Awaitable[Any]) -> None:
    """Keep ``work`` running after the response has been sent (Neon's ``waitUntil``)."""
    task = asyncio.ensure_future(_run(work, _budget()))
    if not _pending and _notify is not None:
        _notify(True)
    _pending.add(task)
    task.add_done_callback(_done)


def _done(task: asyncio.Task[Any]) -> None:
    _pending.discard(task)
    if not _pending and _notify is not None:
        _notify(False)


def pending_count() -> int:
    return len(_pending)


async def drain(timeout: float | None = None) -> None:
    """Wait for pending background work (the host calls this before shutdown hooks)."""
    if _pending:
        await asyncio.wait(set(_pending), timeout=timeout)
