"""Renamed to :mod:`phloem.supervisor.cgroups.slot`."""

from __future__ import annotations

from phloem.supervisor.cgroups.hierarchy import writable_dir
from phloem.supervisor.cgroups.slot import JOIN_AND_EXEC, CgroupSlot

__all__ = ["JOIN_AND_EXEC", "CgroupSlot", "writable_dir"]
