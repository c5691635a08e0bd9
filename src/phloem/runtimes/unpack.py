"""Unpacking a function's artifact (a ``.tar.gz`` of its source).

As root the platform runs this file as a build step, as the build user in a sandbox where
only the destination is writable, with the artifact on stdin:

    python3 -I -S unpack.py /data/deployments/dep_x/app < artifact.tar.gz

so a hostile archive (``..`` names, links out of the tree, the tricks that have beaten
``tarfile``'s filters) can at worst write into its own destination. It imports only the
standard library, and runs on the machine's Python (no ``tarfile`` filters before 3.11.4).

Members are checked as ``tarfile``'s ``data`` filter does: no absolute names or ``..``, no
devices or fifos, links only to paths inside the tree, modes reduced to 0644/0755. Because
a lexical check cannot see through chains of links, the platform then calls
:func:`check_tree` on the result before anything privileged reads a file in it.
"""

from __future__ import annotations

import os
import posixpath
import stat
import sys
import tarfile
from typing import IO


class UnpackError(ValueError):
    pass


def _inside(name: str) -> bool:
    return not (posixpath.isabs(name) or name == ".." or name.startswith("../"))


def check_member(member: tarfile.TarInfo) -> None:
    name = posixpath.normpath(member.name)
    if not _inside(name):
        raise UnpackError(f"{member.name}: paths must stay inside the source")
    if member.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
        if posixpath.isabs(member.linkname) or not _inside(target):
            raise UnpackError(f"{member.name}: links to {member.linkname!r}, outside the "
                              "source")
    elif member.islnk():
        if not _inside(posixpath.normpath(member.linkname)):
            raise UnpackError(f"{member.name}: links to {member.linkname!r}, outside the "
                              "source")
    elif not (member.isreg() or member.isdir()):
        raise UnpackError(f"{member.name}: only files, directories and links are allowed "
                          "(no devices or fifos)")
    if member.isdir():
        member.mode = 0o755
    elif member.isreg() or member.islnk():  # a hard link's mode is set on its target
        member.mode = 0o755 if member.mode & 0o111 else 0o644


def unpack(stream: IO[bytes], dest: str) -> None:
    with tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in tar:
            check_member(member)
            if hasattr(tarfile, "data_filter"):
                tar.extract(member, dest, filter="data")
            else:
                tar.extract(member, dest)


def check_tree(root: str) -> None:
    """Raise :class:`UnpackError` unless everything under ``root`` is a file, a
    directory, or a link that resolves inside ``root`` (seen from this process)."""
    top = os.path.realpath(root)
    for dirpath, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                real = os.path.realpath(path)
                if real != top and not real.startswith(top + os.sep):
                    raise UnpackError(f"{rel}: links outside the source")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnpackError(f"{rel}: only files, directories and links are allowed")


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: unpack.py DEST < artifact.tar.gz", file=sys.stderr)
        return 2
    try:
        unpack(sys.stdin.buffer, sys.argv[1])
    except (UnpackError, tarfile.TarError, OSError, EOFError) as exc:
        print(f"artifact: cannot unpack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
