"""What every firewall backend offers the platform, and which uids it confines.

    uids = ConfinedUids.for_base(1_500_000)      # builds 1_499_999, isolates 1_500_000..
    await firewall.start(shared_ports=[8787], functions={1_500_003: {25432, 25433}})
    await firewall.allow_function(1_500_004, {25434, 25435})
    await firewall.forget_function(1_500_003)
    firewall.state                               # "active" or "unavailable: <why>"
    await firewall.stop()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from phloem.system.identity import ISOLATE_UIDS, build_uid

ACTIVE = "active"


class FirewallError(RuntimeError):
    """A rule could not be installed or changed; the message carries ``nft``'s reason."""


@dataclass(frozen=True)
class ConfinedUids:
    """The uids whose traffic the rules look at: one build uid and the isolates' range."""

    build: int
    isolate_first: int
    isolate_count: int = ISOLATE_UIDS

    @staticmethod
    def for_base(base: int) -> ConfinedUids:
        return ConfinedUids(build=build_uid(base), isolate_first=base)

    @property
    def first(self) -> int:
        return min(self.build, self.isolate_first)

    @property
    def last(self) -> int:
        return max(self.build, self.isolate_first + self.isolate_count - 1)


class Firewall(Protocol):
    """Network rules for isolates and builds (docs/architecture.md, "Network rules").

    Isolate uids may reach local addresses only on the ports allowed for them (their
    branch's PostgreSQL and PgBouncer) and on ``shared_ports`` (the gateway); the build uid
    no local port; both may reach DNS on local addresses and the outside world except
    169.254.0.0/16.
    """

    @property
    def state(self) -> str:
        """``"active"``, or why there are no rules (``"unavailable: <why>"``)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What ``phloem status`` shows under ``components.firewall``."""
        ...

    async def start(self, shared_ports: Iterable[int],
                    functions: Mapping[int, Iterable[int]]) -> None:
        """Install the rules with ``functions`` (uid -> allowed local ports) in one step,
        replacing a stale copy left by a killed run. Never raises: a failure becomes
        ``state``."""
        ...

    async def allow_function(self, uid: int, ports: Iterable[int]) -> None:
        """Let ``uid`` reach exactly ``ports`` on local addresses (replacing what it had)."""
        ...

    async def forget_function(self, uid: int) -> None:
        """``uid`` reaches no local port of its own any more."""
        ...

    async def stop(self) -> None:
        """Remove the rules."""
        ...
