"""Branch create with and without objects: the part of ``bench/branch_create.py`` that
issue 15 asks for (target: a parent with 1 GB of objects in a bucket creates a branch in
<= 1.2x the time of the same parent without them).

Two parents are made from ``main`` (same database): ``objs`` with object storage on and
``--objects-gb`` of objects in one bucket (4 MiB objects of random bytes, put through the
gateway with boto3), ``plain`` without storage. Then, ``runs`` times, a child of each is
created (``POST /branches``, timed to the response: the child is ready then, its objects
copied) and deleted, the order alternating (plain-objs, objs-plain, ...) so drift hits
both sides alike. Every create is printed (with the 1-min load average before it), then
the medians and their ratio, and where the time went: the create's phases from the
PostgreSQL and PgBouncer logs (``branch_create.phases``; "copy" is the API's ``copy_ms``,
the database copy with the objects' part of it), plain against objs, and what the object
copy costs alone (outside the platform, on the same filesystem, nothing else running): the
reflink probe, SQLite's backup of the index, the blobs cloned as ``copy_storage`` does, and
``cp -a --reflink=auto`` of the bucket for comparison.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config

from phloem.branches.clone import choose_backend
from phloem.services.storage.objects import COPY_THREADS
from phloem.testing import PlatformProcess

OBJECT_BYTES = 4 << 20
BUCKET = "bench"


def _log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


class Timed(Protocol):
    """One create as ``branch_create.create_branch`` measures it."""

    seconds: float
    copy_method: str
    copy_ms: float
    phases: dict[str, float] | None


#: (parent name, child name) -> the create, timed; the child is deleted after.
TimedCreate = Callable[[Any, str, str], Timed]


@dataclass
class Run:
    which: str
    load: float      # 1-min load average just before the create
    create: Timed


@dataclass
class ObjectsResult:
    kind: str
    fstype: str
    objects_gb: float
    objects: int = 0
    load_s: float = 0.0
    #: Every create, in the order they ran.
    creates: list[Run] = field(default_factory=list)
    #: What the object copy costs alone, per step: seconds of each try.
    alone: dict[str, list[float]] = field(default_factory=dict)

    def median(self, which: str) -> float:
        return statistics.median(r.create.seconds for r in self.creates if r.which == which)

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


def _backup(src_path: Path, dst_path: Path) -> None:
    src, target = sqlite3.connect(src_path), sqlite3.connect(dst_path)
    try:
        src.backup(target)
    finally:
        src.close()
        target.close()


def _copy_once(bucket: Path, dst: Path, blobs: list[Path],
               steps: dict[str, list[float]]) -> None:
    def timed(step: str, fn: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        fn()
        steps.setdefault(step, []).append(time.perf_counter() - t0)

    (dst / "blobs").mkdir(parents=True)
    copier = choose_backend(bucket, dst)
    timed("reflink probe (choose_backend)", lambda: choose_backend(bucket, dst))
    timed("index: SQLite backup",
          lambda: _backup(bucket / "index.sqlite", dst / "index.sqlite"))

    def clone() -> None:
        with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
            list(pool.map(lambda b: copier.copy_file(b, dst / "blobs" / b.name), blobs))

    timed(f"{len(blobs)} blobs cloned, {COPY_THREADS} threads ({copier.method})", clone)
    timed("cp -a --reflink=auto of the bucket", lambda: subprocess.run(
        ["cp", "-a", "--reflink=auto", str(bucket), str(dst / "cp")], check=True))


def copy_alone(bucket: Path, scratch: Path, tries: int = 3) -> dict[str, list[float]]:
    """Seconds of each step of a bucket's copy, run here rather than in the platform."""
    steps: dict[str, list[float]] = {}
    blobs = sorted((bucket / "blobs").iterdir())
    for i in range(tries):
        dst = scratch / f"objects-{i}"
        _copy_once(bucket, dst, blobs, steps)
        shutil.rmtree(dst)
        os.sync()
    return steps


def measure_objects(p: PlatformProcess, kind: str, fstype: str, objects_gb: float,
                    runs: int, timed_create: TimedCreate, scratch: Path) -> ObjectsResult:
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
        scratch.mkdir(exist_ok=True)
        bucket = p.data_dir / "branches" / ids["objs"] / "services" / "storage" / BUCKET
        result.alone = copy_alone(bucket, scratch)
        for run in range(runs):
            order = ("plain", "objs") if run % 2 == 0 else ("objs", "plain")
            for which in order:
                load = os.getloadavg()[0]
                c = timed_create(api, f"bench-{which}", f"bench-{which}-{run}")
                result.creates.append(Run(which, load, c))
                _log(f"{kind}: run {run + 1} {which}: {c.seconds * 1000:.0f} ms "
                     f"({c.copy_method}, copy {c.copy_ms:.0f} ms; load {load:.2f})")
        for which in ("objs", "plain"):
            api.delete(f"/branches/{ids[which]}")
    return result


def _ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:8.0f} ms" if values else "       ? ms"


def report_objects(results: list[ObjectsResult], phase_names: Sequence[str]) -> None:
    print("\n## Branch create: parent with objects in a bucket vs without (target <= 1.2x)")
    for r in results:
        print(f"\n{r.kind} ({r.fstype}): {r.objects} objects, {r.objects_gb:g} GB, loaded "
              f"in {r.load_s:.0f} s")
        for i, run in enumerate(r.creates):
            c = run.create
            print(f"  create {i + 1:2d}  {run.which:<5}  {c.seconds * 1000:8.0f} ms  "
                  f"copy_ms {c.copy_ms:6.0f}  {c.copy_method}  (load {run.load:.2f})")
        print("  where the time went (medians; from the PG/PgBouncer logs, copy = API "
              "copy_ms):")
        print(f"    {'phase':<26} {'plain':>11} {'objs':>11} {'objs-plain':>11}")
        for name in phase_names:
            got = {w: [x.create.phases[name] for x in r.creates
                       if x.which == w and x.create.phases is not None]
                   for w in ("plain", "objs")}
            delta = (statistics.median(got["objs"]) - statistics.median(got["plain"])
                     if got["objs"] and got["plain"] else float("nan"))
            print(f"    {name:<26} {_ms(got['plain'])} {_ms(got['objs'])} "
                  f"{delta * 1000:8.0f} ms")
        print("  the object copy alone (outside the platform; median of "
              f"{max((len(v) for v in r.alone.values()), default=0)}):")
        for step, values in r.alone.items():
            print(f"    {step:<48} {_ms(values)}")
        pairs = [r.creates[i:i + 2] for i in range(0, len(r.creates) - 1, 2)]
        per_run = [next(x.create.seconds for x in pair if x.which == "objs")
                   / next(x.create.seconds for x in pair if x.which == "plain")
                   for pair in pairs]
        if per_run:   # each run's two creates are back to back: the same load
            print(f"  per run objs/plain: {' '.join(f'{x:.2f}' for x in per_run)}; median "
                  f"{statistics.median(per_run):.2f}x")
        verdict = "ok" if r.ratio() <= 1.2 else "OVER TARGET"
        print(f"  median without objects {r.median('plain') * 1000:.0f} ms, with "
              f"{r.median('objs') * 1000:.0f} ms: ratio {r.ratio():.2f}x ({verdict})")
