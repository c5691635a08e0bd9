"""The artifact unpacker: what it refuses, checked on real archives extracted to disk."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from phloem.runtimes import unpack

UNPACK = Path(unpack.__file__)
#: phloem's interpreter, and the machine's that builds run it on (which may predate
#: tarfile's extraction filters).
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
PYTHONS = [sys.executable, *([SYSTEM_PYTHON] if os.path.exists(SYSTEM_PYTHON) else [])]


@pytest.fixture(params=PYTHONS)
def python(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def archive(*members: tarfile.TarInfo, content: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info in members:
            if info.isreg():
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
           mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def run(python: str, data: bytes, dest: Path) -> subprocess.CompletedProcess[bytes]:
    """As the platform runs it: isolated interpreter, archive on stdin."""
    return subprocess.run([python, "-I", "-S", str(UNPACK), str(dest)], input=data,
                          capture_output=True, timeout=60, check=False)


def test_unpacks_files_dirs_and_inside_links_with_reduced_modes(python: str,
                                                                tmp_path: Path) -> None:
    dest = tmp_path / "app"
    dest.mkdir()
    proc = run(python, archive(member("src/", tarfile.DIRTYPE, mode=0o555),
                       member("src/main.py", mode=0o4777),
                       member("main.py", tarfile.SYMTYPE, "src/main.py"),
                       member("same.py", tarfile.LNKTYPE, "src/main.py", mode=0o6755)),
               dest)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "main.py").read_bytes() == b"x"
    assert os.stat(dest / "src" / "main.py").st_mode & 0o7777 == 0o755
    assert os.stat(dest / "src").st_mode & 0o7777 == 0o755
    assert os.path.samefile(dest / "same.py", dest / "src" / "main.py")
    unpack.check_tree(str(dest))


@pytest.mark.parametrize(("bad", "message"), [
    (member("/etc/x"), "paths must stay inside the source"),
    (member("../x"), "paths must stay inside the source"),
    (member("a/../../x"), "paths must stay inside the source"),
    (member("x", tarfile.SYMTYPE, "/etc/passwd"), "outside the source"),
    (member("a/x", tarfile.SYMTYPE, "../../y"), "outside the source"),
    (member("x", tarfile.LNKTYPE, "../y"), "outside the source"),
    (member("x", tarfile.FIFOTYPE), "no devices or fifos"),
    (member("x", tarfile.CHRTYPE), "no devices or fifos"),
])
def test_refuses_members_leaving_the_tree(python: str, tmp_path: Path, bad: tarfile.TarInfo,
                                          message: str) -> None:
    dest = tmp_path / "app"
    dest.mkdir()
    proc = run(python, archive(bad), dest)
    assert proc.returncode == 1
    assert b"artifact: cannot unpack: " in proc.stderr and message.encode() in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_check_tree_sees_through_chains_of_links(python: str, tmp_path: Path) -> None:
    """Each link is inside on its own; x/c resolves to the parent of the tree."""
    dest = tmp_path / "app"
    dest.mkdir()
    proc = run(python, archive(member("x/c", tarfile.SYMTYPE, "b/../.."),
                       member("x/b", tarfile.SYMTYPE, "..")), dest)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(unpack.UnpackError, match="x/c: links outside the source"):
        unpack.check_tree(str(dest))


def test_check_tree_refuses_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(unpack.UnpackError, match="pipe: only files, directories and links"):
        unpack.check_tree(str(tmp_path))


def test_garbage_is_a_clear_error(python: str, tmp_path: Path) -> None:
    proc = run(python, b"not a tarball", tmp_path)
    assert proc.returncode == 1 and b"artifact: cannot unpack:" in proc.stderr
