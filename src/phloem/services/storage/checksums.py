"""The checksums S3 clients send (``x-amz-checksum-<name>`` headers or trailers), each
base64 of the big-endian digest.

    c = new_checksum("crc64nvme"); c.update(b"..."); c.b64()

CRC32 comes from zlib; CRC32C and CRC64NVME are table-driven here (no well-kept wheel
provides them without a native runtime), a few MB/s: fine for the uploads a branch's
functions make, and SDKs use CRC32 unless told otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from typing import Protocol


class Checksum(Protocol):
    def update(self, data: bytes) -> None: ...

    def b64(self) -> str: ...


def _table(poly: int, bits: int) -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc & ((1 << bits) - 1))
    return table


class _ReflectedCrc:
    def __init__(self, table: list[int], bits: int) -> None:
        self._table, self._bits = table, bits
        self._mask = (1 << bits) - 1
        self._crc = self._mask

    def update(self, data: bytes) -> None:
        crc, table = self._crc, self._table
        for b in data:
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        self._crc = crc

    def b64(self) -> str:
        value = self._crc ^ self._mask
        return base64.b64encode(value.to_bytes(self._bits // 8, "big")).decode()


class _Crc32:
    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def b64(self) -> str:
        return base64.b64encode(self._crc.to_bytes(4, "big")).decode()


class _Hash:
    def __init__(self, name: str) -> None:
        self._h = hashlib.new(name)

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def b64(self) -> str:
        return base64.b64encode(self._h.digest()).decode()


_CRC32C = _table(0x82F63B78, 32)
_CRC64NVME = _table(0x9A6C9329AC4BC9B5, 64)
ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


def new_checksum(name: str) -> Checksum:
    """A running checksum; ``name`` is one of ALGORITHMS (lowercase)."""
    if name == "crc32":
        return _Crc32()
    if name == "crc32c":
        return _ReflectedCrc(_CRC32C, 32)
    if name == "crc64nvme":
        return _ReflectedCrc(_CRC64NVME, 64)
    if name in ("sha1", "sha256"):
        return _Hash(name)
    raise ValueError(f"checksum algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}")
