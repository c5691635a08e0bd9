"""AI Gateway tokens: HMACs of the branch's secret, one per (branch, function).

A token names the function it was made for and proves it with an HMAC-SHA256 of the
branch's 32-byte secret (:mod:`phloem.metadata.ai_gateway`, sealed at rest), so the
gateway checks it in memory, without a query, and a token made for one branch fails on
every other (each branch, a child too, has a secret of its own). Per-function tokens are
what makes per-function usage trustworthy: a request header naming the function would
be the caller's word, and every isolate reaches the gateway from the same loopback
address. ``-`` stands for the branch-wide token (usage counted under function ``''``).

    secret = new_secret()
    token = make_token(secret, "chat")              # "nai.chat.<64 hex>"
    check_token({"br-x": secret}, "br-x", token)    # -> "chat"; None if refused
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

PREFIX = "nai"
_TOKEN_RE = re.compile(r"^nai\.([a-z0-9]{1,20}|-)\.([0-9a-f]{64})$")


def new_secret() -> bytes:
    return os.urandom(32)


def _mac(secret: bytes, function_slug: str) -> str:
    return hmac.new(secret, f"ai-gateway:fn:{function_slug}".encode(),
                    hashlib.sha256).hexdigest()


def make_token(secret: bytes, function_slug: str = "") -> str:
    """The token of ``function_slug`` on the secret's branch ('': branch-wide)."""
    name = function_slug or "-"
    return f"{PREFIX}.{name}.{_mac(secret, function_slug)}"


def check_token(secrets: dict[str, bytes], branch_id: str, token: str) -> str | None:
    """The function slug the token was made for on ``branch_id`` ('' branch-wide), or
    None: malformed, or made for another branch (or a secret since replaced)."""
    match = _TOKEN_RE.match(token)
    secret = secrets.get(branch_id)
    if match is None or secret is None:
        return None
    slug = "" if match.group(1) == "-" else match.group(1)
    return slug if hmac.compare_digest(_mac(secret, slug), match.group(2)) else None
