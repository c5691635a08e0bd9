"""Helpers for function code running in a phloem isolate.

Copied into every Python isolate's runtime. Import-free apart from the standard library.

    from phloem.functions import wait_until
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

_pending: set[asyncio.Future[Any]] = set()


def wait_until(work: Awaitable[Any]) -> None:
    """Keep ``work`` running after the response has been sent.

    The isolate is not considered idle while such work is pending. (Budget enforcement
    and eviction accounting arrive with the runtime limits.)
    """
    fut = asyncio.ensure_future(work)
    _pending.add(fut)
    fut.add_done_callback(_pending.discard)


def pending_count() -> int:
    return len(_pending)
