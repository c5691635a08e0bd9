"""Presigned URLs of AWS Signature Version 2 (query string: ``AWSAccessKeyId``,
``Expires``, ``Signature``), verified. boto3 still presigns with it by default for
``us-east-1`` endpoints, so a function's ``generate_presigned_url`` works unchanged. Only
the query form is accepted: requests signed with a V2 ``Authorization`` header are refused
(``sigv4.parse_request_auth``).

    auth = parse_presigned_v2(method, raw_path, host_bucket, query, headers)  # or None
    auth.verify(secret, now)

The string to sign is S3's: method, Content-MD5, Content-Type, Expires, the ``x-amz-*``
headers, then the resource (``/<bucket>/<key>`` as sent, plus the sub-resources S3 lists).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

from phloem.services.storage.errors import S3Error
from phloem.services.storage.sigv4 import MAX_EXPIRES_S, UNSIGNED

#: Query parameters that are part of the signed resource (S3's list).
SUBRESOURCES = frozenset({
    "accelerate", "acl", "cors", "defaultObjectAcl", "location", "logging", "partNumber",
    "policy", "requestPayment", "torrent", "versioning", "versionId", "versions", "website",
    "uploads", "uploadId", "response-content-type", "response-content-language",
    "response-expires", "response-cache-control", "response-content-disposition",
    "response-content-encoding", "delete", "lifecycle", "tagging", "restore",
    "storageClass", "notification", "replication", "analytics", "metrics", "inventory",
    "select", "select-type", "object-lock"})


@dataclass(frozen=True)
class PresignedV2:
    access_key_id: str
    expires: int
    signature: str
    string_to_sign: str
    payload_hash: str = UNSIGNED

    def verify(self, secret: str, now: datetime) -> None:
        left = self.expires - now.timestamp()
        if left < 0:
            raise S3Error("AccessDenied", "Request has expired")
        if left > MAX_EXPIRES_S:
            raise S3Error("AccessDenied", "Expires must be at most seven days ahead")
        expected = base64.b64encode(hmac.new(secret.encode(), self.string_to_sign.encode(),
                                             hashlib.sha1).digest()).decode()
        if not hmac.compare_digest(expected, self.signature):
            raise S3Error("SignatureDoesNotMatch", "The request signature we calculated does "
                          "not match the signature you provided. Check your key and signing "
                          "method.")


def parse_presigned_v2(method: str, raw_path: bytes, host_bucket: str,
                       query: list[tuple[str, str]],
                       headers: dict[str, list[str]]) -> PresignedV2 | None:
    """The V2 presigned signature of a request, or None if it carries none."""
    q = dict(query)
    if "AWSAccessKeyId" not in q and "Signature" not in q:
        return None
    for name in ("AWSAccessKeyId", "Expires", "Signature"):
        if name not in q:
            raise S3Error("AccessDenied", f"Query-string authentication requires {name}")
    if not q["Expires"].isdigit():
        raise S3Error("AccessDenied", "Expires must be a time in seconds since the epoch")

    def value(name: str) -> str:
        # The presigner may move signed headers into the query string.
        values = headers.get(name)
        return values[0].strip() if values else q.get(name, "").strip()

    amz = {k: ",".join(v.strip() for v in vs) for k, vs in headers.items()
           if k.startswith("x-amz-")}
    amz.update({k.lower(): v for k, v in query if k.lower().startswith("x-amz-")
                and k.lower() not in amz})
    resource = (f"/{host_bucket}" if host_bucket else "") + raw_path.decode("latin-1")
    sub = sorted((k, v) for k, v in query if k in SUBRESOURCES)
    if sub:
        resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in sub)
    lines = [method, value("content-md5"), value("content-type"), q["Expires"]]
    lines += [f"{k}:{amz[k]}" for k in sorted(amz)]
    return PresignedV2(q["AWSAccessKeyId"], int(q["Expires"]), q["Signature"],
                       "\n".join([*lines, resource]))
