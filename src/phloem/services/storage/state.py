"""Every branch's storage as the service holds it: its buckets (from the service's config)
and its key pair, opened on first use, copied, reset and removed with the branch.

    branches = StorageBranches(box, root_of=lambda b: data / b / "storage",
                               config_of=load_config, quota_bytes=10 << 30)
    await branches.provision("br-a", {"buckets": {"images": {"access": "private"}}})
    access = await branches.storage("br-a")       # StorageApp's lookup
    async with branches.copying("br-a", "br-b"):  # branch create: around the database
        async with branches.frozen("br-a", "br-b"):   # copy, and its pg_backup_stop
            ...
    await branches.copy("br-a", "br-b")           # the child's key; opens it
    await branches.reset("br-b", "br-a")          # branch reset
    await branches.delete("br-b")

The key pair is made at provision and sealed (AES-GCM, phloem's secret key) into
``.credentials`` with the branch id as associated data, so it cannot be moved to another
branch; a child gets a new pair at copy, a reset keeps the branch's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import string
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phloem.branches.clone import Copier, choose_backend
from phloem.metadata.secrets import SecretBox
from phloem.services.storage.app import BranchAccess
from phloem.services.storage.objects import (
    ACCESS_MODES,
    BranchStorage,
    Cloned,
    copy_storage,
    preclone_storage,
    remove_buckets,
    sync_storage,
)

log = logging.getLogger("phloem.services.storage")

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_ALPHABET = string.ascii_uppercase + string.digits


def _copier_for(src: BranchStorage, dst_root: Path) -> Copier:
    """The parent's probed copier when ``dst_root`` is on its filesystem (it always is
    under one data dir): a probe is a few journalled metadata writes; else a new probe."""
    if src.copier is not None and os.stat(src.root).st_dev == os.stat(dst_root).st_dev:
        return src.copier
    return choose_backend(src.root, dst_root / ".uploads")


async def _settled(task: asyncio.Future[Any] | None) -> None:
    """Wait for a background step of a copy being abandoned; its error no longer matters."""
    if task is not None:
        with contextlib.suppress(Exception):
            await task


@dataclass
class _Preclone:
    """A child's objects being cloned ahead by :meth:`StorageBranches.copying`."""

    stop: threading.Event
    task: asyncio.Future[Cloned] | None = None


def parse_buckets(config: dict[str, Any]) -> dict[str, str]:
    """``{"buckets": {name: {"access": ...}}}`` -> name -> access mode; ValueError naming
    the field and the rule otherwise."""
    buckets = config.get("buckets", {})
    unknown = set(config) - {"buckets"}
    if unknown:
        raise ValueError(f"storage: unknown setting {sorted(unknown)[0]!r} (only 'buckets')")
    if not isinstance(buckets, dict):
        raise ValueError("preview.buckets: must be an object of bucket name -> options")
    out = {}
    for name, options in buckets.items():
        field = f"preview.buckets.{name}"
        if not isinstance(name, str) or not _BUCKET_NAME.match(name) or ".." in name:
            raise ValueError(f"{field}: a bucket name is 3-63 characters of a-z, 0-9, '.' "
                             "and '-', starting and ending with a letter or digit")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f"{field}: must be an object ({{}} or {{access: ...}})")
        extra = set(options) - {"access"}
        if extra:
            raise ValueError(f"{field}.{sorted(extra)[0]}: unknown option (only 'access')")
        access = options.get("access", "private")
        if access not in ACCESS_MODES:
            raise ValueError(f"{field}.access: must be one of {', '.join(ACCESS_MODES)}, "
                             f"got {access!r}")
        out[name] = access
    return out


def new_key_pair() -> tuple[str, str]:
    """An access key id shaped like AWS's (20 upper-case characters) and a 40-character
    secret."""
    key_id = "PHL" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(17))
    return key_id, secrets.token_urlsafe(30)


class StorageBranches:
    def __init__(self, box: SecretBox, root_of: Callable[[str], Path],
                 config_of: Callable[[str], Awaitable[dict[str, Any] | None]],
                 quota_bytes: int) -> None:
        self._box, self.root_of, self._config_of = box, root_of, config_of
        self.quota_bytes = quota_bytes
        self._open: dict[str, BranchAccess] = {}
        self._opening = asyncio.Lock()
        #: Children whose objects :meth:`frozen` copied, for :meth:`copy` to keep: the
        #: copy being made durable meanwhile (off the create's critical path).
        self._copied: dict[str, asyncio.Future[None]] = {}
        #: Children whose objects :meth:`copying` is cloning ahead of :meth:`frozen`.
        self._precloning: dict[str, _Preclone] = {}

    def _context(self, branch_id: str) -> str:
        return f"branch:{branch_id}:storage_key"

    def _write_key(self, branch_id: str, root: Path) -> tuple[str, str]:
        key_id, secret = new_key_pair()
        sealed = self._box.seal({"access_key_id": key_id, "secret_access_key": secret},
                                context=self._context(branch_id))
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = root / ".credentials.tmp"
        tmp.write_text(sealed)
        tmp.chmod(0o600)
        tmp.rename(root / ".credentials")
        return key_id, secret

    def _read_key(self, branch_id: str, root: Path) -> tuple[str, str] | None:
        path = root / ".credentials"
        if not path.exists():
            return None
        pair = self._box.open(path.read_text(), context=self._context(branch_id))
        return pair["access_key_id"], pair["secret_access_key"]

    def _load(self, branch_id: str, buckets: dict[str, str], key: tuple[str, str],
              copier: Copier | None = None) -> BranchAccess:
        """``copier``: one probed on the same filesystem (the parent's), else probed here."""
        store = BranchStorage(self.root_of(branch_id), buckets, self.quota_bytes)
        store.copier = copier or choose_backend(store.root, store.root / ".uploads")
        access = BranchAccess(branch_id, store, key[0], key[1])
        self._open[branch_id] = access
        return access

    async def storage(self, branch_id: str) -> BranchAccess | None:
        access = self._open.get(branch_id)
        if access is not None:
            return access
        async with self._opening:
            if branch_id in self._open:
                return self._open[branch_id]
            config = await self._config_of(branch_id)
            if config is None:
                return None
            root = self.root_of(branch_id)
            key = self._read_key(branch_id, root)
            if key is None:
                return None   # not provisioned (yet)
            return self._load(branch_id, parse_buckets(config), key)

    def credentials(self, branch_id: str) -> tuple[str, str] | None:
        """(access key id, secret) of a provisioned branch."""
        return self._read_key(branch_id, self.root_of(branch_id))

    async def provision(self, branch_id: str, config: dict[str, Any]) -> None:
        buckets = parse_buckets(config)
        async with self._opening:
            access = self._open.get(branch_id)
            if access is not None:
                access.store.configure(buckets)
                return
            root = self.root_of(branch_id)
            key = self._read_key(branch_id, root) or self._write_key(branch_id, root)
            self._load(branch_id, buckets, key)

    def _close(self, branch_id: str) -> None:
        access = self._open.pop(branch_id, None)
        if access is not None:
            access.store.close()

    async def delete(self, branch_id: str) -> None:
        """Remove the branch's objects, uploads and key (unprovision, branch delete)."""
        await _settled(self._copied.pop(branch_id, None))
        async with self._opening:
            self._close(branch_id)
            shutil.rmtree(self.root_of(branch_id), ignore_errors=True)

    @contextlib.asynccontextmanager
    async def copying(self, parent_id: str, child_id: str) -> AsyncIterator[None]:
        """Around the whole database copy of a branch create: the parent's objects are
        cloned into the child meanwhile, without its lock (its writes go on), so that
        :meth:`frozen` has only the objects written since to add. Leaving stops that
        and waits for it; unless :meth:`frozen` copied (the create failed), what it
        cloned is removed."""
        parent = await self.storage(parent_id)
        if parent is None:
            yield
            return
        store = parent.store
        work = _Preclone(threading.Event())
        buckets = [(name, b.path) for name, b in store.buckets.items()]
        root = self.root_of(child_id)
        work.task = asyncio.ensure_future(asyncio.to_thread(
            self._preclone, store, buckets, root, work.stop))
        self._precloning[child_id] = work
        try:
            yield
        except BaseException:
            await _settled(self._copied.pop(child_id, None))
            raise
        finally:
            self._precloning.pop(child_id, None)
            work.stop.set()
            await _settled(work.task)
            if child_id not in self._copied:
                await asyncio.to_thread(shutil.rmtree, root, True)

    def _preclone(self, store: BranchStorage, buckets: list[tuple[str, Path]], root: Path,
                  stop: threading.Event) -> Cloned:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return preclone_storage(buckets, root, _copier_for(store, root), stop)

    @contextlib.asynccontextmanager
    async def frozen(self, parent_id: str, child_id: str) -> AsyncIterator[None]:
        """Around the database copy's ``pg_backup_stop``: entering holds the parent's
        writes and copies its objects as they are (adding to what :meth:`copying` cloned
        ahead, if it did), which :meth:`copy` then keeps; leaving lets the writes go.
        So the child's objects are the parent's as of ``pg_backup_stop``."""
        parent = await self.storage(parent_id)
        if parent is None:
            yield
            return
        root = self.root_of(child_id)
        work = self._precloning.get(child_id)
        cloned: Cloned | None = None
        if work is not None and work.task is not None:
            try:
                cloned = await work.task   # still unlocked: writes go on meanwhile
            except Exception as exc:   # the copy under the lock below does it all
                log.warning("storage: cloning %s's objects ahead failed (%s); copying "
                            "them with its writes held", parent_id, exc)
                await asyncio.to_thread(remove_buckets, root)
        async with parent.store.lock:
            started = time.monotonic()
            await asyncio.to_thread(self._copy_files, parent.store, root, cloned)
            self._copied[child_id] = asyncio.ensure_future(
                asyncio.to_thread(sync_storage, root))
            log.info("storage: %s's objects copied to %s, %s, in %.0f ms with its writes "
                     "held", parent_id, child_id,
                     "after a clone ahead" if cloned is not None else "all",
                     (time.monotonic() - started) * 1000)
            try:
                yield
            except BaseException:   # pg_backup_stop failed: the create is undone
                await _settled(self._copied.pop(child_id, None))
                raise

    async def copy(self, parent_id: str, child_id: str) -> None:
        """Branch create: the child gets the parent's objects (cloned, unless
        :meth:`frozen` did) and a key of its own."""
        parent = await self.storage(parent_id)
        if parent is None:
            return
        root = self.root_of(child_id)
        synced = self._copied.pop(child_id, None)
        if synced is not None:
            await synced
        else:
            async with parent.store.lock:
                await asyncio.to_thread(self._copy_files, parent.store, root)
            await asyncio.to_thread(sync_storage, root)
        key = self._write_key(child_id, root)
        buckets = {n: b.access for n, b in parent.store.buckets.items()}
        copier = _copier_for(parent.store, root)
        async with self._opening:
            self._load(child_id, buckets, key, copier)

    def _copy_files(self, src: BranchStorage, dst_root: Path,
                    cloned: Cloned | None = None) -> None:
        dst_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        copy_storage(src, dst_root, _copier_for(src, dst_root), cloned)
        (dst_root / ".uploads").mkdir(mode=0o700, exist_ok=True)

    async def reset(self, branch_id: str, parent_id: str) -> None:
        """Branch reset: the branch's objects become the parent's again; its key stays."""
        access = await self.storage(branch_id)
        parent = await self.storage(parent_id)
        if access is None:
            return
        buckets = {n: b.access for n, b in access.store.buckets.items()}
        key = (access.access_key_id, access.secret)
        root = access.store.root
        async with access.store.lock:
            async with self._opening:
                self._close(branch_id)
            remove_buckets(root)
            if parent is not None:
                async with parent.store.lock:
                    await asyncio.to_thread(self._copy_files, parent.store, root)
                await asyncio.to_thread(sync_storage, root)
        async with self._opening:
            self._load(branch_id, buckets, key)

    def close(self) -> None:
        for branch_id in list(self._open):
            self._close(branch_id)

