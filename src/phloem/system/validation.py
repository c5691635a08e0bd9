"""Input rules shared by the API and the CLI. Each check raises :class:`InvalidInput`
naming the field and the rule."""

from __future__ import annotations

import re

SLUG_RE = re.compile(r"^[a-z0-9]{1,20}$")
ENTRY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV_PREFIXES = ("PHLOEM_", "NEON_")
RESERVED_ENV_NAMES = ("DATABASE_URL", "DATABASE_URL_UNPOOLED")
MAX_ENV_VARS = 1000
MAX_ENV_BYTES = 64 * 1024
MAX_NAME_LEN = 100
# RFC 6750's b64token: what may follow "Authorization: Bearer ".
BEARER_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
MIN_TOKEN_LEN = 16
MAX_TOKEN_LEN = 512
#: A project id (``phloem link`` writes ``prj-<hex>``), recorded as a function's owner.
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class InvalidInput(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_slug(slug: str) -> str:
    if not SLUG_RE.match(slug):
        raise InvalidInput("slug", f"must match ^[a-z0-9]{{1,20}}$ (got {slug!r})")
    return slug


def check_entry(entry: str) -> str:
    if not ENTRY_RE.match(entry):
        raise InvalidInput("entry", f"must look like 'module:attr', e.g. 'main:app' "
                                    f"(got {entry!r})")
    return entry


def check_owner(owner: str) -> str:
    if not OWNER_RE.match(owner):
        raise InvalidInput("owner", f"must match {OWNER_RE.pattern} (a project id, e.g. "
                                    f"'prj-3f9a1c2b7d4e'; got {owner!r})")
    return owner


def check_name(name: str) -> str:
    if not name.strip() or len(name) > MAX_NAME_LEN or any(ord(c) < 32 for c in name):
        raise InvalidInput("name", f"must be 1-{MAX_NAME_LEN} printable characters")
    return name


def check_env(env: dict[str, str]) -> dict[str, str]:
    if len(env) > MAX_ENV_VARS:
        raise InvalidInput("env", f"at most {MAX_ENV_VARS} variables (got {len(env)})")
    total = 0
    for key, value in env.items():
        if not ENV_NAME_RE.match(key):
            raise InvalidInput(f"env.{key}", "names must match [A-Za-z_][A-Za-z0-9_]*")
        if key.startswith(RESERVED_ENV_PREFIXES) or key in RESERVED_ENV_NAMES:
            raise InvalidInput(f"env.{key}", "is reserved: phloem injects DATABASE_URL, "
                               "DATABASE_URL_UNPOOLED and the PHLOEM_/NEON_ prefixes")
        if "\x00" in value:
            raise InvalidInput(f"env.{key}", "values cannot contain NUL bytes")
        total += len(key.encode()) + len(value.encode())
    if total > MAX_ENV_BYTES:
        raise InvalidInput("env", f"at most {MAX_ENV_BYTES} bytes in all (got {total})")
    return env


def check_token(field: str, token: str) -> str:
    """A bearer token chosen by the operator: long enough not to be guessed, and sendable
    in an Authorization header."""
    if not MIN_TOKEN_LEN <= len(token) <= MAX_TOKEN_LEN:
        raise InvalidInput(field, f"must be {MIN_TOKEN_LEN}-{MAX_TOKEN_LEN} characters "
                                  f"(got {len(token)})")
    if not BEARER_TOKEN_RE.match(token):
        raise InvalidInput(field, "may contain only letters, digits and -._~+/ (then '=' "
                                  "padding), as a bearer token")
    return token
