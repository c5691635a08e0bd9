"""``phloem dev`` fires the project's schedule triggers at the functions it serves, on
their cron (UTC), with the request a platform sends (``control/triggers.py``'s
``Delivery``: the same headers, body and isolate lease), so a trigger handler can be
tried locally. One attempt per minute due, its answer printed; the platform's retries and
history are not kept in dev. Disabled triggers (``enabled: false``) do not fire.

    dev_triggers = DevTriggers(check_triggers(project.triggers), deliver, "br-…", print)
    await dev_triggers.tick()        # what run() does every second; returns the answers
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime

from phloem.control.cron import parse_cron
from phloem.control.triggers import Deliver, DeliveryFailed, utc_now
from phloem.metadata.store import new_id
from phloem.metadata.triggers import TriggerRow, TriggerSpec

TICK_S = 1.0


class DevTriggers:
    """The enabled ``specs`` fired through ``deliver`` at their minutes."""

    def __init__(self, specs: list[TriggerSpec], deliver: Deliver, branch_id: str,
                 say: Callable[[str], None], clock: Callable[[], datetime] = utc_now) -> None:
        self.specs = [s for s in specs if s.enabled]
        self.deliver = deliver
        self.branch_id = branch_id
        self.say = say
        self.next_due: dict[str, datetime] = {}
        self.set_clock(clock)

    def set_clock(self, clock: Callable[[], datetime]) -> None:
        """Use ``clock`` (tests move time) and count each trigger's next minute from its
        now: from dev's start, no catching up."""
        self.clock = clock
        now = clock()
        self.next_due = {s.name: parse_cron(s.cron).next_after(now) for s in self.specs}

    def _row(self, spec: TriggerSpec) -> TriggerRow:
        now = self.clock()
        return TriggerRow(id=f"dev-{spec.name}", branch_id=self.branch_id, name=spec.name,
                          function_slug=spec.function, cron=spec.cron,
                          function_path=spec.function_path, enabled=True, owner=None,
                          created_at=now, updated_at=now)

    async def tick(self) -> dict[str, int | None]:
        """Fire every trigger whose minute has come; trigger name -> the function's
        status (None: not delivered, the reason printed)."""
        now = self.clock()
        due = [s for s in self.specs if self.next_due[s.name] <= now]
        scheduled = {s.name: self.next_due[s.name] for s in due}
        for spec in due:  # before any await: an overlapping tick cannot fire it twice
            self.next_due[spec.name] = parse_cron(spec.cron).next_after(now)
        answers = await asyncio.gather(*(self.fire(s, scheduled[s.name]) for s in due))
        return {s.name: status for s, status in zip(due, answers, strict=True)}

    async def fire(self, spec: TriggerSpec, scheduled_for: datetime) -> int | None:
        run_id = new_id("inv", 8)
        try:
            status = await self.deliver(self._row(spec), run_id, scheduled_for, 1)
        except DeliveryFailed as exc:
            self.say(f"[{spec.function}] trigger {spec.name}: not delivered: {exc}")
            return None
        self.say(f"[{spec.function}] trigger {spec.name}: POST {spec.function_path} "
                 f"{status} ({run_id})")
        return status

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every second until ``stop``; a slow delivery does not hold the others."""
        ticks: set[asyncio.Task[dict[str, int | None]]] = set()
        try:
            while not stop.is_set():
                task = asyncio.create_task(self.tick())
                ticks.add(task)
                task.add_done_callback(ticks.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), TICK_S)
        finally:
            for task in ticks:
                task.cancel()
            await asyncio.gather(*ticks, return_exceptions=True)
