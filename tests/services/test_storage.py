"""Object storage per branch, with the real AWS SDK for Python against a real server.

The S3 app is served by uvicorn on a real socket; boto3 signs for the branch's storage
host name and connects to 127.0.0.1 (glibc does not resolve *.localhost), sending that
host name in the Host header.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.exceptions
import httpx
import pytest
import uvicorn
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from phloem.metadata.secrets import SecretBox
from phloem.services.storage.app import StorageApp
from phloem.services.storage.dispatch import dispatch
from phloem.services.storage.state import StorageBranches, parse_buckets
from phloem.system.xfs import xfs_available, xfs_reflink_mount
from phloem.testing import free_port, wait_for

DOMAIN = "fn.localhost"
BUCKETS = {"buckets": {"images": {}, "site": {"access": "public_read"}}}


@dataclass
class Endpoint:
    port: int
    branches: StorageBranches
    loop: asyncio.AbstractEventLoop

    def host(self, branch_id: str) -> str:
        return f"{branch_id}--storage.{DOMAIN}:{self.port}"

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def client(self, branch_id: str, key: tuple[str, str] | None = None,
               style: str = "path") -> Any:
        key = key or self.branches.credentials(branch_id)
        assert key is not None
        s3 = boto3.client(
            "s3", endpoint_url=f"http://{self.host(branch_id)}", region_name="us-east-1",
            aws_access_key_id=key[0], aws_secret_access_key=key[1],
            config=Config(signature_version="s3v4", s3={"addressing_style": style},
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
                                           host="127.0.0.1", port=port, log_level="warning"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),))
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the S3 server to listen")
        ep = Endpoint(port, branches, loop)
        for b in ("br-main", "br-other"):
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
    s3 = endpoint.client("br-main")
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["images", "site"]
    put = s3.put_object(Bucket="images", Key="docs/a.txt", Body=b"hello world",
                        ContentType="text/plain", Metadata={"owner": "ann"})
    assert put["ETag"] == '"' + hashlib.md5(b"hello world").hexdigest() + '"'
    got = s3.get_object(Bucket="images", Key="docs/a.txt", Range="bytes=6-")
    assert got["Body"].read() == b"world"
    assert got["ContentRange"] == "bytes 6-10/11"
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
    virtual = endpoint.client("br-main", style="virtual")
    assert virtual.get_object(Bucket="images", Key="readme")["Body"].read() == b"readme"


def test_multipart_upload(endpoint: Endpoint) -> None:
    s3 = endpoint.client("br-main")
    data = os.urandom(11 << 20)
    s3.upload_fileobj(io.BytesIO(data), "images", "big.bin",
                      Config=TransferConfig(multipart_threshold=5 << 20,
                                            multipart_chunksize=5 << 20, use_threads=False))
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
    s3 = endpoint.client("br-main")
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


def test_signatures_keys_and_public_buckets(endpoint: Endpoint) -> None:
    main_key = endpoint.branches.credentials("br-main")
    assert main_key is not None
    wrong = endpoint.client("br-main", key=(main_key[0], "x" * 40))
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        wrong.list_objects_v2(Bucket="images")
    assert error_code(exc) == ("SignatureDoesNotMatch", 403)
    # The main branch's key on the other branch's endpoint.
    foreign = endpoint.client("br-other", key=main_key)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        foreign.list_objects_v2(Bucket="images")
    assert error_code(exc) == ("InvalidAccessKeyId", 403)
    s3 = endpoint.client("br-main")
    s3.put_object(Bucket="site", Key="index.html", Body=b"<h1>hi</h1>")
    s3.put_object(Bucket="images", Key="secret", Body=b"no")
    base = f"http://{endpoint.host('br-main')}"
    assert endpoint.http(f"{base}/site/index.html").content == b"<h1>hi</h1>"
    r = endpoint.http(f"{base}/images/secret")
    assert (r.status_code, "<Code>AccessDenied</Code>" in r.text) == (403, True)
    r = endpoint.http(f"{base}/site/index.html", "PUT", content=b"defaced")
    assert r.status_code == 403
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.put_object(Bucket="undeclared", Key="k", Body=b"")
    assert error_code(exc) == ("NoSuchBucket", 404)


def test_quota(endpoint: Endpoint) -> None:
    s3 = endpoint.client("br-other")
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        s3.put_object(Bucket="images", Key="huge", Body=b"\0" * (65 << 20))
    assert error_code(exc) == ("QuotaExceeded", 507)
    assert s3.list_objects_v2(Bucket="images")["KeyCount"] == 0


def test_branch_copy_reset_delete(endpoint: Endpoint) -> None:
    parent = endpoint.client("br-main")
    parent.put_object(Bucket="images", Key="family.txt", Body=b"from the parent")
    endpoint.run(endpoint.branches.copy("br-main", "br-child"))
    child_key = endpoint.branches.credentials("br-child")
    assert child_key is not None and child_key != endpoint.branches.credentials("br-main")
    child = endpoint.client("br-child")
    assert child.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    child.put_object(Bucket="images", Key="family.txt", Body=b"the child's")
    child.put_object(Bucket="images", Key="only-child", Body=b"c")
    assert parent.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    endpoint.run(endpoint.branches.reset("br-child", "br-main"))
    assert child.get_object(Bucket="images", Key="family.txt")["Body"].read() == \
        b"from the parent"
    with pytest.raises(botocore.exceptions.ClientError):
        child.head_object(Bucket="images", Key="only-child")
    root = endpoint.branches.root_of("br-child")
    assert root.exists()
    endpoint.run(endpoint.branches.delete("br-child"))
    assert not root.exists()


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
            await branches.provision("br-p", BUCKETS)
            parent = await branches.storage("br-p")
            assert parent is not None
            bucket = parent.store.buckets["images"]
            tmp = bucket.new_tmp()
            tmp.write_bytes(os.urandom(4 << 20))
            from phloem.services.storage.objects import ObjectMeta
            async with parent.store.lock:
                bucket.commit("blob", tmp, ObjectMeta(4 << 20, '"x"', "binary/octet-stream"))
            await branches.copy("br-p", "br-c")
            child = await branches.storage("br-c")
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
