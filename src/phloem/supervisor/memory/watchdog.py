"""Renamed to :mod:`phloem.supervisor.cgroups.watchdog`."""

from __future__ import annotations

from phloem.supervisor.cgroups.watchdog import WatchdogLimiter, WatchdogSlot, rss_bytes

__all__ = ["WatchdogLimiter", "WatchdogSlot", "rss_bytes"]
