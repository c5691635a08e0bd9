"""The AI Gateway's upstream providers, as the operator configures them (``phloem up
--ai-provider``, ``$PHLOEM_AI_PROVIDERS``).

One provider per API family the gateway serves: ``openai`` (any OpenAI-compatible server:
``/v1/...`` and ``/openai/v1/...``) and ``anthropic`` (``/anthropic/v1/messages``). The
URL is the upstream's versioned base, to which the gateway appends what follows the
client's ``/v1``. The key is named, never given: ``key-env=VAR`` is a variable of the
``phloem up`` process, read when the gateway starts, so it is on no command line, in no
setting, no log and no function's env.

    p = parse_ai_provider("openai=https://api.openai.com/v1,key-env=OPENAI_API_KEY")
    p.kind, p.url, p.key_env      # ("openai", "https://api.openai.com/v1", "OPENAI_API_KEY")
    p.key()                       # os.environ["OPENAI_API_KEY"]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from phloem.system.validation import ENV_NAME_RE, InvalidInput

#: The API families the gateway serves, each from at most one provider.
AI_KINDS = ("openai", "anthropic")
FIELD = "ai_provider"


@dataclass(frozen=True)
class AiProvider:
    kind: str
    #: The upstream's versioned base URL, e.g. ``https://api.openai.com/v1``.
    url: str
    #: The variable of phloem's own environment that holds the key; None: no key sent.
    key_env: str | None = None

    def key(self) -> str | None:
        """The key, read now from phloem's environment (never stored in settings)."""
        if self.key_env is None:
            return None
        value = os.environ.get(self.key_env)
        if not value:
            raise InvalidInput(FIELD, f"{self.kind}: key-env={self.key_env}: the variable "
                                      "is not set in phloem's environment")
        return value


def parse_ai_provider(text: str) -> AiProvider:
    """``KIND=URL[,key-env=VAR]``; raises :class:`InvalidInput` naming the rule."""
    head, *options = text.split(",")
    kind, sep, url = head.partition("=")
    kind = kind.strip()
    if not sep or kind not in AI_KINDS:
        raise InvalidInput(FIELD, f"expected KIND=URL[,key-env=VAR] with KIND one of "
                                  f"{', '.join(AI_KINDS)} (got {text!r})")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise InvalidInput(FIELD, f"{kind}: the URL must be http(s)://host[:port][/path] "
                                  f"without credentials, query or fragment (got {url!r})")
    key_env: str | None = None
    for option in options:
        name, sep, value = option.partition("=")
        if name.strip() != "key-env" or not sep:
            raise InvalidInput(FIELD, f"{kind}: unknown option {option!r} (known: "
                                      "key-env=VAR)")
        if not ENV_NAME_RE.match(value.strip()):
            raise InvalidInput(FIELD, f"{kind}: key-env must be a variable name "
                                      f"(got {value!r})")
        key_env = value.strip()
    return AiProvider(kind=kind, url=url.strip().rstrip("/"), key_env=key_env)


def parse_ai_providers(texts: list[str]) -> tuple[AiProvider, ...]:
    """Several ``--ai-provider`` values; at most one per kind; each key must be set."""
    providers = tuple(parse_ai_provider(t) for t in texts)
    kinds = [p.kind for p in providers]
    for kind in AI_KINDS:
        if kinds.count(kind) > 1:
            raise InvalidInput(FIELD, f"{kind}: given {kinds.count(kind)} times (one "
                                      "upstream per kind)")
    for p in providers:
        p.key()
    return providers
