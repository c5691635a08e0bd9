"""phloem's own npm packages, and the names they stand in for.

Neon's examples import ``@neon/functions`` (``waitUntil``, ``attachDatabasePool``) and the
older ``@neondatabase/functions/v1``; neither is on the npm registry, so a project listing
them cannot be installed anywhere but Neon. phloem ships typed implementations in
``packages/`` (``@phloem/config``, ``@phloem/env`` and ``@phloem/functions``, not on the npm
registry: they come with phloem's Python package) and substitutes them:

* at install time, a dependency on a :data:`SUPPLIED` name becomes ``file:`` of ours;
* at bundle time, imports of those names resolve to ours (esbuild ``--alias``), so code
  importing ``@neon/functions`` without declaring it bundles too;
* ``@neon/config``, ``@neon/env`` and their ``@neondatabase`` twins are on the registry and
  used as they are when the project installs them; when it does not, ours stand in.

    aliases = bundle_aliases(node_modules)      # {"@neon/functions": ".../functions", ...}
"""

from __future__ import annotations

from pathlib import Path

PACKAGES_DIR = Path(__file__).parent / "packages"

#: npm names that only phloem supplies: always ours.
SUPPLIED: dict[str, str] = {
    "@phloem/config": "config",
    "@phloem/env": "env",
    "@phloem/functions": "functions",
    "@neon/functions": "functions",
    "@neondatabase/functions": "functions",
    "@phloem/ai-sdk-provider": "ai-sdk-provider",
    "@neon/ai-sdk-provider": "ai-sdk-provider",
    "@neondatabase/ai-sdk-provider": "ai-sdk-provider",
}

#: On the registry; ours stand in only when the project has not installed them.
FALLBACKS: dict[str, str] = {
    "@neon/config": "config",
    "@neondatabase/config": "config",
    "@neon/env": "env",
    "@neondatabase/env": "env",
}


def package_dir(short: str) -> Path:
    """The directory of one of phloem's packages: ``config``, ``env`` or ``functions``."""
    return PACKAGES_DIR / short


def install_substitutes() -> dict[str, Path]:
    """Dependency name -> local package installed instead of the registry's."""
    return {name: package_dir(short) for name, short in SUPPLIED.items()}


def bundle_aliases(node_paths: list[Path] | tuple[Path, ...] = ()) -> dict[str, str]:
    """esbuild ``--alias`` map: every :data:`SUPPLIED` name, and each :data:`FALLBACKS`
    name not installed in any of ``node_paths`` (or the project's own ``node_modules``,
    which the caller includes)."""
    aliases = {name: str(package_dir(short)) for name, short in SUPPLIED.items()}
    for name, short in FALLBACKS.items():
        if not any((root / name / "package.json").is_file() for root in node_paths):
            aliases[name] = str(package_dir(short))
    return aliases
