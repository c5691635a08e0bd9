"""``/projects/{id}/branches/{id}/endpoints``: each branch's one read-write compute.

The Neon CLI builds connection strings itself: the endpoint's ``host`` for a direct one,
and for ``--pooled`` the same host with the endpoint id replaced by ``<id>-pooler``, on
the same port. On Neon a proxy tells the two apart by name; a phloem branch has its
PostgreSQL and its PgBouncer on two loopback ports, and no name resolves to either
without DNS. So the host given is a Unix-socket directory, percent-encoded as libpq
reads it in a URI, ``<data dir>/run/neon/<endpoint id>``, beside a twin
``<endpoint id>-pooler``; each holds one link, ``.s.PGSQL.<branch port>``, to the
postmaster's or PgBouncer's socket. libpq, psql and every driver on libpq follow it.
When the path would be too long for a socket (108 bytes) the host is the TCP
``127.0.0.1:<port>`` and ``--pooled`` gives the direct server.

    host = endpoint_host(platform, branch)   # '%2Fvar%2Flib%2Fphloem%2Frun%2Fneon%2Fep-...:5433'
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from pydantic import BaseModel

from phloem.branches.manager import BRANCH_HOST
from phloem.control.neon_v2.errors import NeonError, NeonRoute
from phloem.control.neon_v2.project import REGION, is_default, iso, project_of
from phloem.control.scopes import needs

if TYPE_CHECKING:
    from phloem.control.services import ApiServices
    from phloem.metadata.store import BranchRow

router = APIRouter(route_class=NeonRoute)

#: sun_path is 108 bytes with its NUL.
UNIX_PATH_MAX = 107


def endpoint_id(branch_id: str) -> str:
    """``br-quiet-moon-3f9a2c`` -> ``ep-quiet-moon-3f9a2c``."""
    return "ep-" + branch_id.removeprefix("br-")


def socket_root(platform: ApiServices) -> Path:
    return platform.paths.run / "neon"


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target``, replacing what is there in one rename."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(f".tmp-{os.getpid()}-{link.name}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def endpoint_host(platform: ApiServices, branch: BranchRow) -> str:
    """The endpoint's ``host`` (see the module doc), its socket links made if missing."""
    ep = endpoint_id(branch.id)
    root = socket_root(platform)
    direct_dir, pooled_dir = root / ep, root / f"{ep}-pooler"
    name = f".s.PGSQL.{branch.port}"
    if len(str(pooled_dir / name).encode()) > UNIX_PATH_MAX:
        return f"{BRANCH_HOST}:{branch.port}"
    direct_socket = platform.paths.pg_socket_dir(branch.id) / name
    pooler = platform.branches.pooler(branch)
    pooled_socket = pooler.unix_socket if pooler is not None else direct_socket
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    for folder, target in ((direct_dir, direct_socket), (pooled_dir, pooled_socket)):
        folder.mkdir(mode=0o711, exist_ok=True)
        _link(folder / name, target)
    return f"{quote(str(direct_dir), safe='')}:{branch.port}"


def remove_socket_dirs(platform: ApiServices, branch_id: str) -> None:
    """Remove a deleted branch's directories."""
    ep = endpoint_id(branch_id)
    for name in (ep, f"{ep}-pooler"):
        shutil.rmtree(socket_root(platform) / name, ignore_errors=True)


def prune_socket_dirs(platform: ApiServices, live_branch_ids: set[str]) -> None:
    """Remove the directories of branches that no longer exist (deleted through
    ``/api/v1`` or while the platform was down)."""
    root = socket_root(platform)
    if not root.is_dir():
        return
    live = {endpoint_id(b) for b in live_branch_ids}
    for entry in root.iterdir():
        if entry.name.removesuffix("-pooler") not in live:
            shutil.rmtree(entry, ignore_errors=True)


class Endpoint(BaseModel):
    host: str
    id: str
    project_id: str
    branch_id: str
    #: Neon's smallest size, which its config schema accepts; a branch's PostgreSQL here
    #: is not sized in compute units.
    autoscaling_limit_min_cu: float = 0.25
    autoscaling_limit_max_cu: float = 0.25
    region_id: str = REGION
    type: str = "read_write"
    current_state: str
    settings: dict[str, Any] = {}
    pooler_enabled: bool
    pooler_mode: str = "transaction"
    disabled: bool = False
    passwordless_access: bool = False
    creation_source: str = "phloem"
    created_at: str
    updated_at: str
    proxy_host: str
    suspend_timeout_seconds: int = 0
    provisioner: str = "phloem"


class EndpointsOut(BaseModel):
    endpoints: list[Endpoint]


def endpoint_model(platform: ApiServices, project_id: str, branch: BranchRow) -> Endpoint:
    created = iso(branch.created_at) or ""
    return Endpoint(
        host=endpoint_host(platform, branch), id=endpoint_id(branch.id),
        project_id=project_id, branch_id=branch.id,
        current_state="active" if branch.state == "ready" else "init",
        pooler_enabled=branch.pooler_port is not None, created_at=created,
        updated_at=iso(branch.updated_at) or created, proxy_host=BRANCH_HOST)


@router.get("/api/v2/projects/{project_id}/branches/{branch_id}/endpoints",
            openapi_extra=needs("read"))
async def list_branch_endpoints(request: Request, project_id: str,
                                branch_id: str) -> EndpointsOut:
    platform, project = await project_of(request, project_id)
    branch = await platform.branches.get(branch_id.replace("%2F", "/"))
    prune_socket_dirs(platform, {b.id for b in await platform.store.list_branches()})
    return EndpointsOut(endpoints=[endpoint_model(platform, project.id, branch)])


@router.get("/api/v2/projects/{project_id}/endpoints", openapi_extra=needs("read"))
async def list_endpoints(request: Request, project_id: str) -> EndpointsOut:
    platform, project = await project_of(request, project_id)
    branches = await platform.store.list_branches()
    prune_socket_dirs(platform, {b.id for b in branches})
    return EndpointsOut(endpoints=[endpoint_model(platform, project.id, b)
                                   for b in branches])


class ConnectionUriOut(BaseModel):
    uri: str


@router.get("/api/v2/projects/{project_id}/connection_uri", openapi_extra=needs("deploy"))
async def connection_uri(request: Request, project_id: str, database_name: str,
                         role_name: str, branch_id: str | None = None,
                         endpoint_id: str | None = None,
                         pooled: bool = False) -> ConnectionUriOut:
    """What ``neon env pull`` writes as ``DATABASE_URL`` (pooled) and
    ``DATABASE_URL_UNPOOLED``: phloem's own TCP URLs, as ``phloem env pull`` gives."""
    platform, project = await project_of(request, project_id)
    if branch_id is not None:
        branch = await platform.branches.get(branch_id.replace("%2F", "/"))
    elif endpoint_id is not None:
        branch = await platform.branches.get("br-" + endpoint_id.removeprefix("ep-"))
    else:
        rows = await platform.store.list_branches()
        branch = next(b for b in rows if is_default(project, b))
    if database_name != branch.database or role_name != branch.role:
        raise NeonError(404, "NOT_FOUND", f"branch {branch.id!r} has database "
                        f"{branch.database!r} owned by role {branch.role!r} only (asked "
                        f"for {database_name!r} as {role_name!r})")
    urls = platform.branches.connection_strings(branch)
    return ConnectionUriOut(uri=urls.pooled if pooled else urls.unpooled)
