"""Bucket-level S3 operations: ListBuckets, CreateBucket and HeadBucket (for the buckets
``neon.ts`` declares; others are refused), GetBucketLocation, ListObjectsV2 and
ListObjects (prefix, delimiter, max-keys, continuation tokens or markers, URL encoding),
and DeleteObjects.

    response = await bucket_operation(request)

A continuation token is the last key or common prefix returned, base64 with a marker
saying which, so a listing resumes after a rolled-up prefix without listing it again.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from urllib.parse import quote
from xml.etree import ElementTree as ET

from phloem.services.storage.app import Request, Response
from phloem.services.storage.body import read_body
from phloem.services.storage.common import bucket_of, iso, xml_response
from phloem.services.storage.errors import S3Error, document, element, parse_xml
from phloem.services.storage.objects import Bucket, ObjectMeta

MAX_KEYS = 1000
_MAX_XML_BYTES = 1024 * 1024


@dataclass
class Page:
    contents: list[ObjectMeta]
    prefixes: list[str]
    truncated: bool
    last: str | None
    last_is_prefix: bool


def list_page(bucket: Bucket, prefix: str, delimiter: str, start: str, max_keys: int,
              skip_prefix: str | None = None) -> Page:
    page = Page([], [], False, None, False)
    for meta in bucket.keys_from(start, prefix):
        if skip_prefix and meta.key.startswith(skip_prefix):
            continue
        entry: str | ObjectMeta = meta
        if delimiter:
            i = meta.key.find(delimiter, len(prefix))
            if i >= 0:
                entry = meta.key[: i + len(delimiter)]
        if len(page.contents) + len(page.prefixes) >= max_keys:
            page.truncated = max_keys > 0   # max-keys=0 asks for nothing, as S3 answers
            break
        if isinstance(entry, str):
            page.prefixes.append(entry)
            page.last, page.last_is_prefix = entry, True
            skip_prefix = entry
        else:
            page.contents.append(entry)
            page.last, page.last_is_prefix = entry.key, False
    return page


def _int_param(req: Request, name: str, default: int) -> int:
    value = req.params.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise S3Error("InvalidArgument", f"{name} must be a non-negative integer, "
                      f"got {value!r}")
    return int(value)


def _token(last: str, is_prefix: bool) -> str:
    return base64.urlsafe_b64encode(json.dumps([last, is_prefix]).encode()).decode()


def _untoken(token: str) -> tuple[str, bool]:
    try:
        last, is_prefix = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(last), bool(is_prefix)
    except (ValueError, TypeError, binascii.Error):
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect") \
            from None


def list_objects(req: Request, v2: bool) -> Response:
    b = bucket_of(req)
    prefix = req.params.get("prefix", "")
    delimiter = req.params.get("delimiter", "")
    max_keys = min(_int_param(req, "max-keys", MAX_KEYS), MAX_KEYS)
    encoding = req.params.get("encoding-type")
    if encoding not in (None, "url"):
        raise S3Error("InvalidArgument", "encoding-type must be 'url'")

    def enc(s: str) -> str:
        return quote(s, safe="/") if encoding == "url" else s

    skip: str | None = None
    if v2:
        token = req.params.get("continuation-token")
        if token is not None:
            start, is_prefix = _untoken(token)
            skip = start if is_prefix else None
        else:
            start = req.params.get("start-after", "")
    else:
        start = req.params.get("marker", "")
        if delimiter and start.endswith(delimiter):
            skip = start
    page = list_page(b, prefix, delimiter, start, max_keys, skip)
    root = element("ListBucketResult", {"Name": b.name, "Prefix": enc(prefix)})
    fields: dict[str, str | None] = {
        "Delimiter": enc(delimiter) if delimiter else None, "MaxKeys": str(max_keys),
        "EncodingType": encoding, "IsTruncated": str(page.truncated).lower()}
    if v2:
        fields["KeyCount"] = str(len(page.contents) + len(page.prefixes))
        fields["ContinuationToken"] = req.params.get("continuation-token")
        fields["StartAfter"] = (enc(req.params["start-after"])
                                if "start-after" in req.params else None)
        if page.truncated and page.last is not None:
            fields["NextContinuationToken"] = _token(page.last, page.last_is_prefix)
    else:
        fields["Marker"] = enc(req.params.get("marker", ""))
        if page.truncated and page.last is not None and delimiter:
            fields["NextMarker"] = enc(page.last)
    for name, value in fields.items():
        if value is not None:
            ET.SubElement(root, name).text = value
    for meta in page.contents:
        root.append(element("Contents", {
            "Key": enc(meta.key), "LastModified": iso(meta.modified), "ETag": meta.etag,
            "Size": str(meta.size), "StorageClass": "STANDARD"}))
    for p in page.prefixes:
        root.append(element("CommonPrefixes", {"Prefix": enc(p)}))
    return Response(200, [("content-type", "application/xml")], document(root, True))


def list_buckets(req: Request) -> Response:
    root = element("ListAllMyBucketsResult")
    root.append(element("Owner", {"ID": req.access.branch_id,
                                  "DisplayName": req.access.branch_id}))
    buckets = ET.SubElement(root, "Buckets")
    for name, b in sorted(req.access.store.buckets.items()):
        created = (b.path / "index.sqlite").stat().st_mtime
        buckets.append(element("Bucket", {"Name": name, "CreationDate": iso(created)}))
    return Response(200, [("content-type", "application/xml")], document(root, True))


async def _small_body(req: Request) -> bytes:
    out = io.BytesIO()
    too_large = S3Error("MalformedXML", f"the document is larger than {_MAX_XML_BYTES} bytes")
    await read_body(req.receive, out, req.headers, req.payload, None,
                    max_bytes=_MAX_XML_BYTES, too_large=too_large)
    return out.getvalue()


async def delete_objects(req: Request) -> Response:
    b = bucket_of(req)
    root = parse_xml(await _small_body(req), "Delete")
    keys = [el.findtext("Key") or "" for el in root.findall("Object")]
    if not keys or len(keys) > MAX_KEYS:
        raise S3Error("MalformedXML", f"Delete must list 1 to {MAX_KEYS} Object elements")
    quiet = (root.findtext("Quiet") or "false").strip().lower() == "true"
    result = element("DeleteResult")
    async with req.access.store.lock:
        for key in keys:
            b.delete(key)
            if not quiet:
                result.append(element("Deleted", {"Key": key}))
    return Response(200, [("content-type", "application/xml")], document(result, True))


async def bucket_operation(req: Request) -> Response:
    m, p = req.method, req.params
    declared = req.access.store.bucket(req.bucket) is not None
    if m == "PUT" and not p:
        if not declared:
            raise S3Error("AccessDenied", f"bucket {req.bucket!r} is not declared: buckets "
                          "are declared in neon.ts (preview.buckets)")
        return Response(200, [("location", "/" + req.bucket)])
    if m == "HEAD":
        bucket_of(req)
        return Response(200, [("x-amz-bucket-region", "us-east-1")])
    if m == "GET":
        if "location" in p:
            bucket_of(req)
            return xml_response("LocationConstraint", {})
        if "uploads" in p or "versions" in p or "policy" in p or "cors" in p:
            raise S3Error("NotImplemented", "this bucket sub-resource is not implemented")
        return list_objects(req, v2=p.get("list-type") == "2")
    if m == "POST" and "delete" in p:
        return await delete_objects(req)
    if m == "DELETE":
        raise S3Error("AccessDenied", "buckets are removed from neon.ts, not by DeleteBucket")
    raise S3Error("MethodNotAllowed", f"{m} is not allowed on a bucket")
