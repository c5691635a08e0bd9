"""Renamed to :mod:`phloem.supervisor.cgroups.v2`."""

from __future__ import annotations

from phloem.supervisor.cgroups.v2 import CgroupV2Limiter

__all__ = ["CgroupV2Limiter"]
