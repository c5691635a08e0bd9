"""Secrets at rest: function env values and branch database passwords are sealed with
AES-256-GCM before they reach the system database, opened only when they are used.

The key is ``$PHLOEM_SECRET_KEY`` (32 bytes, urlsafe base64) or a random key created once
in ``<data>/secrets/env.key`` (0600, root's). The context is the associated data: a sealed
env is bound to its deployment id, a password to its branch id and column, so a sealed
value cannot be moved to another row or column.

    box = SecretBox.from_data_dir(paths.secrets)
    token = box.seal({"OPENAI_API_KEY": "sk-..."}, context="dep-1a2b")
    box.open(token, context="dep-1a2b")
    sealed = box.seal_text("s3cret", context="branch:br-x:role_password")
    box.open_text(sealed, context="branch:br-x:role_password")
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ENV = "PHLOEM_SECRET_KEY"
VERSION = "v1"


class SecretError(RuntimeError):
    pass


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SecretError(f"{KEY_ENV}: the key must be 32 bytes (got {len(key)})")
        self._aead = AESGCM(key)
        self._salt = hashlib.sha256(b"phloem-env-digest" + key).digest()

    @classmethod
    def from_data_dir(cls, secrets_dir: Path) -> SecretBox:
        configured = os.environ.get(KEY_ENV)
        if configured:
            try:
                return cls(base64.urlsafe_b64decode(configured + "=" * (-len(configured) % 4)))
            except ValueError as exc:
                raise SecretError(f"{KEY_ENV}: not urlsafe base64: {exc}") from None
        path = secrets_dir / "env.key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(AESGCM.generate_key(bit_length=256))
        return cls(path.read_bytes())

    def seal(self, env: dict[str, str], context: str) -> str:
        return self._seal(json.dumps(env, sort_keys=True).encode(), context)

    def open(self, token: str, context: str) -> dict[str, str]:
        env: dict[str, str] = json.loads(self._open(token, context, "sealed env"))
        return env

    def seal_text(self, text: str, context: str) -> str:
        """Seal one string (a password) bound to ``context``."""
        return self._seal(text.encode(), context)

    def open_text(self, token: str, context: str) -> str:
        return self._open(token, context, f"sealed value ({context})").decode()

    def _seal(self, data: bytes, context: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, data, context.encode())
        return f"{VERSION}:" + base64.urlsafe_b64encode(nonce + sealed).decode()

    def _open(self, token: str, context: str, what: str) -> bytes:
        version, _, body = token.partition(":")
        if version != VERSION:
            raise SecretError(f"{what}: unknown format {version!r}")
        raw = base64.urlsafe_b64decode(body)
        try:
            return self._aead.decrypt(raw[:12], raw[12:], context.encode())
        except Exception as exc:  # InvalidTag: wrong key, tampered or moved
            raise SecretError(f"{what} cannot be opened: wrong {KEY_ENV} or tampered "
                              "data") from exc

    def digest(self, env: dict[str, str]) -> str:
        """Fingerprint of an env for plans, keyed so equal envs on two platforms differ and
        a digest cannot be brute-forced without the key."""
        canonical = json.dumps(env, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(self._salt + canonical).hexdigest()
