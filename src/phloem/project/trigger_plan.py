"""What a deploy would do to the branch's schedule triggers, for ``config plan``: the same
rules as the platform's ``PUT .../triggers`` (``TriggerStore.replace``): declared ones are
added or changed (a name another project declared is taken over), this project's others
removed, other projects' kept.

    changes = plan_triggers(project.triggers, client.list_triggers("main"), owner)
    [(c.name, c.action, c.reasons) for c in changes]   # [("nightly", "add", [...]), ...]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TriggerChange:
    name: str
    #: add | change | remove | unchanged | keep (another project's: left alone)
    action: str
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "action": self.action, "reasons": self.reasons}


def _declared(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A declared trigger in the API's shape (defaults filled in, cron's spacing as the
    platform stores it)."""
    cron = spec.get("cron")
    return {"function": spec.get("function"),
            "cron": " ".join(cron.split()) if isinstance(cron, str) else cron,
            "functionPath": spec.get("functionPath", "/"),
            "enabled": spec.get("enabled", True)}


def plan_triggers(declared: Mapping[str, Any], live: list[dict[str, Any]],
                  owner: str | None) -> list[TriggerChange]:
    """``declared``: the project's triggers (neon.ts shape); ``live``: the branch's (``GET
    .../triggers``); ``owner``: this project's id (None: it has created nothing yet, so
    nothing is removed)."""
    by_name = {t["name"]: t for t in live}
    changes = []
    for name, spec in sorted(declared.items()):
        want, have = _declared(spec), by_name.get(name)
        if have is None:
            changes.append(TriggerChange(name, "add", [
                f"{want['function']}{want['functionPath']} at {want['cron']} UTC"
                + ("" if want["enabled"] else ", disabled")]))
            continue
        reasons = [f"{key} {have[key]!r} -> {want[key]!r}"
                   for key in ("function", "cron", "functionPath", "enabled")
                   if have[key] != want[key]]
        if have.get("owner") != owner and owner is not None:
            their = have.get("owner")
            reasons.append(f"takes it over from project {their}" if their
                           else "adopts it (created without a project)")
        changes.append(TriggerChange(name, "change" if reasons else "unchanged", reasons))
    for name, have in sorted(by_name.items()):
        if name in declared:
            continue
        if owner is not None and have.get("owner") == owner:
            changes.append(TriggerChange(name, "remove", ["no longer declared"]))
        else:
            whose = have.get("owner")
            changes.append(TriggerChange(name, "keep", [
                f"declared by another project ({whose})" if whose else
                "not declared by a project"]))
    return changes
