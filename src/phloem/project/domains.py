"""A project's custom domains: what its config declares for a branch, the plan against
what the platform has, and applying it (``phloem config plan``, ``phloem deploy``).

As ``@neon/config`` 1.8 resolves ``customDomains``: a function's own list applies on
the default branch only; the ``branch`` closure's ``functions.<slug>.customDomains``
replaces it on any branch (``[]``: none). A domain belongs to one branch, so a name
another branch holds is skipped, and the plan says so; the domains this project declared
on the branch before and no longer does are removed; others' are left alone.

    wanted, note = function_domains("neon.ts: functions.api", spec.get("customDomains"),
                                    extra, "customDomains", branch.is_default)
    dp = plan_domains(client, "br-…", {"api.example.com": "api"}, owner, notes)
    for line in dp.lines(): print(line)
    result = apply_domains(client, "main", dp, owner)      # PUT /branches/main/domains
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from phloem.project.client import Client
from phloem.project.errors import ConfigError
from phloem.system.hostnames import hostname_problem, normalize_hostname

__all__ = ["DomainPlan", "apply_domains", "check_unique", "function_domains",
           "plan_domains"]


def function_domains(where: str, declared: Any, tuning: Mapping[str, Any], key: str,
                     is_default: bool) -> tuple[tuple[str, ...] | None, str | None]:
    """(the function's domains on this branch, or None: no list applies here; a note
    when its own list was left out because the branch is not the default one)."""
    if key in tuning:
        return _check(f"{where}.{key} (branch)", tuning[key]), None
    if declared is None:
        return None, None
    names = _check(f"{where}.{key}", declared)
    if is_default:
        return names, None
    if not names:
        return None, None
    return None, (f"{where}.{key}: {', '.join(names)} apply to the default branch only "
                  f"(set {key} in the branch closure for this one)")


def _check(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"{where}: must be a list of host names "
                          f"(got {type(value).__name__})")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{where}[{i}]: must be a host name string")
        problem = hostname_problem(item)
        if problem is not None:
            raise ConfigError(f"{where}[{i}]: {problem}")
        name = normalize_hostname(item)
        if name in out:
            raise ConfigError(f"{where}[{i}]: {name} is listed more than once")
        out.append(name)
    return tuple(out)


def check_unique(config_name: str, per_function: Mapping[str, tuple[str, ...] | None],
                 ) -> dict[str, str]:
    """hostname -> slug over every function; a name two functions claim is an error."""
    out: dict[str, str] = {}
    for slug, names in per_function.items():
        for name in names or ():
            if name in out:
                raise ConfigError(f"{config_name}: custom domain {name!r} is used by "
                                        f"both function {out[name]!r} and {slug!r}")
            out[name] = slug
    return out


@dataclass
class DomainPlan:
    #: hostname -> slug: what this project declares on the branch.
    declared: dict[str, str]
    add: list[str] = field(default_factory=list)
    update: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    #: hostname -> why it is skipped (another branch holds it).
    skip: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The project declares or owns domains here: apply must send its set.
    send: bool = False

    def lines(self) -> list[str]:
        out = [f"add       {h} -> {self.declared[h]}" for h in self.add]
        out += [f"update    {h} -> {self.declared[h]}" for h in self.update]
        out += [f"remove    {h} (no longer declared)" for h in self.remove]
        out += [f"unchanged {h}" for h in self.unchanged]
        out += [f"skip      {h}: {why}" for h, why in self.skip.items()]
        return out + [f"note      {n}" for n in self.notes]

    def as_dict(self) -> dict[str, Any]:
        return {"add": self.add, "update": self.update, "remove": self.remove,
                "unchanged": self.unchanged, "skip": self.skip, "notes": self.notes}


def plan_domains(client: Client, branch_id: str, declared: dict[str, str],
                 owner: str | None, notes: list[str] | None = None) -> DomainPlan:
    """Compare ``declared`` (hostname -> slug) with the platform's domains."""
    plan = DomainPlan(dict(declared), notes=list(notes or []))
    live = {d["hostname"]: d for d in client.json("GET", "/domains")}
    for name, slug in sorted(declared.items()):
        have = live.get(name)
        if have is None:
            plan.add.append(name)
        elif have["branch_id"] != branch_id:
            plan.skip[name] = (f"belongs to branch {have['branch']}: a domain serves one "
                               "branch and is not inherited; skipped")
        elif have["function"] != slug or have["owner"] != owner:
            plan.update.append(name)
        else:
            plan.unchanged.append(name)
    plan.remove = sorted(h for h, d in live.items() if d["branch_id"] == branch_id
                         and owner is not None and d["owner"] == owner
                         and h not in declared)
    plan.send = bool(declared) or bool(plan.remove)
    return plan


def apply_domains(client: Client, branch: str, plan: DomainPlan,
                  owner: str | None) -> dict[str, Any] | None:
    """Make this project's domains on ``branch`` the declared ones; the API's answer
    (``domains``, ``skipped``), or None when there was nothing to send."""
    if not plan.send:
        return None
    body = {"domains": {h: {"function": s} for h, s in plan.declared.items()},
            "owner": owner}
    result: dict[str, Any] = client.json("PUT", f"/branches/{quote(branch, safe='')}/domains",
                                         json=body)
    return result
