"""The firewall used when no rules can be installed: it does nothing and says why.

    firewall = NoFirewall("nft not found")
    firewall.state        # "unavailable: nft not found"
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class NoFirewall:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    @property
    def state(self) -> str:
        return f"unavailable: {self.reason}"

    def describe(self) -> dict[str, Any]:
        return {"state": self.state}

    async def start(self, shared_ports: Iterable[int],
                    functions: Mapping[int, Iterable[int]]) -> None:
        pass

    async def allow_function(self, uid: int, ports: Iterable[int]) -> None:
        pass

    async def forget_function(self, uid: int) -> None:
        pass

    async def stop(self) -> None:
        pass
