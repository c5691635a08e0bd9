"""Packing a source directory: .gitignore honoured, same files give the same hash."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from phloem.project.packing import PackError, list_files, pack_directory


def make_tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "main.py").write_text("app = None\n")
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "secret.txt").write_text("s3cret\n")
    (root / "build").mkdir()
    (root / "build" / "out.bin").write_bytes(b"\0")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0")
    (root / ".gitignore").write_text("secret.txt\nbuild/\n")


def test_gitignore_and_defaults_are_honoured(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert list_files(tmp_path) == [".gitignore", "main.py", "pkg/mod.py"]


def test_same_files_same_hash(tmp_path: Path) -> None:
    make_tree(tmp_path / "a")
    make_tree(tmp_path / "b")
    (tmp_path / "b" / "main.py").touch()  # a newer mtime must not change the artifact
    data_a, sha_a = pack_directory(tmp_path / "a")
    _data_b, sha_b = pack_directory(tmp_path / "b")
    assert sha_a == sha_b
    with tarfile.open(fileobj=io.BytesIO(data_a), mode="r:gz") as tar:
        names = tar.getnames()
    assert names == [".gitignore", "main.py", "pkg/mod.py"]
    (tmp_path / "b" / "main.py").write_text("app = 1\n")
    assert pack_directory(tmp_path / "b")[1] != sha_a


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(PackError, match=r"path: .* is not a directory"):
        pack_directory(tmp_path / "nope")
