"""Fail on a module over 700 lines or a class over 500 lines in src/: past that a file
or class holds more than one concept (split by concept, not by line count).

    .venv/bin/python scripts/check_sizes.py        # exit 1 naming each one too large
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 500


def oversized(root: Path) -> list[str]:
    found = []
    for path in sorted((root / "src").rglob("*.py")):
        name = path.relative_to(root).as_posix()
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            found.append(f"{name}: {lines} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, name)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    found.append(f"{name}:{node.lineno}: class {node.name}: {size} lines "
                                 f"(class limit {MAX_CLASS_LINES})")
    return found


def main() -> int:
    found = oversized(Path(__file__).resolve().parent.parent)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
