"""Who runs what.

As root, PostgreSQL runs as a dedicated system user and each function's isolates run as
their own uid (``isolate_uid_base + function number``, no passwd entry needed, like
systemd's DynamicUser), so an isolate can read neither cluster files, keys, credentials
nor other functions' artifacts. Builds run as one more such uid, just below the isolates'
(``Identity.build``, ``build_uid``). As any other user, everything runs as that user.

    ident = Identity.service("phloem")        # creates the system user when root
    subprocess.run(cmd, **ident.popen_kwargs())
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Isolate uids are ``[base, base + ISOLATE_UIDS)``; network rules confine that range.
ISOLATE_UIDS = 1 << 20
#: Isolate uids run to base + ISOLATE_UIDS - 1, builds use base - 1: all valid, unused
#: by regular accounts (below 65536), and never (uid_t)-1.
MIN_UID_BASE = 65_537
MAX_UID_BASE = 2**32 - 1 - ISOLATE_UIDS


class IdentityError(RuntimeError):
    pass


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int

    @staticmethod
    def current() -> Identity:
        return Identity(os.geteuid(), os.getegid())

    @staticmethod
    def service(name: str) -> Identity:
        """The system user ``name`` when running as root (created if missing), else the
        current user."""
        if os.geteuid() != 0:
            return Identity.current()
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            proc = subprocess.run(
                [useradd, "--system", "--user-group", "--no-create-home",
                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode not in (0, 9):  # 9: created meanwhile by someone else
                raise IdentityError(
                    f"service_user: could not create system user {name!r}: {proc.stderr.strip()}"
                ) from None
            entry = pwd.getpwnam(name)
        return Identity(entry.pw_uid, entry.pw_gid)

    @staticmethod
    def isolate(base: int, function_number: int) -> Identity:
        if os.geteuid() != 0:
            return Identity.current()
        uid = base + function_number
        return Identity(uid, uid)

    @staticmethod
    def build(base: int) -> Identity:
        """The uid and gid every build step runs as (dependency installs, bundling,
        unpacking): ``isolate_uid_base - 1`` when root, else the current user."""
        if os.geteuid() != 0:
            return Identity.current()
        uid = build_uid(base)
        return Identity(uid, uid)

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def popen_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for subprocess/asyncio process creation that drop to this
        identity (nothing when it is the current user)."""
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path: Path, mode: int) -> None:
        """Make ``path`` belong to this identity with ``mode``."""
        if not self.is_self or os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)


def build_uid(base: int) -> int:
    """The uid builds (dependency installs, bundling, import checks) run as: ``base - 1``,
    reserved next to the isolates' range so one network rule covers both."""
    return base - 1


def make_dir(path: Path, mode: int, owner: Identity | None = None) -> Path:
    """mkdir -p, then set mode (and owner) on the leaf exactly, whatever the umask."""
    path.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        owner.own(path, mode)
    else:
        os.chmod(path, mode)
    return path
