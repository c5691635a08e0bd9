"""The branch services part of a project's plan: what a deploy would add, change or remove.

    service_changes({"ai": {}}, {"storage": {"buckets": {"img": {}}}})
    # {'ai': 'remove', 'storage': 'add'}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def service_changes(current: Mapping[str, Any],
                    wanted: Mapping[str, Any] | None) -> dict[str, str]:
    """service -> ``add`` / ``change`` / ``remove`` between what a branch has and what its
    config declares (``wanted`` None: the config cannot declare services; no change)."""
    if wanted is None:
        return {}
    out = {name: "add" if name not in current else "change"
           for name, config in wanted.items() if current.get(name) != config}
    out.update({name: "remove" for name in current if name not in wanted})
    return dict(sorted(out.items()))
