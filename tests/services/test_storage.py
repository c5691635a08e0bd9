"""Object storage per branch, with the real AWS SDK for Python against a real server.

The S3 app is served by uvicorn on a real socket; boto3 signs for the branch's storage
host name and connects to 127.0.0.1 (glibc does not resolve *.localhost), sending that
host name in the Host header.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.exceptions
import httpx
import pytest
import uvicorn
from boto3.s3.transfer import TransferConfig
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from phloem.control.triggers import check_triggers
from phloem.dev.forward import ServiceForwarders, rewrite_head
from phloem.metadata.secrets import SecretBox
from phloem.services.storage.app import StorageApp
from phloem.services.storage.checksums import new_checksum
from phloem.services.storage.dispatch import dispatch
from phloem.services.storage.errors import S3Error
from phloem.services.storage.objects import ObjectMeta
from phloem.services.storage.sigv4 import parse_request_auth
from phloem.services.storage.state import StorageBranches, parse_buckets
from phloem.system.validation import InvalidInput
from phloem.system.xfs import xfs_available, xfs_reflink_mount
from phloem.testing import PlatformProcess, free_port, host_of, wait_for

DOMAIN = "fn.localhost"
APPS = Path(__file__).parent.parent / "apps"
MAIN, OTHER, CHILD = "br-main-one-aaaaaa", "br-other-two-bbbbbb", "br-child-three-cccccc"
BUCKETS = {"buckets": {"images": {}, "site": {"access": "public_read"}}}


@dataclass
class Endpoint:
    """Where branches' S3 endpoints listen and how to get a branch's key pair."""

    port: int
    branches: StorageBranches
    loop: asyncio.AbstractEventLoop

    def credentials(self, branch_id: str) -> tuple[str, str] | None:
        return self.branches.credentials(branch_id)

    def host(self, branch_id: str) -> str:
        return f"{branch_id}--storage.{DOMAIN}:{self.port}"

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def client(self, branch_id: str, key: tuple[str, str] | None = None,
               style: str = "path", signature_version: str | None = "s3v4") -> Any:
        key = key or self.credentials(branch_id)
        assert key is not None
        s3 = boto3.client(
            "s3", endpoint_url=f"http://{self.host(branch_id)}", region_name="us-east-1",
            aws_access_key_id=key[0], aws_secret_access_key=key[1],
            config=Config(signature_version=signature_version, s3={"addressing_style": style},
                          retries={"max_attempts": 1}))
        port = self.port

        def to_loopback(request: Any, **_: Any) -> None:
            url = urlsplit(request.url)
            request.headers["Host"] = url.netloc
            request.url = urlunsplit(url._replace(netloc=f"127.0.0.1:{port}"))

        s3.meta.events.register("before-send.s3", to_loopback)
        return s3

    def http(self, url: str, method: str = "GET", **kw: Any) -> httpx.Response:
        """Send a (presigned) URL's request to 127.0.0.1 with its own Host."""
        u = urlsplit(url)
        return httpx.request(method, urlunsplit(u._replace(netloc=f"127.0.0.1:{self.port}")),
                             headers={"Host": u.netloc, **kw.pop("headers", {})}, **kw)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    root = Path(tempfile.mkdtemp(prefix="phloem-s3-"))
    configs: dict[str, dict[str, Any]] = {}

    async def config_of(branch_id: str) -> dict[str, Any] | None:
        return configs.get(branch_id)

    branches = StorageBranches(SecretBox(os.urandom(32)), lambda b: root / b / "storage",
                               config_of, quota_bytes=64 << 20)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(StorageApp(branches, DOMAIN, dispatch),
                                           host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),))
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the S3 server to listen")
        ep = Endpoint(port, branches, loop)
        for b in (MAIN, OTHER):
            configs[b] = BUCKETS
            ep.run(branches.provision(b, BUCKETS))
        yield ep
    finally:
        server.should_exit = True
        thread.join(30)
        branches.close()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def error_code(exc: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> tuple[str, int]:
    err = exc.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def test_put_get_range_head_list_copy_delete(endpoint: Endpoint) -> None:
    s3 = endpoint.client(MAIN)
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["images", "site"]
    s3.create_bucket(Bucket="images")   # declared: already there, as S3 answers its owner
    s3.head_bucket(Bucket="site")
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.create_bucket(Bucket="other")   # buckets are declared in neon.ts
    assert error_code(exc) == ("AccessDenied", 403)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.head_bucket(Bucket="other")
    assert error_code(exc) == ("404", 404)
    put = s3.put_object(Bucket="images", Key="docs/a.txt", Body=b"hello world",
                        ContentType="text/plain", Metadata={"owner": "ann"})
    assert put["ETag"] == '"' + hashlib.md5(b"hello world").hexdigest() + '"'
    got = s3.get_object(Bucket="images", Key="docs/a.txt", Range="bytes=6-")
    assert got["Body"].read() == b"world"
    assert got["ContentRange"] == "bytes 6-10/11"
    whole = s3.get_object(Bucket="images", Key="docs/a.txt", ChecksumMode="ENABLED")
    assert whole["ChecksumCRC32"] == base64.b64encode(
        zlib.crc32(b"hello world").to_bytes(4, "big")).decode()
    assert whole["Body"].read() == b"hello world"   # botocore checks it against the CRC
    head = s3.head_object(Bucket="images", Key="docs/a.txt")
    assert (head["ContentType"], head["Metadata"], head["ContentLength"]) == \
        ("text/plain", {"owner": "ann"}, 11)
    for key in ("docs/b.txt", "docs/sub/c.txt", "readme", "z/1", "z/2"):
        s3.put_object(Bucket="images", Key=key, Body=key.encode())
    page = s3.list_objects_v2(Bucket="images", Delimiter="/", MaxKeys=2)
    assert ([c["Key"] for c in page.get("Contents", [])],
            [p["Prefix"] for p in page["CommonPrefixes"]], page["IsTruncated"]) == \
        (["readme"], ["docs/"], True)
    page = s3.list_objects_v2(Bucket="images", Delimiter="/", MaxKeys=2,
                              ContinuationToken=page["NextContinuationToken"])
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["z/"]
    assert not page["IsTruncated"]
    page = s3.list_objects_v2(Bucket="images", Prefix="docs/")
    assert [c["Key"] for c in page["Contents"]] == ["docs/a.txt", "docs/b.txt",
                                                    "docs/sub/c.txt"]
    s3.copy_object(Bucket="images", Key="copy.txt",
                   CopySource={"Bucket": "images", "Key": "docs/a.txt"})
    copied = s3.get_object(Bucket="images", Key="copy.txt")
    assert (copied["Body"].read(), copied["Metadata"]) == (b"hello world", {"owner": "ann"})
    s3.delete_object(Bucket="images", Key="copy.txt")
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.get_object(Bucket="images", Key="copy.txt")
    assert error_code(exc) == ("NoSuchKey", 404)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.get_object(Bucket="images", Key="docs/a.txt", Range="bytes=50-60")
    assert error_code(exc) == ("InvalidRange", 416)
    odd = ["sp ace/ü+%25?#.txt", "/leading//double", "..", "a=b&c;d~*'()!$,@"]
    for key in odd:
        s3.put_object(Bucket="site", Key=key, Body=key.encode())
        assert s3.get_object(Bucket="site", Key=key)["Body"].read() == key.encode()
    listed = s3.list_objects_v2(Bucket="site")["Contents"]
    assert [c["Key"] for c in listed] == sorted(odd, key=lambda k: k.encode())
    assert s3.put_object(Bucket="images", Key="empty", Body=b"")["ETag"] == \
        '"d41d8cd98f00b204e9800998ecf8427e"'
    assert s3.get_object(Bucket="images", Key="empty")["Body"].read() == b""
    bad_utf8 = endpoint.http(f"http://{endpoint.host(MAIN)}/images/%ff")
    assert (bad_utf8.status_code, "<Code>InvalidURI</Code>" in bad_utf8.text) == (400, True)
    virtual = endpoint.client(MAIN, style="virtual")
    assert virtual.get_object(Bucket="images", Key="readme")["Body"].read() == b"readme"


def test_multipart_upload(endpoint: Endpoint) -> None:
    s3 = endpoint.client(MAIN)
    data = os.urandom(11 << 20)
    # boto3's default: the parts go up concurrently.
    s3.upload_fileobj(io.BytesIO(data), "images", "big.bin",
                      Config=TransferConfig(multipart_threshold=5 << 20,
                                            multipart_chunksize=5 << 20))
    head = s3.head_object(Bucket="images", Key="big.bin")
    md5s = b"".join(hashlib.md5(data[i:i + (5 << 20)]).digest()
                    for i in range(0, len(data), 5 << 20))
    assert head["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-3"'
    assert s3.get_object(Bucket="images", Key="big.bin")["Body"].read() == data
    up = s3.create_multipart_upload(Bucket="images", Key="parts")
    s3.upload_part(Bucket="images", Key="parts", UploadId=up["UploadId"], PartNumber=1,
                   Body=b"x" * 100)
    s3.upload_part(Bucket="images", Key="parts", UploadId=up["UploadId"], PartNumber=2,
                   Body=b"y")
    parts = s3.list_parts(Bucket="images", Key="parts", UploadId=up["UploadId"])["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, 100), (2, 1)]
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.complete_multipart_upload(
            Bucket="images", Key="parts", UploadId=up["UploadId"],
            MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]}
                                       for p in parts]})
    assert error_code(exc) == ("EntityTooSmall", 400)
    s3.abort_multipart_upload(Bucket="images", Key="parts", UploadId=up["UploadId"])
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.list_parts(Bucket="images", Key="parts", UploadId=up["UploadId"])
    assert error_code(exc) == ("NoSuchUpload", 404)


def test_presigned_urls_and_cors(endpoint: Endpoint) -> None:
    s3 = endpoint.client(MAIN)
    put_url = s3.generate_presigned_url("put_object", ExpiresIn=60,
                                        Params={"Bucket": "images", "Key": "up.txt"})
    origin = {"Origin": "http://app.example"}
    pre = endpoint.http(put_url, "OPTIONS", headers={
        **origin, "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://app.example"
    assert "PUT" in pre.headers["access-control-allow-methods"]
    r = endpoint.http(put_url, "PUT", content=b"from a browser", headers=origin)
    assert r.status_code == 200, r.text
    assert "ETag" in r.headers["access-control-expose-headers"]
    get_url = s3.generate_presigned_url("get_object", ExpiresIn=60,
                                        Params={"Bucket": "images", "Key": "up.txt"})
    assert endpoint.http(get_url).content == b"from a browser"
    forged = get_url.replace("X-Amz-Expires=60", "X-Amz-Expires=61")
    r = endpoint.http(forged)
    assert (r.status_code, "<Code>SignatureDoesNotMatch</Code>" in r.text) == (403, True)
    # boto3's own default for us-east-1: Signature Version 2 presigned URLs.
    v2 = endpoint.client(MAIN, signature_version=None)
    v2_put = v2.generate_presigned_url("put_object", ExpiresIn=60, Params={
        "Bucket": "images", "Key": "v2.txt", "ContentType": "text/plain"})
    assert "AWSAccessKeyId=" in v2_put
    r = endpoint.http(v2_put, "PUT", content=b"v2 body", headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    v2_get = v2.generate_presigned_url("get_object", ExpiresIn=60, Params={
        "Bucket": "images", "Key": "v2.txt", "ResponseContentDisposition": "attachment"})
    r = endpoint.http(v2_get)
    assert (r.content, r.headers["content-disposition"]) == (b"v2 body", "attachment")
    r = endpoint.http(v2_get.replace("v2.txt", "up.txt"))
    assert (r.status_code, "<Code>SignatureDoesNotMatch</Code>" in r.text) == (403, True)


def test_signatures_keys_and_public_buckets(endpoint: Endpoint) -> None:
    main_key = endpoint.branches.credentials(MAIN)
    assert main_key is not None
    wrong = endpoint.client(MAIN, key=(main_key[0], "x" * 40))
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        wrong.list_objects_v2(Bucket="images")
    assert error_code(exc) == ("SignatureDoesNotMatch", 403)
    # The main branch's key on the other branch's endpoint.
    foreign = endpoint.client(OTHER, key=main_key)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        foreign.list_objects_v2(Bucket="images")
    assert error_code(exc) == ("InvalidAccessKeyId", 403)
    s3 = endpoint.client(MAIN)
    s3.put_object(Bucket="site", Key="index.html", Body=b"<h1>hi</h1>")
    s3.put_object(Bucket="images", Key="secret", Body=b"no")
    base = f"http://{endpoint.host(MAIN)}"
    assert endpoint.http(f"{base}/site/index.html").content == b"<h1>hi</h1>"
    r = endpoint.http(f"{base}/images/secret")
    assert (r.status_code, "<Code>AccessDenied</Code>" in r.text) == (403, True)
    r = endpoint.http(f"{base}/site/index.html", "PUT", content=b"defaced")
    assert r.status_code == 403
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.put_object(Bucket="undeclared", Key="k", Body=b"")
    assert error_code(exc) == ("NoSuchBucket", 404)


def test_quota(endpoint: Endpoint) -> None:
    s3 = endpoint.client(OTHER)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.put_object(Bucket="images", Key="huge", Body=b"\0" * (65 << 20))
    assert error_code(exc) == ("QuotaExceeded", 507)
    assert s3.list_objects_v2(Bucket="images")["KeyCount"] == 0


def test_branch_copy_reset_delete(endpoint: Endpoint) -> None:
    parent = endpoint.client(MAIN)
    parent.put_object(Bucket="images", Key="family.txt", Body=b"from the parent")
    endpoint.run(endpoint.branches.copy(MAIN, CHILD))
    child_key = endpoint.branches.credentials(CHILD)
    assert child_key is not None and child_key != endpoint.branches.credentials(MAIN)
    child = endpoint.client(CHILD)
    assert child.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    child.put_object(Bucket="images", Key="family.txt", Body=b"the child's")
    child.put_object(Bucket="images", Key="only-child", Body=b"c")
    assert parent.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    endpoint.run(endpoint.branches.reset(CHILD, MAIN))
    assert child.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    with pytest.raises(botocore.exceptions.ClientError):
        child.head_object(Bucket="images", Key="only-child")
    root = endpoint.branches.root_of(CHILD)
    assert root.exists()
    endpoint.run(endpoint.branches.delete(CHILD))
    assert not root.exists()


def test_storage_triggers_are_checked() -> None:
    (spec,) = check_triggers({"up": {"type": "storage_object_created", "function": "ingest",
                                     "bucket": "assets", "prefix": "logos/"}})
    assert (spec.kind, spec.bucket, spec.prefix, spec.cron) == \
        ("storage_object_created", "assets", "logos/", "")
    (cron,) = check_triggers({"tick": {"type": "schedule", "function": "cron",
                                       "cron": "* * * * *"}})
    assert (cron.kind, cron.bucket) == ("schedule", None)
    for spec_in, field in (({"bucket": "Assets"}, "triggers.up.bucket"),
                           ({"bucket": "assets", "cron": "* * * * *"}, "triggers.up.cron"),
                           ({"bucket": "assets", "prefix": 7}, "triggers.up.prefix")):
        with pytest.raises(InvalidInput) as exc:
            check_triggers({"up": {"type": "storage_object_created", "function": "ingest",
                                   **spec_in}})
        assert exc.value.field == field
    with pytest.raises(InvalidInput) as exc:
        check_triggers({"up": {"type": "on_upload", "function": "ingest"}})
    assert exc.value.field == "triggers.up.type"


def test_bucket_options_are_checked() -> None:
    assert parse_buckets({"buckets": {"a-b.c": {"access": "public_read"}}}) == \
        {"a-b.c": "public_read"}
    with pytest.raises(ValueError, match=r"preview\.buckets\.Bad: a bucket name"):
        parse_buckets({"buckets": {"Bad": {}}})
    with pytest.raises(ValueError, match=r"preview\.buckets\.img\.access: must be one of"):
        parse_buckets({"buckets": {"img": {"access": "public"}}})


@pytest.mark.skipif(xfs_available() is not None, reason=xfs_available() or "")
def test_branch_copy_shares_extents_on_xfs() -> None:
    with xfs_reflink_mount(size_gb=1) as mnt:
        async def config_of(branch_id: str) -> dict[str, Any] | None:
            return BUCKETS

        async def scenario() -> tuple[Path, Path]:
            branches = StorageBranches(SecretBox(os.urandom(32)),
                                       lambda b: mnt / b / "storage", config_of, 1 << 30)
            await branches.provision("br-pa-rent-aaaaaa", BUCKETS)
            parent = await branches.storage("br-pa-rent-aaaaaa")
            assert parent is not None
            bucket = parent.store.buckets["images"]
            tmp = bucket.new_tmp()
            tmp.write_bytes(os.urandom(4 << 20))
            async with parent.store.lock:
                bucket.commit("blob", tmp, ObjectMeta(4 << 20, '"x"', "binary/octet-stream"))
            await branches.copy("br-pa-rent-aaaaaa", "br-ch-ild-bbbbbb")
            child = await branches.storage("br-ch-ild-bbbbbb")
            assert child is not None
            src = bucket.blob_path(bucket.get("blob").blob)  # type: ignore[union-attr]
            dst = child.store.buckets["images"].blob_path(
                child.store.buckets["images"].get("blob").blob)  # type: ignore[union-attr]
            branches.close()
            return src, dst

        src, dst = asyncio.run(scenario())
        assert src.read_bytes() == dst.read_bytes()
        for path in (src, dst):
            out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True,
                                 text=True, check=True).stdout
            assert sum("shared" in line for line in out.splitlines()) > 0, out


def test_chunk_signatures_match_the_aws_spec_example() -> None:
    """The worked example of AWS's "chunked upload" page: its seed and chunk signatures."""
    headers = {
        "host": ["s3.amazonaws.com"], "x-amz-date": ["20130524T000000Z"],
        "x-amz-storage-class": ["REDUCED_REDUNDANCY"], "content-encoding": ["aws-chunked"],
        "x-amz-content-sha256": ["STREAMING-AWS4-HMAC-SHA256-PAYLOAD"],
        "x-amz-decoded-content-length": ["66560"], "content-length": ["66824"],
        "authorization": [
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
            "aws4_request,SignedHeaders=content-encoding;content-length;host;"
            "x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
            "x-amz-storage-class,Signature="
            "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"]}
    auth = parse_request_auth("PUT", b"/examplebucket/chunkObject.txt", [], headers)
    assert auth is not None
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    auth.verify(secret, datetime(2013, 5, 24, 0, 1, tzinfo=UTC))
    with pytest.raises(S3Error, match="does not match"):
        auth.verify(secret[:-1] + "X", datetime(2013, 5, 24, 0, 1, tzinfo=UTC))
    chunks = auth.chunk_signer(secret)
    assert [chunks.chunk(hashlib.sha256(data).hexdigest())
            for data in (b"a" * 65536, b"a" * 1024, b"")] == [
        "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
        "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
        "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"]


def test_checksums_match_their_check_values() -> None:
    # The catalogue's check value of each CRC: the digest of b"123456789".
    for algo, check in (("crc32", 0xCBF43926), ("crc32c", 0xE3069283),
                        ("crc64nvme", 0xAE8B14860A799888)):
        c = new_checksum(algo)
        c.update(b"1234")
        c.update(b"56789")
        size = 8 if algo == "crc64nvme" else 4
        assert c.b64() == base64.b64encode(check.to_bytes(size, "big")).decode(), algo


def _signed_streaming_request(endpoint: Endpoint, key: str, chunks: list[bytes],
                              payload: str, trailer: str | None = None,
                              corrupt: bool = False) -> httpx.Response:
    """A PUT whose head botocore signs, with an aws-chunked body: signed chunks
    (``payload`` STREAMING-AWS4-HMAC-SHA256-PAYLOAD, chained per AWS's spec) or unsigned
    ones with a checksum trailer (STREAMING-UNSIGNED-PAYLOAD-TRAILER)."""
    creds = endpoint.branches.credentials(MAIN)
    assert creds is not None
    decoded = sum(len(c) for c in chunks)
    headers = {"Content-Encoding": "aws-chunked", "X-Amz-Content-SHA256": payload,
               "X-Amz-Decoded-Content-Length": str(decoded)}
    if trailer:
        headers["X-Amz-Trailer"] = trailer.split(":")[0]
    request = AWSRequest("PUT", f"http://{endpoint.host(MAIN)}/images/{key}",
                         headers=headers)
    # SigV4Auth (not S3SigV4Auth) signs the x-amz-content-sha256 given, as SDKs that
    # stream chunks do.
    SigV4Auth(Credentials(*creds), "s3", "us-east-1").add_auth(request)
    body = bytearray()
    if payload == "STREAMING-AWS4-HMAC-SHA256-PAYLOAD":
        sig_header = request.headers["Authorization"]
        previous = sig_header.rsplit("Signature=", 1)[1]
        amz_date = request.headers["X-Amz-Date"]
        scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"
        k = ("AWS4" + creds[1]).encode()
        for part in (amz_date[:8], "us-east-1", "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        for data in [*chunks, b""]:
            sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, previous,
                             hashlib.sha256(b"").hexdigest(),
                             hashlib.sha256(data).hexdigest()])
            previous = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
            if corrupt and data:
                data = b"!" + data[1:]   # after signing: the server must notice
            body += f"{len(data):x};chunk-signature={previous}\r\n".encode() + data + b"\r\n"
    else:
        for data in [*chunks, b""]:
            body += f"{len(data):x}\r\n".encode() + data + (b"\r\n" if data else b"")
        body += f"{trailer}\r\n\r\n".encode()
    return endpoint.http(request.url, "PUT", content=bytes(body),
                         headers={k: v for k, v in request.headers.items() if k != "Host"})


def test_aws_chunked_uploads(endpoint: Endpoint) -> None:
    s3 = endpoint.client(MAIN)
    chunks = [os.urandom(65536), os.urandom(1000)]
    r = _signed_streaming_request(endpoint, "signed", chunks,
                                  "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    assert r.status_code == 200, r.text
    assert s3.get_object(Bucket="images", Key="signed")["Body"].read() == b"".join(chunks)
    r = _signed_streaming_request(endpoint, "signed", chunks,
                                  "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", corrupt=True)
    assert (r.status_code, "<Code>SignatureDoesNotMatch</Code>" in r.text) == (403, True)
    assert s3.get_object(Bucket="images", Key="signed")["Body"].read() == b"".join(chunks)
    crc = new_checksum("crc64nvme")
    for c in chunks:
        crc.update(c)
    r = _signed_streaming_request(endpoint, "trailer", chunks,
                                  "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                                  trailer=f"x-amz-checksum-crc64nvme:{crc.b64()}")
    assert r.status_code == 200, r.text
    assert r.headers["x-amz-checksum-crc64nvme"] == crc.b64()
    assert s3.get_object(Bucket="images", Key="trailer")["Body"].read() == b"".join(chunks)
    r = _signed_streaming_request(endpoint, "trailer", chunks,
                                  "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                                  trailer="x-amz-checksum-crc64nvme:AAAAAAAAAAA=")
    assert (r.status_code, "<Code>BadDigest</Code>" in r.text) == (400, True)


class PlatformEndpoint(Endpoint):
    """The branches' S3 endpoints of a running platform, through its gateway."""

    def __init__(self, platform: PlatformProcess) -> None:
        self.port = platform.gateway_port
        self.platform = platform
        self.box = SecretBox.from_data_dir(platform.data_dir / "secrets")

    def credentials(self, branch_id: str) -> tuple[str, str] | None:
        # What env() injects into the branch's functions, read as root from its sealed file.
        path = (self.platform.data_dir / "branches" / branch_id / "services" / "storage"
                / ".credentials")
        if not path.exists():
            return None
        pair = self.box.open(path.read_text(), context=f"branch:{branch_id}:storage_key")
        return pair["access_key_id"], pair["secret_access_key"]


@pytest.fixture
def s3_parent(platform: PlatformProcess) -> Iterator[str]:
    """A branch of the shared platform for these tests, removed (with its children) even
    when a test fails half-way."""
    yield platform.cli_json("branches", "create", "--name", "s3-parent")["id"]
    platform.cli("branches", "delete", "s3-parent", "--recursive", check=False)


def test_storage_branches_with_the_platform(platform: PlatformProcess, s3_parent: str) -> None:
    """Through the gateway: objects are copied by branch create, stay apart, come back with
    a reset and go with a delete; a key works only on its branch."""
    ep = PlatformEndpoint(platform)
    parent = s3_parent
    api = platform.api()
    r = api.put(f"/branches/{parent}/services", json={"services": {"storage": BUCKETS}})
    assert r.status_code == 200, r.text
    assert r.json()["urls"]["storage"] == \
        f"http://{parent}--storage.{DOMAIN}:{platform.gateway_port}"
    bad = api.put(f"/branches/{parent}/services",
                  json={"services": {"storage": {"buckets": {"Bad_Name": {}}}}})
    assert bad.status_code == 400 and "preview.buckets.Bad_Name" in bad.text, bad.text
    s3 = ep.client(parent)
    s3.put_object(Bucket="images", Key="family.txt", Body=b"from the parent")
    for key in ("sp ace/ü+%25?#.txt", "/leading//double", ".."):   # the gateway keeps paths
        s3.put_object(Bucket="site", Key=key, Body=key.encode())
        assert s3.get_object(Bucket="site", Key=key)["Body"].read() == key.encode()
    data = os.urandom(6 << 20)
    s3.upload_fileobj(io.BytesIO(data), "images", "big.bin", Config=TransferConfig(
        multipart_threshold=5 << 20, multipart_chunksize=5 << 20, use_threads=False))
    url = s3.generate_presigned_url("get_object", ExpiresIn=60,
                                    Params={"Bucket": "images", "Key": "big.bin"})
    assert ep.http(url).content == data

    # A function of the branch sees the variables and reaches the endpoint from its sandbox.
    s3.put_object(Bucket="site", Key="hello.txt", Body=b"public hello")
    fn = platform.deploy("sthree", APPS / "s3probe", branch="s3-parent")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        seen = gw.get("/", params={"key": "hello.txt"}).json()
    assert seen["env"] == {
        "AWS_ACCESS_KEY_ID": ep.credentials(parent)[0],  # type: ignore[index]
        "AWS_SECRET_ACCESS_KEY": ep.credentials(parent)[1],  # type: ignore[index]
        "AWS_ENDPOINT_URL_S3": f"http://{parent}--storage.{DOMAIN}:{platform.gateway_port}",
        "AWS_REGION": "us-east-1", "NEON_STORAGE_FORCE_PATH_STYLE": "true"}
    assert (seen["status"], seen["body"]) == (200, "public hello")

    # storage_object_created: an object under the prefix POSTs to the function, once.
    r = api.put(f"/branches/{parent}/triggers", json={"triggers": {"on-upload": {
        "type": "storage_object_created", "function": "sthree", "bucket": "images",
        "prefix": "in/", "functionPath": "/object"}}})
    assert r.status_code == 200, r.text
    assert (r.json()[0]["type"], r.json()[0]["bucket"], r.json()[0]["prefix"]) == \
        ("storage_object_created", "images", "in/")
    listed = platform.cli("triggers", "list", "--branch", "s3-parent").stdout
    assert "object created in images/in/" in listed, listed
    s3.put_object(Bucket="images", Key="out/skipped.txt", Body=b"no")
    s3.put_object(Bucket="images", Key="in/photo.png", Body=b"png", ContentType="image/png")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        posts = wait_for(lambda: gw.get("/seen").json(), 60, "the trigger's POST")
    (post,) = posts
    event = json.loads(post["body"])
    assert (post["path"], post["headers"]["x-neon-trigger"]) == ("/object", "on-upload")
    assert event["trigger"] == {"name": "on-upload", "type": "storage_object_created",
                                "bucket": "images", "prefix": "in/"}
    assert {k: event["data"][k] for k in ("bucket", "key", "size", "content_type", "etag")} \
        == {"bucket": "images", "key": "in/photo.png", "size": 3, "content_type": "image/png",
            "etag": '"' + hashlib.md5(b"png").hexdigest() + '"'}
    runs = wait_for(lambda: [h for h in api.get(
        f"/branches/{parent}/triggers/on-upload/history").json()
        if h["status"] == "succeeded"], 30, "the run's history")
    assert [(h["reason"], h["id"]) for h in runs] == \
        [("object_created", post["headers"]["x-neon-invocation-id"])]

    child = platform.cli_json("branches", "create", "--name", "s3-child",
                              "--parent", "s3-parent")["id"]
    child_key = ep.credentials(child)
    assert child_key is not None and child_key != ep.credentials(parent)
    c3 = ep.client(child)
    assert c3.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        ep.client(parent, key=child_key).head_object(Bucket="images", Key="family.txt")
    assert error_code(exc) == ("403", 403)   # HEAD: S3 errors have no body
    c3.put_object(Bucket="images", Key="family.txt", Body=b"the child's")
    c3.delete_object(Bucket="images", Key="big.bin")
    assert s3.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    assert s3.head_object(Bucket="images", Key="big.bin")["ContentLength"] == len(data)

    platform.cli("branches", "reset", "s3-child")
    assert c3.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    assert ep.credentials(child) == child_key   # a reset keeps the branch's key
    objects = platform.data_dir / "branches" / child / "services" / "storage"
    assert (objects / "images" / "index.sqlite").exists()
    platform.cli("branches", "delete", "s3-child")
    assert not objects.exists()
    platform.cli("functions", "delete", "sthree", "--branch", "s3-parent")
    # Dropping buckets from neon.ts removes the service and its objects.
    assert api.put(f"/branches/{parent}/services", json={"services": {}}).status_code == 200
    assert not (platform.data_dir / "branches" / parent / "services" / "storage").exists()
    with platform.gateway(ep.host(parent)) as gw:
        assert gw.get("/images/family.txt").status_code == 404
    platform.cli("branches", "delete", "s3-parent")


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node and npm")
def test_aws_sdk_for_javascript(endpoint: Endpoint, tmp_path: Path) -> None:
    """@aws-sdk/client-s3 with its default checksums (CRC32 headers, aws-chunked trailers
    for streams) and @aws-sdk/s3-request-presigner."""
    (tmp_path / "package.json").write_text('{"name": "s3-sdk-check", "private": true}')
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts",
                    "@aws-sdk/client-s3@3", "@aws-sdk/s3-request-presigner@3",
                    "@smithy/node-http-handler"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    shutil.copy(Path(__file__).parent / "storage_sdk.mjs", tmp_path / "check.mjs")
    key = endpoint.credentials(MAIN)
    assert key is not None
    proc = subprocess.run(
        ["node", "check.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "S3_ENDPOINT": f"http://{endpoint.host(MAIN)}",
             "AWS_ACCESS_KEY_ID": key[0], "AWS_SECRET_ACCESS_KEY": key[1]})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["range"] == "node" and out["metadata"] == {"lang": "js"}
    assert out["streamedLength"] == 200000
    assert out["keys"] == ["js/buffer.txt", "js/copy.txt", "js/stream.bin"]
    assert out["multipartETag"].endswith('-2"')
    assert (out["presignedPut"], out["presignedGet"], out["tampered"]) == \
        (200, "presigned from node", 403)
    s3 = endpoint.client(MAIN)
    assert s3.get_object(Bucket="images", Key="js/stream.bin")["Body"].read() == b"s" * 200000


def test_leftovers_of_a_killed_platform_are_swept(tmp_path: Path) -> None:
    async def config_of(branch_id: str) -> dict[str, Any] | None:
        return BUCKETS

    def open_branches() -> StorageBranches:
        return StorageBranches(SecretBox(b"k" * 32), lambda b: tmp_path / b, config_of, 1 << 20)

    async def scenario() -> None:
        first = open_branches()
        await first.provision(MAIN, BUCKETS)
        access = await first.storage(MAIN)
        assert access is not None
        bucket = access.store.buckets["images"]
        tmp = bucket.new_tmp()
        tmp.write_bytes(b"kept")
        async with access.store.lock:
            bucket.commit("kept", tmp, ObjectMeta(4, '"k"', "text/plain"))
        bucket.new_tmp().write_bytes(b"half received")
        (bucket.blobs / ("0" * 32)).write_bytes(b"renamed, never indexed")
        first.close()
        again = await open_branches().storage(MAIN)
        assert again is not None
        reopened = again.store.buckets["images"]
        assert list(reopened.tmp.iterdir()) == []
        meta = reopened.get("kept")
        assert meta is not None
        assert [p.name for p in reopened.blobs.iterdir()] == [meta.blob]
        assert again.access_key_id == access.access_key_id

    asyncio.run(scenario())


def test_a_local_forwarder_keeps_signatures_valid(endpoint: Endpoint) -> None:
    """What ``phloem dev`` gives local processes: a listener on 127.0.0.1 that forwards
    with Host rewritten; SigV4 made for the local URL verifies through it (PutObject,
    upload_fileobj, a presigned GET), and a signed host that is not loopback is not
    taken."""
    remote = f"http://{endpoint.host(MAIN)}"
    forwarders = ServiceForwarders({"storage": remote}, "127.0.0.1")
    with forwarders.in_thread() as local:
        env = forwarders.localize({"AWS_ENDPOINT_URL_S3": remote})
        assert env["AWS_ENDPOINT_URL_S3"] == local["storage"]
        key = endpoint.credentials(MAIN)
        assert key is not None
        s3 = boto3.client("s3", endpoint_url=local["storage"], region_name="us-east-1",
                          aws_access_key_id=key[0], aws_secret_access_key=key[1],
                          config=Config(signature_version="s3v4",
                                        s3={"addressing_style": "path"},
                                        retries={"max_attempts": 1}))
        s3.put_object(Bucket="images", Key="fwd.txt", Body=b"forwarded")
        s3.upload_fileobj(io.BytesIO(b"x" * 70_000), "images", "chunked.bin")
        assert s3.get_object(Bucket="images", Key="fwd.txt")["Body"].read() == b"forwarded"
        url = s3.generate_presigned_url("get_object", ExpiresIn=60,
                                        Params={"Bucket": "images", "Key": "chunked.bin"})
        got = httpx.get(url)
        assert got.content == b"x" * 70_000
        assert got.headers["connection"] == "close"  # each request its own upstream
        # The same signed request straight to the endpoint, claiming a non-loopback host.
        u = urlsplit(url)
        forged = httpx.get(urlunsplit(u._replace(netloc=f"127.0.0.1:{endpoint.port}")),
                           headers={"Host": endpoint.host(MAIN),
                                    "X-Phloem-Signed-Host": f"example.com:{u.port}"})
        assert forged.status_code == 403 and b"SignatureDoesNotMatch" in forged.content
        loop = httpx.get(urlunsplit(u._replace(netloc=f"127.0.0.1:{endpoint.port}")),
                         headers={"Host": endpoint.host(MAIN),
                                  "X-Phloem-Signed-Host": u.netloc})
        assert loop.status_code == 200
    assert rewrite_head(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:5\r\nConnection: keep-alive\r\n"
                        b"X-Phloem-Signed-Host: evil\r\n\r\n", "a.b:8") == (
        b"GET / HTTP/1.1\r\nHost: a.b:8\r\nX-Phloem-Signed-Host: 127.0.0.1:5\r\n"
        b"Connection: close\r\n\r\n")


def test_copy_at_the_consistency_point(endpoint: Endpoint) -> None:
    """Branch create copies objects inside ``frozen`` (around the database copy's
    pg_backup_stop): a write that comes while frozen waits and is not the child's."""
    child_id = "br-frozen-copy-dddddd"
    s3 = endpoint.client(MAIN)
    s3.put_object(Bucket="images", Key="before.txt", Body=b"before")
    frozen = endpoint.branches.frozen(MAIN, child_id)
    endpoint.run(frozen.__aenter__())
    done: list[str] = []
    writer = threading.Thread(target=lambda: done.append(
        s3.put_object(Bucket="images", Key="during.txt", Body=b"during")["ETag"]))
    try:
        writer.start()
        wait_for(lambda: any((endpoint.branches.root_of(MAIN) / "images" / "tmp").iterdir()),
                 30, "the write to reach the server and wait")
        assert not done
    finally:
        endpoint.run(frozen.__aexit__(None, None, None))
        writer.join(30)
    assert done
    endpoint.run(endpoint.branches.copy(MAIN, child_id))
    try:
        child = endpoint.client(child_id)
        assert child.get_object(Bucket="images", Key="before.txt")["Body"].read() == b"before"
        with pytest.raises(botocore.exceptions.ClientError):
            child.head_object(Bucket="images", Key="during.txt")
        assert s3.get_object(Bucket="images", Key="during.txt")["Body"].read() == b"during"
    finally:
        endpoint.run(endpoint.branches.delete(child_id))


def test_objects_cloned_ahead_are_brought_up_to_date(endpoint: Endpoint) -> None:
    """Branch create clones the objects ahead, unlocked, while the database copy runs
    (``copying``); writes go on meanwhile, and ``frozen`` adds what changed since under the
    lock: the child has the objects as of ``frozen``, no blob more."""
    child_id = "br-ahead-copy-eeeeee"
    s3 = endpoint.client(MAIN)
    for key, body in (("kept.txt", b"kept"), ("replaced.txt", b"old"),
                      ("deleted.txt", b"deleted")):
        s3.put_object(Bucket="images", Key=f"ahead/{key}", Body=body)
    parent_blobs = endpoint.branches.root_of(MAIN) / "images" / "blobs"
    child_blobs = endpoint.branches.root_of(child_id) / "images" / "blobs"
    copying = endpoint.branches.copying(MAIN, child_id)
    endpoint.run(copying.__aenter__())
    try:
        wait_for(lambda: child_blobs.exists() and len(list(child_blobs.iterdir())) ==
                 len(list(parent_blobs.iterdir())), 30, "the objects to be cloned ahead")
        s3.put_object(Bucket="images", Key="ahead/replaced.txt", Body=b"new")   # not held
        s3.delete_object(Bucket="images", Key="ahead/deleted.txt")
        s3.put_object(Bucket="images", Key="ahead/added.txt", Body=b"added")
        frozen = endpoint.branches.frozen(MAIN, child_id)
        endpoint.run(frozen.__aenter__())
        endpoint.run(frozen.__aexit__(None, None, None))
    finally:
        endpoint.run(copying.__aexit__(None, None, None))
    endpoint.run(endpoint.branches.copy(MAIN, child_id))
    try:
        child = endpoint.client(child_id)
        got = {o["Key"]: child.get_object(Bucket="images", Key=o["Key"])["Body"].read()
               for o in child.list_objects_v2(Bucket="images", Prefix="ahead/")["Contents"]}
        assert got == {"ahead/kept.txt": b"kept", "ahead/replaced.txt": b"new",
                       "ahead/added.txt": b"added"}
        listed = child.list_objects_v2(Bucket="images")["KeyCount"]
        assert len(list(child_blobs.iterdir())) == listed   # stale clones were removed
    finally:
        endpoint.run(endpoint.branches.delete(child_id))


def test_objects_cloned_ahead_go_when_the_create_fails(endpoint: Endpoint) -> None:
    child_id = "br-ahead-fail-ffffff"
    endpoint.client(MAIN).put_object(Bucket="images", Key="ahead-fail", Body=b"x")
    copying = endpoint.branches.copying(MAIN, child_id)
    endpoint.run(copying.__aenter__())
    failure = RuntimeError("the database copy failed")
    # False: the failure is not swallowed (the caller raises it on).
    assert endpoint.run(copying.__aexit__(RuntimeError, failure, None)) is False
    assert not endpoint.branches.root_of(child_id).exists()
