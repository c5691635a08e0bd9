"""Request bodies into files, verified as they arrive: plain bodies against their
``x-amz-content-sha256`` and ``Content-MD5``, ``aws-chunked`` bodies chunk by chunk
(signed chunks against their chained signatures, trailers against their signature) and
the ``x-amz-checksum-*`` values sent as headers or trailers.

    result = await read_body(receive, f, headers, auth_payload, signer, max_bytes=...)
    result.size, result.md5_hex

Nothing here trusts the client's lengths: a chunk longer than announced, a body longer
than ``x-amz-decoded-content-length`` or past ``max_bytes`` stops the upload.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO

from starlette.types import Receive

from phloem.services.storage.checksums import ALGORITHMS, Checksum, new_checksum
from phloem.services.storage.errors import S3Error
from phloem.services.storage.sigv4 import (
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED,
    ChunkSigner,
)

_MAX_LINE = 4096
_MAX_TRAILER = 16 * 1024


@dataclass(frozen=True)
class Body:
    size: int
    md5_hex: str
    checksums: dict[str, str]   # algorithm -> base64 value, as verified


class _Reader:
    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buf = bytearray()
        self._done = False

    async def _fill(self) -> bool:
        if self._done:
            return False
        msg = await self._receive()
        if msg["type"] == "http.disconnect":
            raise S3Error("IncompleteBody", "the client went away before the body ended")
        self._buf += msg.get("body", b"")
        self._done = not msg.get("more_body", False)
        return True

    async def line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self._buf[:i])
                del self._buf[:i + 2]
                return out
            if len(self._buf) > _MAX_LINE:
                raise S3Error("InvalidRequest", "aws-chunked: a chunk header or trailer line "
                              f"is longer than {_MAX_LINE} bytes")
            if not await self._fill():
                raise S3Error("IncompleteBody", "aws-chunked: the body ended inside a line")

    async def exactly(self, n: int) -> AsyncIterator[bytes]:
        while n > 0:
            if not self._buf and not await self._fill():
                raise S3Error("IncompleteBody", "aws-chunked: the body ended inside a chunk")
            piece = bytes(self._buf[:n])
            del self._buf[:len(piece)]
            n -= len(piece)
            if piece:
                yield piece

    async def rest(self) -> AsyncIterator[bytes]:
        while True:
            if self._buf:
                piece = bytes(self._buf)
                self._buf.clear()
                yield piece
            if not await self._fill():
                return

    async def at_end(self) -> bool:
        while not self._buf:
            if not await self._fill():
                return True
        return False


def _header(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def _declared_checksums(headers: dict[str, list[str]]) -> dict[str, str]:
    declared = {}
    for algo in ALGORITHMS:
        value = _header(headers, f"x-amz-checksum-{algo}")
        if value is not None:
            declared[algo] = value
    return declared


def _trailer_algorithms(headers: dict[str, list[str]]) -> list[str]:
    names = [n.strip().lower() for n in (_header(headers, "x-amz-trailer") or "").split(",")
             if n.strip()]
    algos = []
    for name in names:
        algo = name.removeprefix("x-amz-checksum-")
        if algo == name or algo not in ALGORITHMS:
            raise S3Error("InvalidRequest", f"x-amz-trailer: {name!r} is not one of "
                          + ", ".join(f"x-amz-checksum-{a}" for a in ALGORITHMS))
        algos.append(algo)
    return algos


class _Sink:
    def __init__(self, out: BinaryIO, max_bytes: int, too_large: S3Error,
                 algos: list[str], sha256: bool) -> None:
        self.out, self.max_bytes, self.too_large = out, max_bytes, too_large
        self.size = 0
        self.md5 = hashlib.md5()
        self.sha256 = hashlib.sha256() if sha256 else None
        self.sums: dict[str, Checksum] = {a: new_checksum(a) for a in algos}

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise self.too_large
        self.out.write(data)
        self.md5.update(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        for c in self.sums.values():
            c.update(data)


async def read_body(receive: Receive, out: BinaryIO, headers: dict[str, list[str]],
                    payload: str, signer: ChunkSigner | None, *, max_bytes: int,
                    too_large: S3Error) -> Body:
    """Write the request body to ``out`` and verify it. ``payload``: the request's
    x-amz-content-sha256 (UNSIGNED-PAYLOAD when it had none); ``signer``: for signed
    chunks; ``too_large``: raised once more than ``max_bytes`` arrived."""
    declared = _declared_checksums(headers)
    streaming = payload.startswith("STREAMING-")
    trailers = _trailer_algorithms(headers) if streaming else []
    if len(declared) + len(trailers) > 1:
        raise S3Error("InvalidRequest", "Expecting a single x-amz-checksum- header or trailer")
    algos = list(declared) + trailers
    sink = _Sink(out, max_bytes, too_large, algos,
                 sha256=not streaming and payload != UNSIGNED)
    reader = _Reader(receive)
    received: dict[str, str] = dict(declared)
    if streaming:
        decoded = _header(headers, "x-amz-decoded-content-length")
        if decoded is None or not decoded.isdigit():
            raise S3Error("MissingContentLength", "aws-chunked uploads must send "
                          "x-amz-decoded-content-length")
        if int(decoded) > max_bytes:
            raise too_large
        received.update(await _read_chunked(reader, sink, payload, signer, trailers))
        if sink.size != int(decoded):
            raise S3Error("IncompleteBody", f"x-amz-decoded-content-length says {decoded} "
                          f"bytes, the chunks held {sink.size}")
    else:
        async for piece in reader.rest():
            sink.write(piece)
        if sink.sha256 is not None and sink.sha256.hexdigest() != payload:
            raise S3Error("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' "
                          "header does not match what was computed.")
    content_md5 = _header(headers, "content-md5")
    if content_md5 is not None:
        try:
            want = base64.b64decode(content_md5, validate=True)
        except binascii.Error:
            raise S3Error("InvalidDigest", "Content-MD5 must be base64") from None
        if want != sink.md5.digest():
            raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we "
                          "received.")
    for algo, checksum in sink.sums.items():
        if received.get(algo) != checksum.b64():
            raise S3Error("BadDigest", f"The x-amz-checksum-{algo} you specified did not "
                          "match the calculated checksum.")
    return Body(sink.size, sink.md5.hexdigest(), {a: c.b64() for a, c in sink.sums.items()})


async def _read_chunked(reader: _Reader, sink: _Sink, payload: str,
                        signer: ChunkSigner | None, trailers: list[str]) -> dict[str, str]:
    signed = payload in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
    if signed and signer is None:
        raise S3Error("InvalidRequest", f"{payload} needs a signed request")
    if payload not in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER):
        raise S3Error("InvalidArgument", f"x-amz-content-sha256: unknown {payload!r}")
    while True:
        head = (await reader.line()).decode("latin-1")
        size_text, _, ext = head.partition(";")
        try:
            size = int(size_text.strip(), 16)
        except ValueError:
            raise S3Error("InvalidRequest", f"aws-chunked: bad chunk header {head[:64]!r}") \
                from None
        digest = hashlib.sha256() if signed else None
        async for piece in reader.exactly(size):
            sink.write(piece)
            if digest is not None:
                digest.update(piece)
        if signed:
            assert signer is not None and digest is not None
            name, _, sig = ext.partition("=")
            if name.strip() != "chunk-signature" or \
                    signer.chunk(digest.hexdigest()) != sig.strip():
                raise S3Error("SignatureDoesNotMatch", "aws-chunked: a chunk's signature "
                              "does not match")
        if size == 0:
            break
        if await reader.line() != b"":
            raise S3Error("InvalidRequest", "aws-chunked: a chunk is longer than its header "
                          "says")
    values: dict[str, str] = {}
    raw_trailer = bytearray()
    trailer_sig = None
    while True:
        line = await reader.line()
        if line == b"":
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "x-amz-trailer-signature":
            trailer_sig = value.strip()
            continue
        raw_trailer += line + b"\n"
        if len(raw_trailer) > _MAX_TRAILER:
            raise S3Error("InvalidRequest", "aws-chunked: the trailer is too long")
        algo = name.removeprefix("x-amz-checksum-")
        if algo not in trailers:
            raise S3Error("InvalidRequest", f"aws-chunked: trailer {name!r} was not announced "
                          "in x-amz-trailer")
        values[algo] = value.strip()
    if payload == STREAMING_SIGNED_TRAILER:
        assert signer is not None
        if trailer_sig is None or signer.trailer(bytes(raw_trailer)) != trailer_sig:
            raise S3Error("SignatureDoesNotMatch", "aws-chunked: the trailer's signature "
                          "does not match")
    missing = [a for a in trailers if a not in values]
    if missing:
        raise S3Error("InvalidRequest", f"aws-chunked: trailer x-amz-checksum-{missing[0]} "
                      "announced but not sent")
    if not await reader.at_end():
        raise S3Error("InvalidRequest", "aws-chunked: bytes after the final chunk")
    return values
