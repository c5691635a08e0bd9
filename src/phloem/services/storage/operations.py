"""The S3 operations on objects: PutObject, GetObject (ranges, conditions), HeadObject,
DeleteObject, CopyObject.

    response = await put_object(request)

Listing and buckets are in ``listing.py``, multipart uploads in ``uploads.py``, and which
request goes where in ``dispatch.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote

from phloem.branches.clone import PlainCopier
from phloem.services.storage.app import Request, Response
from phloem.services.storage.body import read_body
from phloem.services.storage.common import bucket_of, iso, xml_response
from phloem.services.storage.errors import S3Error
from phloem.services.storage.objects import Bucket, ObjectMeta
from phloem.services.storage.sigv4 import RequestAuth

log = logging.getLogger("phloem.services.storage")
#: The largest single PUT, as S3's.
MAX_OBJECT_BYTES = 5 * 1024**3
MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048
DEFAULT_CONTENT_TYPE = "binary/octet-stream"
STORED_HEADERS = ("cache-control", "content-disposition", "content-encoding",
                  "content-language", "expires")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def user_metadata(req: Request) -> dict[str, str]:
    meta = {k[len("x-amz-meta-"):]: v[0] for k, v in req.headers.items()
            if k.startswith("x-amz-meta-")}
    if sum(len(k) + len(v) for k, v in meta.items()) > MAX_METADATA_BYTES:
        raise S3Error("MetadataTooLarge", "Your metadata headers exceed the maximum allowed "
                      f"metadata size ({MAX_METADATA_BYTES} bytes)")
    return meta


def stored_headers(req: Request) -> dict[str, str]:
    out = {}
    for name in STORED_HEADERS:
        value = req.header(name)
        if value is None:
            continue
        if name == "content-encoding":
            # aws-chunked is the transfer's framing, not the object's encoding.
            value = ",".join(p.strip() for p in value.split(",")
                             if p.strip() and p.strip() != "aws-chunked")
            if not value:
                continue
        out[name] = value
    return out


def object_headers(meta: ObjectMeta) -> list[tuple[str, str]]:
    headers = [("etag", meta.etag), ("last-modified", http_date(meta.modified)),
               ("content-type", meta.content_type), ("accept-ranges", "bytes")]
    headers += list(meta.headers.items())
    headers += [(f"x-amz-meta-{k}", v) for k, v in meta.metadata.items()]
    return headers


def _check_key(req: Request) -> None:
    if len(req.key.encode()) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError", f"Your key is too long (at most {MAX_KEY_BYTES} "
                      "bytes of UTF-8)")


def _quota_error(req: Request) -> S3Error:
    store = req.access.store
    return S3Error("QuotaExceeded", f"branch {req.access.branch_id}: the storage quota of "
                   f"{store.quota_bytes} bytes would be exceeded")


def room(req: Request) -> int:
    """Bytes this branch may still store."""
    store = req.access.store
    return max(0, store.quota_bytes - store.used_bytes())


async def receive_into(req: Request, tmp: Path, limit: int) -> tuple[int, str, dict[str, str]]:
    """Receive the request body into ``tmp`` (removed on failure): (size, md5, checksums)."""
    announced = req.header("x-amz-decoded-content-length") or req.header("content-length")
    if announced is None and req.header("transfer-encoding") is None:
        raise S3Error("MissingContentLength", "You must provide the Content-Length HTTP "
                      "header.")
    free = room(req)
    if announced is not None and announced.isdigit() and int(announced) > min(limit, free):
        # Refused before reading: a client that sent Expect: 100-continue sends nothing.
        raise (_quota_error(req) if free < limit else S3Error(
            "EntityTooLarge", f"Your proposed upload exceeds the maximum allowed size "
            f"({limit} bytes)"))
    too_large = (_quota_error(req) if free < limit
                 else S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum "
                              f"allowed size ({limit} bytes)"))
    signer = (req.auth.chunk_signer(req.access.secret)
              if isinstance(req.auth, RequestAuth) and req.payload.startswith("STREAMING-AWS4")
              else None)
    try:
        with open(tmp, "xb") as f:
            body = await read_body(req.receive, f, req.headers, req.payload, signer,
                                   max_bytes=min(limit, free), too_large=too_large)
            f.flush()
            os.fsync(f.fileno())   # a 200 means the bytes are on disk
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return body.size, body.md5_hex, body.checksums


async def put_object(req: Request) -> Response:
    b = bucket_of(req)
    _check_key(req)
    meta = ObjectMeta(0, "", req.header("content-type") or DEFAULT_CONTENT_TYPE,
                      user_metadata(req), stored_headers(req))
    tmp = b.new_tmp()
    meta.size, md5, meta.checksums = await receive_into(req, tmp, MAX_OBJECT_BYTES)
    meta.etag = f'"{md5}"'
    await commit(req, b, tmp, meta)
    headers = [("etag", meta.etag)]
    headers += [(f"x-amz-checksum-{a}", v) for a, v in meta.checksums.items()]
    return Response(200, headers)


async def commit(req: Request, b: Bucket, tmp: Path, meta: ObjectMeta,
                 releasing: int = 0) -> None:
    """Make ``tmp`` the request's object if the quota allows; ``releasing``: bytes the
    caller frees right after (a multipart upload's parts)."""
    store = req.access.store
    async with store.lock:
        old = b.get(req.key)
        used = store.used_bytes() - releasing - (old.size if old else 0)
        if used + meta.size > store.quota_bytes:
            os.unlink(tmp)
            raise _quota_error(req)
        b.commit(req.key, tmp, meta)
    if req.listener is not None:
        # Off the request's path: the answer does not wait for the triggers' database.
        info = {"size": meta.size, "etag": meta.etag, "content_type": meta.content_type}
        task = asyncio.create_task(_tell(req.listener(req.access.branch_id, b.name, req.key,
                                                      info)))
        _telling.add(task)
        task.add_done_callback(_telling.discard)


_telling: set[asyncio.Task[None]] = set()


async def _tell(call: Awaitable[object]) -> None:
    try:
        await call
    except Exception:
        log.exception("storage: telling the triggers of a new object failed")


def _conditions(req: Request, meta: ObjectMeta) -> int | None:
    """304/412 per the conditional headers, else None."""
    if_match = req.header("if-match")
    if if_match is not None and if_match.strip() not in ("*", meta.etag, meta.etag.strip('"')):
        return 412
    if_none = req.header("if-none-match")
    if if_none is not None and if_none.strip() in ("*", meta.etag, meta.etag.strip('"')):
        return 304
    since = req.header("if-modified-since")
    if since is not None and if_none is None:
        with contextlib.suppress(TypeError, ValueError):
            if int(meta.modified) <= parsedate_to_datetime(since).timestamp():
                return 304
    return None


def _range(spec: str, size: int) -> tuple[int, int] | None:
    """(start, length) of a single ``bytes=`` range; None: serve it whole (S3 ignores
    ranges it does not support, such as several at once)."""
    m = _RANGE.match(spec.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = int(m.group(2))
        if n == 0:
            raise S3Error("InvalidRange", "The requested range is not satisfiable",
                          range_requested=spec, actual_object_size=str(size))
        return max(0, size - n), min(n, size)
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        raise S3Error("InvalidRange", "The requested range is not satisfiable",
                      range_requested=spec, actual_object_size=str(size))
    end = min(end, size - 1)
    return start, end - start + 1


async def get_object(req: Request) -> Response:
    b = bucket_of(req)
    opened = b.open(req.key)
    if opened is None:
        raise S3Error("NoSuchKey", "The specified key does not exist.", key=req.key)
    meta, fd = opened
    try:
        status = _conditions(req, meta)
        if status == 412:
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you "
                          "specified did not hold", condition="If-Match")
        headers = object_headers(meta)
        for param, name in (("response-content-type", "content-type"),
                            ("response-content-disposition", "content-disposition"),
                            ("response-cache-control", "cache-control"),
                            ("response-content-encoding", "content-encoding"),
                            ("response-content-language", "content-language"),
                            ("response-expires", "expires")):
            if param in req.params:
                headers = [(k, v) for k, v in headers if k != name]
                headers.append((name, req.params[param]))
        if status == 304:
            os.close(fd)
            return Response(304, [(k, v) for k, v in headers
                                  if k in ("etag", "last-modified")])
        spec = req.header("range")
        span = _range(spec, meta.size) if spec else None
        if span is None:
            if (req.header("x-amz-checksum-mode") or "").upper() == "ENABLED":
                # What the upload sent and was verified; SDKs check the body against it.
                headers += [(f"x-amz-checksum-{a}", v) for a, v in meta.checksums.items()]
            return Response(200, headers, file=(fd, 0, meta.size))
        start, length = span
        headers.append(("content-range", f"bytes {start}-{start + length - 1}/{meta.size}"))
        return Response(206, headers, file=(fd, start, length))
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


async def delete_object(req: Request) -> Response:
    b = bucket_of(req)
    async with req.access.store.lock:
        b.delete(req.key)
    return Response(204)


async def copy_object(req: Request) -> Response:
    b = bucket_of(req)
    _check_key(req)
    source = unquote(req.header("x-amz-copy-source") or "").split("?versionId=", 1)[0]
    src_bucket_name, _, src_key = source.lstrip("/").partition("/")
    if not src_key:
        raise S3Error("InvalidArgument", "x-amz-copy-source must be <bucket>/<key>")
    src_bucket = req.access.store.bucket(src_bucket_name)
    if src_bucket is None:
        raise S3Error("NoSuchBucket", "The specified bucket does not exist.",
                      bucket_name=src_bucket_name)
    directive = (req.header("x-amz-metadata-directive") or "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "x-amz-metadata-directive must be COPY or REPLACE")
    opened = src_bucket.open(src_key)
    if opened is None:
        raise S3Error("NoSuchKey", "The specified key does not exist.", key=src_key)
    src_meta, fd = opened
    os.close(fd)
    if src_bucket is b and src_key == req.key and directive == "COPY":
        raise S3Error("InvalidRequest", "This copy request is illegal because it is trying "
                      "to copy an object to itself without changing the object's metadata.")
    if directive == "REPLACE":
        meta = ObjectMeta(src_meta.size, src_meta.etag,
                          req.header("content-type") or DEFAULT_CONTENT_TYPE,
                          user_metadata(req), stored_headers(req))
    else:
        meta = ObjectMeta(src_meta.size, src_meta.etag, src_meta.content_type,
                          dict(src_meta.metadata), dict(src_meta.headers),
                          dict(src_meta.checksums))
    tmp = b.new_tmp()
    copier = req.access.store.copier or PlainCopier()
    async with req.access.store.lock:
        current = src_bucket.get(src_key)
        if current is None:
            raise S3Error("NoSuchKey", "The specified key does not exist.", key=src_key)
        copier.copy_file(src_bucket.blob_path(current.blob), tmp)
    await commit(req, b, tmp, meta)
    return xml_response("CopyObjectResult", {"LastModified": iso(meta.modified),
                                              "ETag": meta.etag})
