"""The multipart upload operations over HTTP: CreateMultipartUpload, UploadPart,
CompleteMultipartUpload, AbortMultipartUpload and ListParts.

    response = await upload_operation(request)   # request has ?uploads or ?uploadId=
"""

from __future__ import annotations

import contextlib
import io
import os
from xml.etree import ElementTree as ET

from phloem.services.storage.app import Request, Response
from phloem.services.storage.body import read_body
from phloem.services.storage.common import bucket_of, iso, xml_response
from phloem.services.storage.errors import S3Error, document, element, parse_xml
from phloem.services.storage.multipart import MAX_PARTS, Uploads
from phloem.services.storage.objects import ObjectMeta
from phloem.services.storage.operations import (
    DEFAULT_CONTENT_TYPE,
    MAX_OBJECT_BYTES,
    commit,
    receive_into,
    stored_headers,
    user_metadata,
)

_MAX_XML_BYTES = 1024 * 1024


def _uploads(req: Request) -> Uploads:
    return Uploads(req.access.store.uploads)


async def create(req: Request) -> Response:
    bucket_of(req)
    upload_id = _uploads(req).create(
        req.bucket, req.key, req.header("content-type") or DEFAULT_CONTENT_TYPE,
        user_metadata(req), stored_headers(req))
    return xml_response("InitiateMultipartUploadResult", {
        "Bucket": req.bucket, "Key": req.key, "UploadId": upload_id})


async def upload_part(req: Request, upload_id: str) -> Response:
    bucket_of(req)
    number_text = req.params.get("partNumber", "")
    if not number_text.isdigit() or not 1 <= int(number_text) <= MAX_PARTS:
        raise S3Error("InvalidArgument", f"partNumber must be an integer from 1 to {MAX_PARTS}")
    if req.header("x-amz-copy-source") is not None:
        raise S3Error("NotImplemented", "UploadPartCopy is not implemented")
    ups = _uploads(req)
    tmp = ups.part_tmp(upload_id, req.bucket, req.key)
    size, md5, sums = await receive_into(req, tmp, MAX_OBJECT_BYTES)
    etag = ups.put_part(upload_id, int(number_text), tmp, size, md5)
    headers = [("etag", etag)] + [(f"x-amz-checksum-{a}", v) for a, v in sums.items()]
    return Response(200, headers)


async def complete(req: Request, upload_id: str) -> Response:
    b = bucket_of(req)
    ups = _uploads(req)
    info = ups.info(upload_id, req.bucket, req.key)
    out = io.BytesIO()
    await read_body(req.receive, out, req.headers, req.payload, None, max_bytes=_MAX_XML_BYTES,
                    too_large=S3Error("MalformedXML", "the document is too large"))
    root = parse_xml(out.getvalue(), "CompleteMultipartUpload")
    wanted = []
    for part in root.findall("Part"):
        number = (part.findtext("PartNumber") or "").strip()
        if not number.isdigit():
            raise S3Error("MalformedXML", "every Part needs a numeric PartNumber")
        wanted.append((int(number), part.findtext("ETag") or ""))
    tmp = b.new_tmp()
    try:
        size, etag = ups.assemble(upload_id, req.bucket, req.key, wanted, tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    meta = ObjectMeta(size, etag, str(info["content_type"]),
                      dict(info["metadata"]),  # type: ignore[call-overload]
                      dict(info["headers"]))  # type: ignore[call-overload]
    # The parts leave the quota's count as the object enters it.
    await commit(req, b, tmp, meta, releasing=size)
    ups.abort(upload_id, req.bucket, req.key)
    return xml_response("CompleteMultipartUploadResult", {
        "Location": f"/{req.bucket}/{req.key}", "Bucket": req.bucket, "Key": req.key,
        "ETag": etag})


def list_parts(req: Request, upload_id: str) -> Response:
    bucket_of(req)
    marker = req.params.get("part-number-marker", "0")
    max_parts = req.params.get("max-parts", "1000")
    if not marker.isdigit() or not max_parts.isdigit():
        raise S3Error("InvalidArgument", "part-number-marker and max-parts must be integers")
    parts = [p for p in _uploads(req).parts(upload_id, req.bucket, req.key)
             if p.number > int(marker)]
    shown = parts[: min(int(max_parts), 1000)]
    root = element("ListPartsResult", {
        "Bucket": req.bucket, "Key": req.key, "UploadId": upload_id,
        "PartNumberMarker": marker, "MaxParts": max_parts,
        "IsTruncated": str(len(shown) < len(parts)).lower(),
        "StorageClass": "STANDARD"})
    if shown:
        ET.SubElement(root, "NextPartNumberMarker").text = str(shown[-1].number)
    for p in shown:
        root.append(element("Part", {"PartNumber": str(p.number),
                                     "LastModified": iso(p.modified),
                                     "ETag": p.etag, "Size": str(p.size)}))
    return Response(200, [("content-type", "application/xml")], document(root, True))


async def upload_operation(req: Request) -> Response:
    m = req.method
    upload_id = req.params.get("uploadId")
    if upload_id is None:
        return await create(req)
    if m == "PUT":
        return await upload_part(req, upload_id)
    if m == "POST":
        return await complete(req, upload_id)
    if m == "DELETE":
        bucket_of(req)
        _uploads(req).abort(upload_id, req.bucket, req.key)
        return Response(204)
    if m == "GET":
        return list_parts(req, upload_id)
    raise S3Error("MethodNotAllowed", f"{m} is not allowed on a multipart upload")
