"""Neon Auth: a Better Auth server per branch, its tables in the branch's own database
(schema ``neon_auth``). See :mod:`phloem.services.auth.service` and docs/neon-auth.md."""

from phloem.services.auth.service import AuthService

__all__ = ["AuthService"]
