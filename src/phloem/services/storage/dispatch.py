"""Which S3 operation a request names: by method, bucket, key and sub-resource.

    app = StorageApp(branches, domain, dispatch)
"""

from __future__ import annotations

from phloem.services.storage import listing, uploads
from phloem.services.storage.app import Request, Response
from phloem.services.storage.errors import S3Error
from phloem.services.storage.operations import (
    copy_object,
    delete_object,
    get_object,
    put_object,
)


async def dispatch(req: Request) -> Response:
    """Route a request to its operation by method, bucket, key and sub-resource."""
    m, p = req.method, req.params
    if not req.bucket:
        if m == "GET":
            return listing.list_buckets(req)
        raise S3Error("MethodNotAllowed", f"{m} is not allowed on the service")
    if not req.key:
        return await listing.bucket_operation(req)
    if "uploadId" in p or (m == "POST" and "uploads" in p):
        return await uploads.upload_operation(req)
    if m == "PUT":
        if req.header("x-amz-copy-source") is not None:
            return await copy_object(req)
        return await put_object(req)
    if m in ("GET", "HEAD"):
        return await get_object(req)
    if m == "DELETE":
        return await delete_object(req)
    raise S3Error("MethodNotAllowed", f"{m} is not allowed on an object")
