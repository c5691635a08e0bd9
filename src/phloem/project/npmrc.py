"""The project's ``.npmrc`` lines that point npm at the platform's registry for the
``@neon`` and ``@neondatabase`` scopes (``control/npm_registry.py``), so a plain
``npm install`` of a Neon project gets ``@neon/functions`` from phloem and every other
package as before. ``phloem link`` writes them; the user's other lines stay as they are.

    path, changed = write_npmrc(Path("."), "http://127.0.0.1:8788")
    # .npmrc: @neon:registry=http://127.0.0.1:8788/npm/ (and @neondatabase)

No ``_authToken`` line: the registry needs no key (see the registry's docstring), and a
project's ``.npmrc`` is often committed.
"""

from __future__ import annotations

import re
from pathlib import Path

from phloem.project.neon import find_neon_config

#: The scopes and the path the platform serves them under (control/npm_registry.py).
SCOPES = ("@neon", "@neondatabase")
REGISTRY_PATH = "/npm/"
NPMRC = ".npmrc"


def registry_url(api_url: str) -> str:
    """``http://127.0.0.1:8788`` -> ``http://127.0.0.1:8788/npm/``."""
    return api_url.rstrip("/") + REGISTRY_PATH


def is_node_project(root: Path) -> bool:
    """A project npm installs: it has a ``package.json`` or a ``neon.ts``."""
    return (root / "package.json").is_file() or find_neon_config(root) is not None


def npmrc_text(existing: str, api_url: str) -> str:
    """``existing`` with one ``<scope>:registry=`` line per scope set to the platform's
    (replaced where the user had one, appended otherwise); every other line kept."""
    url = registry_url(api_url)
    wanted = {scope: f"{scope}:registry={url}" for scope in SCOPES}
    pattern = re.compile(r"^\s*(@[^:\s]+):registry\s*=")
    lines: list[str] = []
    placed: set[str] = set()
    for line in existing.splitlines():
        m = pattern.match(line)
        if m and m[1] in wanted:
            if m[1] not in placed:  # a second line for the scope would override ours
                lines.append(wanted[m[1]])
                placed.add(m[1])
            continue
        lines.append(line)
    lines += [wanted[scope] for scope in SCOPES if scope not in placed]
    return "\n".join(lines) + "\n"


def write_npmrc(root: Path, api_url: str) -> tuple[Path, bool]:
    """Make ``root/.npmrc`` point the two scopes at the platform; returns the path and
    whether it changed (a file already right is not rewritten)."""
    path = root / NPMRC
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    text = npmrc_text(existing, api_url)
    if text == existing:
        return path, False
    path.write_text(text, encoding="utf-8")
    return path, True
