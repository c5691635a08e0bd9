"""AWS Signature Version 4 for S3, verified on the server side: the ``Authorization``
header, presigned query strings, and the per-chunk signatures of ``aws-chunked`` bodies.

    auth = parse_request_auth(method, raw_path, query, headers)   # None: anonymous
    auth.verify(secret, now)            # raises S3Error (SignatureDoesNotMatch, ...)
    chunks = auth.chunk_signer(secret)  # for STREAMING-AWS4-HMAC-SHA256-PAYLOAD bodies

Canonicalisation follows the AWS spec for S3: the path is URI-encoded once from its
decoded bytes (no dot-segment normalisation), query pairs are decoded then re-encoded
with only the unreserved characters left bare and sorted, header values are trimmed with
inner runs of spaces collapsed. The signature is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote_to_bytes

from phloem.services.storage.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: Clock skew tolerated between client and server, as S3 does.
MAX_SKEW_S = 15 * 60
#: The longest a presigned URL may live (seven days, as S3).
MAX_EXPIRES_S = 7 * 24 * 3600

_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),"
    r"\s*Signature=([0-9a-f]{64})\s*$")
_SPACES = re.compile(r" +")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    k = _hmac(("AWS4" + secret).encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def canonical_uri(raw_path: bytes) -> str:
    return quote(unquote_to_bytes(raw_path), safe="/~")


def canonical_query(pairs: list[tuple[str, str]]) -> str:
    encoded = sorted((quote(k, safe="~"), quote(v, safe="~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _parse_amz_date(value: str, field: str) -> datetime:
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise S3Error("AccessDenied",
                      f"{field} must be an ISO 8601 basic timestamp like 20260101T000000Z, "
                      f"got {value!r}") from None


@dataclass(frozen=True)
class RequestAuth:
    """The signature a request carries, parsed but not yet verified."""

    access_key_id: str
    date: str            # YYYYMMDD of the credential scope
    region: str
    amz_date: str        # the request's timestamp
    signature: str
    payload_hash: str    # hex digest, UNSIGNED-PAYLOAD or a STREAMING-* marker
    presigned: bool
    expires_s: int       # presigned only
    canonical_request: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/s3/aws4_request"

    def string_to_sign(self) -> str:
        digest = hashlib.sha256(self.canonical_request.encode()).hexdigest()
        return f"{ALGORITHM}\n{self.amz_date}\n{self.scope}\n{digest}"

    def verify(self, secret: str, now: datetime) -> None:
        """Raise S3Error unless the signature matches ``secret`` and the time is right."""
        when = _parse_amz_date(self.amz_date, "X-Amz-Date")
        if self.presigned:
            if (now - when).total_seconds() > self.expires_s:
                raise S3Error("AccessDenied", "Request has expired")
            if (when - now).total_seconds() > MAX_SKEW_S:
                raise S3Error("AccessDenied", "Request is not valid yet (X-Amz-Date)")
        elif abs((now - when).total_seconds()) > MAX_SKEW_S:
            raise S3Error("RequestTimeTooSkewed", "The difference between the request time "
                          "and the server's time is too large.")
        key = signing_key(secret, self.date, self.region)
        expected = hmac.new(key, self.string_to_sign().encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self.signature):
            raise S3Error("SignatureDoesNotMatch", "The request signature we calculated does "
                          "not match the signature you provided. Check your key and signing "
                          "method.")

    def chunk_signer(self, secret: str) -> ChunkSigner:
        return ChunkSigner(signing_key(secret, self.date, self.region), self.amz_date,
                           self.scope, self.signature)


class ChunkSigner:
    """Expected signatures of an ``aws-chunked`` body's chunks, each chained to the one
    before it (the first to the request's signature)."""

    def __init__(self, key: bytes, amz_date: str, scope: str, seed: str) -> None:
        self._key, self._amz_date, self._scope, self.previous = key, amz_date, scope, seed

    def _sign(self, kind: str, digest: str, extra: str) -> str:
        sts = f"{kind}\n{self._amz_date}\n{self._scope}\n{self.previous}\n{extra}{digest}"
        sig = hmac.new(self._key, sts.encode(), hashlib.sha256).hexdigest()
        self.previous = sig
        return sig

    def chunk(self, data_sha256: str) -> str:
        return self._sign("AWS4-HMAC-SHA256-PAYLOAD", data_sha256, EMPTY_SHA256 + "\n")

    def trailer(self, trailer_bytes: bytes) -> str:
        return self._sign("AWS4-HMAC-SHA256-TRAILER",
                          hashlib.sha256(trailer_bytes).hexdigest(), "")


def _canonical_headers(headers: dict[str, list[str]], names: tuple[str, ...]) -> str:
    lines = []
    for name in names:
        values = headers.get(name)
        if values is None:
            raise S3Error("AccessDenied", f"signed header {name!r} is missing from the request")
        joined = ",".join(_SPACES.sub(" ", v.strip()) for v in values)
        lines.append(f"{name}:{joined}\n")
    return "".join(lines)


def _parse_credential(credential: str, where: str) -> tuple[str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5 or parts[3] != "s3" or parts[4] != "aws4_request" \
            or not re.fullmatch(r"\d{8}", parts[1]):
        code = ("AuthorizationQueryParametersError" if where == "query"
                else "AuthorizationHeaderMalformed")
        raise S3Error(code, "Credential must be <key id>/<YYYYMMDD>/<region>/s3/aws4_request, "
                      f"got {credential!r}")
    return parts[0], parts[1], parts[2]


def parse_request_auth(method: str, raw_path: bytes, query: list[tuple[str, str]],
                       headers: dict[str, list[str]]) -> RequestAuth | None:
    """Parse the request's signature (header or query); ``None`` when it carries none.
    ``headers``: lowercase names to their values; ``query``: decoded pairs in order."""
    authz = headers.get("authorization")
    qdict = dict(query)
    if authz is not None:
        if "X-Amz-Signature" in qdict:
            raise S3Error("InvalidArgument", "Only one auth mechanism allowed; only the "
                          "X-Amz-Algorithm query parameter or the Authorization header "
                          "may be given")
        m = _AUTH_RE.match(authz[0])
        if not m:
            if authz[0].startswith("AWS "):
                raise S3Error("InvalidRequest", "Signature Version 2 is not supported; "
                              "sign with AWS4-HMAC-SHA256")
            raise S3Error("AuthorizationHeaderMalformed", "Authorization must be "
                          "'AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...'")
        key_id, date, region = _parse_credential(m.group(1), "header")
        signed = tuple(m.group(2).split(";"))
        amz_date = (headers.get("x-amz-date") or headers.get("date") or [""])[0]
        if amz_date and not amz_date[:1].isdigit():
            raise S3Error("AccessDenied", "sign with an x-amz-date header "
                          "(YYYYMMDDTHHMMSSZ)")
        payload = (headers.get("x-amz-content-sha256") or [""])[0]
        if not payload:
            raise S3Error("InvalidRequest", "Missing required header for this request: "
                          "x-amz-content-sha256")
        if payload not in (UNSIGNED, STREAMING_SIGNED, STREAMING_SIGNED_TRAILER,
                           STREAMING_UNSIGNED_TRAILER) and not _HEX64.match(payload):
            raise S3Error("InvalidArgument", "x-amz-content-sha256 must be a lowercase hex "
                          "SHA-256, UNSIGNED-PAYLOAD or a STREAMING-* value")
        pairs = query
        presigned, expires, signature = False, 0, m.group(3)
    elif "X-Amz-Signature" in qdict or "X-Amz-Algorithm" in qdict:
        for name in ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date",
                     "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Expires"):
            if name not in qdict:
                raise S3Error("AuthorizationQueryParametersError",
                              f"Query-string authentication requires {name}")
        if qdict["X-Amz-Algorithm"] != ALGORITHM:
            raise S3Error("AuthorizationQueryParametersError",
                          f"X-Amz-Algorithm must be {ALGORITHM}")
        key_id, date, region = _parse_credential(qdict["X-Amz-Credential"], "query")
        signed = tuple(qdict["X-Amz-SignedHeaders"].split(";"))
        amz_date = qdict["X-Amz-Date"]
        try:
            expires = int(qdict["X-Amz-Expires"])
        except ValueError:
            expires = -1
        if not 0 < expires <= MAX_EXPIRES_S:
            raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires must be a "
                          f"whole number of seconds from 1 to {MAX_EXPIRES_S}")
        signature = qdict["X-Amz-Signature"]
        if not _HEX64.match(signature):
            raise S3Error("AuthorizationQueryParametersError",
                          "X-Amz-Signature must be 64 lowercase hex digits")
        payload = (headers.get("x-amz-content-sha256") or [UNSIGNED])[0]
        if payload != UNSIGNED and not _HEX64.match(payload):
            raise S3Error("InvalidArgument", "presigned requests carry UNSIGNED-PAYLOAD or a "
                          "hex x-amz-content-sha256")
        pairs = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        presigned = True
    else:
        return None
    if "host" not in signed:
        raise S3Error("AccessDenied", "the host header must be signed (SignedHeaders)")
    if list(signed) != sorted(signed) or any(n != n.lower() for n in signed):
        raise S3Error("AccessDenied", "SignedHeaders must be lowercase and sorted")
    if not amz_date:
        raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date "
                      "header")
    if amz_date[:8] != date:
        raise S3Error("SignatureDoesNotMatch", "the credential scope's date is not the "
                      "request's date")
    canonical = "\n".join([
        method, canonical_uri(raw_path), canonical_query(pairs),
        _canonical_headers(headers, signed), ";".join(signed), payload])
    return RequestAuth(key_id, date, region, amz_date, signature, payload,
                       presigned, expires, canonical)
