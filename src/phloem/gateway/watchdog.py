"""The one timer of a client connection: the keep-alive wait and the time to complete a
request head, the upstream's time to first byte, and stream silence.

    watch = Watchdog(loop, owner)
    watch.ttfb(900.0, 900.0)   # the request head went upstream
    watch.silence(now)         # the final response head arrived
    watch.unwatch()            # the exchange ended

Every phase sets a deadline; the timer is moved only when it would fire too late. One that
fires early (the deadline moved on since it was armed) re-arms itself, so with the defaults
a busy keep-alive connection arms about one timer per keep-alive period instead of one or
two per request; bytes only stamp a time (``owner.last_io``).
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

__all__ = ["KEEP_ALIVE", "NONE", "SILENCE", "TTFB", "Watchdog", "Watched"]

# What the timer is watching: nothing (routing, cold start), the keep-alive wait for the
# next request head, time to first byte, or stream silence.
NONE: Final = 0
KEEP_ALIVE: Final = 1
TTFB: Final = 2
SILENCE: Final = 3


class Watched(Protocol):
    """What a :class:`Watchdog` reports to (the client connection)."""

    #: Loop time of the last byte either way.
    last_io: float

    def keep_alive_expired(self) -> None: ...

    def ttfb_expired(self, timeout: float) -> None: ...

    def silence_expired(self, timeout: float) -> None: ...


class _Nobody:
    """The owner of a stopped watchdog (whose timer is cancelled: never told anything)."""

    last_io = 0.0

    def keep_alive_expired(self) -> None:
        pass

    def ttfb_expired(self, timeout: float) -> None:
        pass

    def silence_expired(self, timeout: float) -> None:
        pass


_NOBODY = _Nobody()


class Watchdog:
    __slots__ = ("_handle", "_loop", "_owner", "_when", "deadline", "phase", "silence_s",
                 "ttfb_s")

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: Watched) -> None:
        self._loop = loop
        self._owner = owner
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self.phase = NONE
        self.deadline = 0.0  # of the keep-alive wait or the time to first byte
        self.ttfb_s = 0.0
        self.silence_s = 0.0

    def keep_alive(self, timeout: float) -> None:
        """Waiting for the next request head: complete within ``timeout`` seconds."""
        self.phase = KEEP_ALIVE
        self.deadline = deadline = self._loop.time() + timeout
        if self._handle is None or self._when > deadline:
            self._arm(deadline)

    def head(self, timeout: float) -> None:
        """A request head has begun while waiting for it: it must be complete within
        ``timeout`` seconds (if that is sooner than the keep-alive deadline)."""
        deadline = self._loop.time() + timeout
        if deadline < self.deadline:
            self.deadline = deadline
            if self._handle is None or self._when > deadline:
                self._arm(deadline)

    def ttfb(self, timeout: float, silence: float, now: float | None = None) -> None:
        """The request head went upstream (at loop time ``now``, default the loop's
        time): its final response head must start in time."""
        self.phase = TTFB
        self.ttfb_s = timeout
        self.silence_s = silence
        self.deadline = deadline = (self._loop.time() if now is None else now) + timeout
        if self._handle is None or self._when > deadline:
            self._arm(deadline)

    def silence(self, now: float) -> None:
        """The final response head arrived (at loop time ``now``): from now on only
        silence is limited."""
        self.phase = SILENCE
        deadline = now + self.silence_s
        if self._handle is None or self._when > deadline:
            self._arm(deadline)

    def unwatch(self) -> None:
        """Nothing to watch (the timer stays armed: it is cheaper to let it fire early)."""
        self.phase = NONE

    def stop(self) -> None:
        """For good: the owner's connection is over (and is let go of: no cycle)."""
        self.phase = NONE
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._owner = _NOBODY

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._when = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        phase = self.phase
        if phase == NONE:
            return
        now = self._loop.time()
        if phase == SILENCE:
            deadline = self._owner.last_io + self.silence_s
            if deadline - now > 0.001:
                self._arm(deadline)  # bytes flowed meanwhile
                return
            self._owner.silence_expired(self.silence_s)
            return
        if self.deadline - now > 0.001:
            self._arm(self.deadline)  # armed for an earlier deadline
            return
        if phase == KEEP_ALIVE:
            self.phase = NONE
            self._owner.keep_alive_expired()
        else:
            self._owner.ttfb_expired(self.ttfb_s)
