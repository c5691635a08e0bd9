"""Multipart uploads of a branch: ``.uploads/<upload id>/`` holds ``upload.json`` (bucket,
key, content type, metadata) and one ``part-NNNNN`` file per part with its
``part-NNNNN.json`` (ETag, size). Completing concatenates the listed parts into a new
blob (``copy_file_range``: in-kernel, block-sharing where the filesystem can) whose ETag
is the MD5 of the parts' binary MD5s followed by ``-<number of parts>``, as S3's.

    up = Uploads(store.uploads)
    upload_id = up.create("images", "big.bin", meta)
    up.put_part(upload_id, 1, tmp_path, size, md5_hex)
    size, etag = up.assemble(upload_id, [(1, '"..."'), (2, '"..."')], dst_path)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from phloem.services.storage.errors import S3Error

#: Every part but the last must be at least this big (S3's rule).
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 10_000


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int
    modified: float


class Uploads:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, upload_id: str, bucket: str, key: str) -> Path:
        d = self.root / upload_id
        if not upload_id.isalnum() or not (d / "upload.json").exists():
            raise S3Error("NoSuchUpload", "The specified multipart upload does not exist.",
                          upload_id=upload_id)
        info = json.loads((d / "upload.json").read_text())
        if info["bucket"] != bucket or info["key"] != key:
            raise S3Error("NoSuchUpload", "The specified multipart upload does not exist.",
                          upload_id=upload_id)
        return d

    def info(self, upload_id: str, bucket: str, key: str) -> dict[str, object]:
        info: dict[str, object] = json.loads(
            (self._dir(upload_id, bucket, key) / "upload.json").read_text())
        return info

    def create(self, bucket: str, key: str, content_type: str, metadata: dict[str, str],
               headers: dict[str, str]) -> str:
        upload_id = uuid.uuid4().hex
        d = self.root / upload_id
        d.mkdir(mode=0o700)
        (d / "upload.json").write_text(json.dumps({
            "bucket": bucket, "key": key, "content_type": content_type,
            "metadata": metadata, "headers": headers, "initiated": time.time()}))
        return upload_id

    def part_tmp(self, upload_id: str, bucket: str, key: str) -> Path:
        return self._dir(upload_id, bucket, key) / f"tmp-{uuid.uuid4().hex}"

    def put_part(self, upload_id: str, number: int, tmp: Path, size: int, md5_hex: str) -> str:
        d = tmp.parent
        etag = f'"{md5_hex}"'
        os.rename(tmp, d / f"part-{number:05d}")
        (d / f"part-{number:05d}.json").write_text(json.dumps(
            {"etag": etag, "size": size, "modified": time.time()}))
        return etag

    def parts(self, upload_id: str, bucket: str, key: str) -> list[Part]:
        d = self._dir(upload_id, bucket, key)
        out = []
        for f in sorted(d.glob("part-*.json")):
            info = json.loads(f.read_text())
            out.append(Part(int(f.name[5:10]), info["etag"], info["size"], info["modified"]))
        return out

    def assemble(self, upload_id: str, bucket: str, key: str, wanted: list[tuple[int, str]],
                 dst: Path) -> tuple[int, str]:
        """Concatenate the ``wanted`` (part number, ETag) into ``dst``; (size, ETag)."""
        if not wanted:
            raise S3Error("MalformedXML", "CompleteMultipartUpload must list at least one "
                          "Part")
        numbers = [n for n, _ in wanted]
        if numbers != sorted(set(numbers)):
            raise S3Error("InvalidPartOrder", "The list of parts was not in ascending order. "
                          "Parts must be ordered by part number.")
        have = {p.number: p for p in self.parts(upload_id, bucket, key)}
        d = self.root / upload_id
        digest = hashlib.md5()
        for i, (number, etag) in enumerate(wanted):
            part = have.get(number)
            if part is None or part.etag.strip('"') != etag.strip().strip('"'):
                raise S3Error("InvalidPart", "One or more of the specified parts could not be "
                              f"found or its ETag did not match (part {number}).")
            if part.size < MIN_PART_BYTES and i < len(wanted) - 1:
                raise S3Error("EntityTooSmall", "Your proposed upload is smaller than the "
                              f"minimum allowed size (part {number}: {part.size} bytes, every "
                              f"part but the last needs {MIN_PART_BYTES})")
            digest.update(bytes.fromhex(part.etag.strip('"')))
        size = 0
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for number, _ in wanted:
                with open(d / f"part-{number:05d}", "rb") as src:
                    while n := os.copy_file_range(src.fileno(), fd, 1 << 30):
                        size += n
        finally:
            os.close(fd)
        return size, f'"{digest.hexdigest()}-{len(wanted)}"'

    def abort(self, upload_id: str, bucket: str, key: str) -> None:
        shutil.rmtree(self._dir(upload_id, bucket, key))
