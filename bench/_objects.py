"""Branch create with and without objects: the part of ``bench/branch_create.py`` that
issue 15 asks for (target: a parent with 1 GB of objects in a bucket creates a branch in
<= 1.2x the time of the same parent without them).

Two parents are made from ``main`` (same database): ``objs`` with object storage on and
``--objects-gb`` of objects in one bucket (4 MiB objects of random bytes, put through the
gateway with boto3), ``plain`` without storage. Then, ``runs`` times, a child of each is
created (``POST /branches``, timed to the response: the child is ready then, its objects
copied) and deleted, the order alternating (plain-objs, objs-plain, ...) so drift hits
both sides alike. Every create is printed, then the medians and their ratio.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config

from phloem.testing import PlatformProcess

OBJECT_BYTES = 4 << 20
BUCKET = "bench"


def _log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


@dataclass
class ObjectsResult:
    kind: str
    fstype: str
    objects_gb: float
    objects: int = 0
    load_s: float = 0.0
    #: (which parent, seconds, copy_method) per create, in the order they ran.
    creates: list[tuple[str, float, str]] = field(default_factory=list)

    def median(self, which: str) -> float:
        return statistics.median(s for w, s, _ in self.creates if w == which)

    def ratio(self) -> float:
        return self.median("objs") / self.median("plain")


def _s3(p: PlatformProcess, endpoint: str, key: dict[str, str]) -> Any:
    """boto3 sending to the gateway on 127.0.0.1 with the service's Host (the name
    resolves only inside sandboxes)."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=key["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=key["AWS_SECRET_ACCESS_KEY"],
                      config=Config(s3={"addressing_style": "path"},
                                    retries={"max_attempts": 2}))
    port = p.gateway_port

    def to_loopback(request: Any, **_: Any) -> None:
        url = urlsplit(request.url)
        request.headers["Host"] = url.netloc
        request.url = urlunsplit(url._replace(netloc=f"127.0.0.1:{port}"))

    s3.meta.events.register("before-send.s3", to_loopback)
    return s3


def _create(api: Any, parent: str, name: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    resp = api.post("/branches", json={"name": name, "parent": parent})
    elapsed = time.perf_counter() - t0
    if resp.status_code != 201:
        raise RuntimeError(f"POST /branches: {resp.status_code} {resp.text}")
    body = resp.json()
    gone = api.delete(f"/branches/{body['id']}")
    if gone.status_code != 200:
        raise RuntimeError(f"DELETE /branches/{body['id']}: {gone.status_code} {gone.text}")
    return elapsed, str(body["copy_method"])


def measure_objects(p: PlatformProcess, kind: str, fstype: str, objects_gb: float,
                    runs: int) -> ObjectsResult:
    result = ObjectsResult(kind, fstype, objects_gb)
    with p.api() as api:
        ids = {}
        for which in ("plain", "objs"):
            r = api.post("/branches", json={"name": f"bench-{which}", "parent": "main"})
            if r.status_code != 201:
                raise RuntimeError(f"POST /branches: {r.status_code} {r.text}")
            ids[which] = r.json()["id"]
        r = api.put(f"/branches/{ids['objs']}/services",
                    json={"services": {"storage": {"buckets": {BUCKET: {}}}}})
        if r.status_code != 200:
            raise RuntimeError(f"PUT services: {r.status_code} {r.text}")
        endpoint = r.json()["urls"]["storage"]
        env = api.get(f"/branches/{ids['objs']}/services/env").json()["env"]
        s3 = _s3(p, endpoint, env)
        result.objects = max(1, round(objects_gb * (1 << 30) / OBJECT_BYTES))
        started = time.perf_counter()
        for i in range(result.objects):
            s3.put_object(Bucket=BUCKET, Key=f"obj/{i:05d}",
                          Body=io.BytesIO(os.urandom(OBJECT_BYTES)))
        os.sync()
        result.load_s = time.perf_counter() - started
        _log(f"{kind}: {result.objects} objects of {OBJECT_BYTES >> 20} MiB in "
             f"{result.load_s:.0f} s")
        for run in range(runs):
            order = ("plain", "objs") if run % 2 == 0 else ("objs", "plain")
            for which in order:
                seconds, method = _create(api, f"bench-{which}", f"bench-{which}-{run}")
                result.creates.append((which, seconds, method))
                _log(f"{kind}: run {run + 1} {which}: {seconds * 1000:.0f} ms ({method})")
        for which in ("objs", "plain"):
            api.delete(f"/branches/{ids[which]}")
    return result


def report_objects(results: list[ObjectsResult]) -> None:
    print("\n## Branch create: parent with objects in a bucket vs without (target <= 1.2x)")
    for r in results:
        print(f"\n{r.kind} ({r.fstype}): {r.objects} objects, {r.objects_gb:g} GB, loaded "
              f"in {r.load_s:.0f} s")
        for i, (which, seconds, method) in enumerate(r.creates):
            print(f"  create {i + 1:2d}  {which:<5}  {seconds * 1000:8.0f} ms  {method}")
        verdict = "ok" if r.ratio() <= 1.2 else "OVER TARGET"
        print(f"  median without objects {r.median('plain') * 1000:.0f} ms, with "
              f"{r.median('objs') * 1000:.0f} ms: ratio {r.ratio():.2f}x ({verdict})")
