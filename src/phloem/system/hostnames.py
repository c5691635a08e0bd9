"""Custom domain names: the rule they follow, shared by the API and the CLI's plan.

The rule is ``@neon/config`` 1.8's (so a neon.ts it accepts is accepted here): trimmed,
lowercased, without a trailing dot; 3-253 characters; labels of letters, digits and
inner hyphens (at most 63); a top-level label of 2-63 letters or an ``xn--`` one. So IP
addresses, single labels (``localhost``) and wildcards are not custom domains.

    normalize_hostname(" API.Example.com. ")       # "api.example.com"
    hostname_problem("api_x.example.com")          # "is not a DNS name (...)"
    under_domain("a.fn.example.com", "fn.example.com")   # True: the platform's own
"""

from __future__ import annotations

import re

__all__ = ["HOSTNAME_RULE", "hostname_problem", "normalize_hostname", "under_domain"]

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(
    rf"^(?=.{{3,253}}$)(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{2,59}})$")
HOSTNAME_RULE = ("a DNS name of 3-253 characters: dot-separated labels of letters, digits "
                 "and inner hyphens, ending in a top-level label of letters "
                 "(e.g. api.example.com)")


def normalize_hostname(value: str) -> str:
    return value.strip().lower().removesuffix(".")


def hostname_problem(value: str) -> str | None:
    """None if ``value`` (normalized) is a usable custom domain, else what is wrong."""
    name = normalize_hostname(value)
    if not name:
        return "is empty"
    if _HOSTNAME_RE.match(name) is None:
        return f"{name!r} is not {HOSTNAME_RULE}"
    return None


def under_domain(name: str, domain: str) -> bool:
    """``name`` is ``domain`` or a name below it (both normalized)."""
    domain = normalize_hostname(domain)
    return name == domain or name.endswith("." + domain)
