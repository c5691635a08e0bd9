"""The error of a project's config (``phloemfile.py``, ``neon.ts``).

    raise ConfigError("neon.ts: functions.api.source: file 'a.ts' does not exist")
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Names the file, the key and the rule."""
