"""Every branch's storage as the service holds it: its buckets (from the service's config)
and its key pair, opened on first use, copied, reset and removed with the branch.

    branches = StorageBranches(box, root_of=lambda b: data / b / "storage",
                               config_of=load_config, quota_bytes=10 << 30)
    await branches.provision("br-a", {"buckets": {"images": {"access": "private"}}})
    access = await branches.storage("br-a")       # StorageApp's lookup
    await branches.copy("br-a", "br-b")           # branch create
    await branches.reset("br-b", "br-a")          # branch reset
    await branches.delete("br-b")

The key pair is made at provision and sealed (AES-GCM, phloem's secret key) into
``.credentials`` with the branch id as associated data, so it cannot be moved to another
branch; a child gets a new pair at copy, a reset keeps the branch's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from phloem.branches.clone import choose_backend
from phloem.metadata.secrets import SecretBox
from phloem.services.storage.app import BranchAccess
from phloem.services.storage.objects import (
    ACCESS_MODES,
    BranchStorage,
    copy_storage,
    remove_buckets,
)

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_ALPHABET = string.ascii_uppercase + string.digits


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
        #: Children whose objects :meth:`frozen` copied, for :meth:`copy` to keep.
        self._copied: set[str] = set()

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

    def _load(self, branch_id: str, buckets: dict[str, str],
              key: tuple[str, str]) -> BranchAccess:
        store = BranchStorage(self.root_of(branch_id), buckets, self.quota_bytes)
        store.copier = choose_backend(store.root, store.root / ".uploads")
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
        self._copied.discard(branch_id)
        async with self._opening:
            self._close(branch_id)
            shutil.rmtree(self.root_of(branch_id), ignore_errors=True)

    @contextlib.asynccontextmanager
    async def frozen(self, parent_id: str, child_id: str) -> AsyncIterator[None]:
        """The parent's writes wait while the block runs (the database copy's
        ``pg_backup_stop``); leaving it cleanly copies the objects as they were, which
        :meth:`copy` then keeps."""
        parent = await self.storage(parent_id)
        if parent is None:
            yield
            return
        async with parent.store.lock:
            yield
            await asyncio.to_thread(self._copy_files, parent.store, self.root_of(child_id))
            self._copied.add(child_id)

    async def copy(self, parent_id: str, child_id: str) -> None:
        """Branch create: the child gets the parent's objects (cloned, unless
        :meth:`frozen` did) and a key of its own."""
        parent = await self.storage(parent_id)
        if parent is None:
            return
        root = self.root_of(child_id)
        if child_id in self._copied:
            self._copied.discard(child_id)
        else:
            async with parent.store.lock:
                await asyncio.to_thread(self._copy_files, parent.store, root)
        key = self._write_key(child_id, root)
        buckets = {n: b.access for n, b in parent.store.buckets.items()}
        async with self._opening:
            self._load(child_id, buckets, key)

    def _copy_files(self, src: BranchStorage, dst_root: Path) -> None:
        dst_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        copy_storage(src, dst_root, choose_backend(src.root, dst_root / ".uploads"))
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
        async with self._opening:
            self._load(branch_id, buckets, key)

    def close(self) -> None:
        for branch_id in list(self._open):
            self._close(branch_id)

