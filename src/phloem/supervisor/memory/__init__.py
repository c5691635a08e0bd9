"""Renamed to :mod:`phloem.supervisor.cgroups` (memory, processes and CPU); this name
stays importable for the code that imports it."""

from __future__ import annotations

from phloem.supervisor.cgroups import MemoryLimiter, MemorySlot, choose_limiter

__all__ = ["MemoryLimiter", "MemorySlot", "choose_limiter"]
