"""The S3 endpoint of every branch: one ASGI app that finds the branch from the Host
header (``<branch>--storage.<domain>``, or ``<bucket>.<branch>--storage.<domain>`` for
virtual-hosted addressing), checks the request's SigV4 signature against that branch's
own key, answers CORS preflights, and hands the request to the operation it names.

    app = StorageApp(branches, domain="fn.localhost")
    # served by uvicorn; the gateway forwards requests to it with the Host unchanged

Anonymous requests may only GET or HEAD objects of a ``public_read`` bucket. A key of one
branch is refused on any other (``InvalidAccessKeyId``, 403).

A local forwarder (``phloem dev``, ``phloem.dev.forward``) rewrites Host to the service's
name and sends the Host its client signed as ``X-Phloem-Signed-Host``; the signature is
checked with that value in place of Host when it names a loopback address
(:func:`signed_host`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import ip_address
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote

from starlette.types import Message, Receive, Scope, Send

from phloem.services.base import parse_service_host
from phloem.services.storage.errors import S3Error
from phloem.services.storage.objects import BranchStorage
from phloem.services.storage.sigv2 import PresignedV2, parse_presigned_v2
from phloem.services.storage.sigv4 import UNSIGNED, RequestAuth, parse_request_auth

log = logging.getLogger("phloem.services.storage")
_CORS_METHODS = "GET, PUT, POST, DELETE, HEAD"
_CORS_EXPOSE = ("ETag, x-amz-request-id, x-amz-version-id, x-amz-checksum-crc32, "
                "x-amz-checksum-crc64nvme, Content-Length, Content-Range, Accept-Ranges")


#: Told of every object created (PUT, copy, completed multipart): branch id, bucket, key,
#: {size, etag, content_type}. The platform's storage_object_created triggers.
ObjectListener = Callable[[str, str, str, dict[str, Any]], Awaitable[object]]


@dataclass(frozen=True)
class BranchAccess:
    """What the app needs of a branch: its objects and its key pair."""

    branch_id: str
    store: BranchStorage
    access_key_id: str
    secret: str


class Branches(Protocol):
    async def storage(self, branch_id: str) -> BranchAccess | None:
        """The branch's storage, or None when it has no storage service."""
        ...


@dataclass
class Request:
    method: str
    raw_path: bytes
    path: str                          # decoded
    query: list[tuple[str, str]]
    params: dict[str, str]
    headers: dict[str, list[str]]      # lowercase names
    receive: Receive
    access: BranchAccess
    bucket: str
    key: str
    auth: RequestAuth | PresignedV2 | None
    request_id: str
    listener: ObjectListener | None = None

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None

    @property
    def payload(self) -> str:
        return self.auth.payload_hash if self.auth else UNSIGNED

    @property
    def resource(self) -> str:
        return "/" + self.bucket + ("/" + self.key if self.key else "") if self.bucket else "/"


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] | None = None
    body: bytes = b""
    #: Streams a file instead of ``body``: (descriptor, offset, length); closed after.
    file: tuple[int, int, int] | None = None


class StorageApp:
    def __init__(self, branches: Branches, domain: str,
                 dispatch: Callable[[Request], Awaitable[Response]]) -> None:
        self.branches, self.domain, self.dispatch = branches, domain, dispatch
        self.listener: ObjectListener | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                if (await receive())["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request_id = uuid.uuid4().hex[:16].upper()
        headers: dict[str, list[str]] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        origin = _first(headers, "origin")
        resource = scope.get("path", "/")
        method = scope["method"]
        body_left = [_first(headers, "content-length") not in (None, "0")
                     or "transfer-encoding" in headers]

        raw_receive = receive

        async def tracked() -> Message:
            msg = await raw_receive()
            if msg["type"] != "http.request" or not msg.get("more_body"):
                body_left[0] = False
            return msg

        receive = tracked
        try:
            if method == "OPTIONS":
                response = self._preflight(headers)
            else:
                request = await self._request(scope, receive, headers, request_id)
                resource = request.resource
                response = await self.dispatch(request)
        except Exception as exc:
            if not isinstance(exc, S3Error):
                log.exception("storage: %s %s failed", method, resource)
                exc = S3Error("InternalError", "We encountered an internal error. Please "
                              "try again.")
            body = b"" if method == "HEAD" else exc.to_xml(resource, request_id)
            response = Response(exc.status, [("content-type", "application/xml")], body)
        if body_left[0]:
            # Refused before its body was read: close rather than read it to the end.
            response.headers = [*(response.headers or []), ("connection", "close")]
        await _send(send, response, request_id, origin, method == "HEAD")

    def _preflight(self, headers: dict[str, list[str]]) -> Response:
        """Browsers ask before a cross-origin PUT of a presigned URL; any origin may, as the
        URL's signature is what grants the write."""
        origin = _first(headers, "origin")
        wanted = _first(headers, "access-control-request-method")
        if origin is None or wanted is None:
            raise S3Error("InvalidRequest", "a CORS preflight needs Origin and "
                          "Access-Control-Request-Method")
        if wanted not in _CORS_METHODS.split(", "):
            raise S3Error("AccessDenied", f"CORS: method {wanted} is not allowed")
        allow = [("access-control-allow-methods", _CORS_METHODS),
                 ("access-control-max-age", "3000")]
        asked = _first(headers, "access-control-request-headers")
        if asked:
            allow.append(("access-control-allow-headers", asked))
        return Response(200, allow)

    async def _request(self, scope: Scope, receive: Receive, headers: dict[str, list[str]],
                       request_id: str) -> Request:
        host = (headers.get("host") or [""])[0]
        where = parse_service_host(host, self.domain)
        if where is None or where.service != "storage":
            raise S3Error("InvalidRequest", f"Host {host!r} is not a storage endpoint "
                          f"(<branch>--storage.{self.domain})")
        branch_id, host_bucket = where.branch_id, where.prefix
        access = await self.branches.storage(branch_id)
        if access is None:
            raise S3Error("NoSuchBucket", f"branch {branch_id} has no object storage")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw_path.split(b"?", 1)[0]
        try:
            path = unquote(raw_path.decode("latin-1"), encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            raise S3Error("InvalidURI", "Couldn't parse the specified URI: the path's "
                          "percent-escapes are not UTF-8") from None
        if host_bucket:
            bucket, key = host_bucket, path[1:]
        else:
            bucket, _, key = path[1:].partition("/")
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                          keep_blank_values=True)
        signed = signed_host(headers)
        auth: RequestAuth | PresignedV2 | None = parse_request_auth(
            scope["method"], raw_path, query,
            headers if signed is None else {**headers, "host": [signed]})
        if auth is None:
            auth = parse_presigned_v2(scope["method"], raw_path, host_bucket, query, headers)
        if auth is not None:
            if auth.access_key_id != access.access_key_id:
                raise S3Error("InvalidAccessKeyId", "The AWS Access Key Id you provided does "
                              "not exist in our records.",
                              a_w_s_access_key_id=auth.access_key_id)
            auth.verify(access.secret, datetime.now(UTC))
        request = Request(scope["method"], raw_path, path, query, dict(query), headers,
                          receive, access, bucket, key, auth, request_id, self.listener)
        if auth is None:
            b = access.store.bucket(bucket)
            if not (b is not None and b.access == "public_read" and key
                    and request.method in ("GET", "HEAD")
                    and not set(request.params) - {"response-content-type",
                                                   "response-content-disposition",
                                                   "response-cache-control"}):
                raise S3Error("AccessDenied", "Access Denied (sign the request with the "
                              "branch's key, or read an object of a public_read bucket)")
        return request


def signed_host(headers: dict[str, list[str]]) -> str | None:
    """The Host a local forwarder's client signed (``X-Phloem-Signed-Host``), if it names
    a loopback address (``127.0.0.1:41873``, ``[::1]:8``, ``localhost:9``), else None.

    Routing still goes by the real Host and the key must be that branch's (each branch has
    its own), so this only lets a signature made for a local forwarder of the branch's own
    endpoint verify: replaying one through the forwarder was possible anyway. A loopback
    name is required so a signature made for any other endpoint never verifies here.
    """
    value = _first(headers, "x-phloem-signed-host")
    if value is None:
        return None
    name = value.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return value.strip()
    try:
        return value.strip() if ip_address(name).is_loopback else None
    except ValueError:
        return None


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


async def _send(send: Send, response: Response, request_id: str, origin: str | None,
                head: bool) -> None:
    headers = [(b"x-amz-request-id", request_id.encode()), (b"server", b"phloem")]
    length = response.file[2] if response.file is not None else len(response.body)
    headers.append((b"content-length", str(length).encode()))
    for k, v in response.headers or []:
        headers.append((k.encode("latin-1"), v.encode("utf-8")))
    if origin is not None:
        headers += [(b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", _CORS_EXPOSE.encode()),
                    (b"vary", b"Origin")]
    fd = response.file[0] if response.file is not None else None
    try:
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        if response.file is None or head:
            await send({"type": "http.response.body", "body": b"" if head else response.body})
            return
        _, offset, remaining = response.file
        while remaining > 0:
            data = os.pread(response.file[0], min(remaining, 256 * 1024), offset)
            if not data:
                break   # the blob is shorter than its row says: the client sees a short body
            offset += len(data)
            remaining -= len(data)
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        if fd is not None:
            os.close(fd)
