"""Renamed to :mod:`phloem.supervisor.cgroups.v1`."""

from __future__ import annotations

from phloem.supervisor.cgroups.v1 import CgroupV1Limiter

__all__ = ["CgroupV1Limiter"]
