"""Open upstream connections that no exchange holds: a stack, the most recently used on
top, so that the least recently used sink to the bottom where they can be trimmed.

An isolate keeps one (:class:`phloem.supervisor.isolate.Isolate`), a branch service's
socket another (:class:`phloem.services.upstream.SocketPool`). It is compiled with the
gateway (phloem.system.native): a lease takes from it and gives back to it on every
request.

    idle = IdleConnections()
    idle.give_back(reader, writer, keep=True)   # kept unless the connection is closing
    pooled = idle.take()                        # (reader, writer), or None
    idle.close_all()
"""

from __future__ import annotations

import asyncio

__all__ = ["IdleConnections"]


class IdleConnections:
    __slots__ = ("_stack",)

    def __init__(self) -> None:
        self._stack: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def __len__(self) -> int:
        return len(self._stack)

    def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used open connection (dead ones on the way are closed), or
        ``None``."""
        stack = self._stack
        while stack:
            pooled = stack.pop()
            if not pooled[0].at_eof() and not pooled[1].is_closing():
                return pooled
            pooled[1].close()
        return None

    def give_back(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                  keep: bool) -> None:
        """Keep the connection for a later exchange if ``keep`` and it is still open, else
        close it."""
        if keep and not writer.is_closing():
            self._stack.append((reader, writer))
        else:
            writer.close()

    def close_oldest(self, count: int) -> None:
        """Close the ``count`` least recently used connections."""
        stack = self._stack
        for _, writer in stack[:count]:
            writer.close()
        del stack[:count]

    def close_all(self) -> None:
        for _, writer in self._stack:
            writer.close()
        self._stack.clear()
