"""Small pieces the S3 operations share: the request's bucket, timestamps, XML replies.

    b = bucket_of(request)
    return xml_response("CopyObjectResult", {"ETag": etag, "LastModified": iso(ts)})
"""

from __future__ import annotations

from datetime import UTC, datetime

from phloem.services.storage.app import Request, Response
from phloem.services.storage.errors import S3Error, document, element
from phloem.services.storage.objects import Bucket


def bucket_of(req: Request) -> Bucket:
    b = req.access.store.bucket(req.bucket)
    if b is None:
        raise S3Error("NoSuchBucket", "The specified bucket does not exist.",
                      bucket_name=req.bucket)
    return b


def iso(ts: float) -> str:
    """S3's timestamps in XML: ``2026-12-01T22:00:00.000Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{int(ts * 1000) % 1000:03d}Z"


def xml_response(tag: str, children: dict[str, str | None], status: int = 200) -> Response:
    return Response(status, [("content-type", "application/xml")],
                    document(element(tag, children), namespaced=True))
