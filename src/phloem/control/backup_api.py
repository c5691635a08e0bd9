"""``/api/v1/backups``: take a backup of the running platform and list backups.

``POST`` starts one (202; it runs in the background, one at a time) and answers with its
id; ``GET /api/v1/backups/{id}`` shows its progress lines until ``state`` is ``complete``
or ``failed``. Backups are written to ``<data dir>/backups/<id>/`` (root's, 0700: they
hold the platform's secrets); restoring one is offline (``phloem backup restore``).

    app.include_router(router)      # in create_api
"""

from __future__ import annotations

from typing import Annotated, NoReturn

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from phloem.backup.jobs import BackupInfo, BackupJobs
from phloem.backup.manifest import BackupError
from phloem.control.errors import ApiError
from phloem.control.scopes import ADMIN


class BackupBranchOut(BaseModel):
    id: str
    name: str
    parent_id: str | None
    bytes: int
    ms: float
    method: str = Field(description="reflink or copy")


class BackupOut(BaseModel):
    id: str
    state: str = Field(description="running, complete, failed or incomplete (interrupted "
                       "by a crash; safe to delete)")
    path: str
    created_at: str | None
    finished_at: str | None = None
    size_bytes: int | None = None
    duration_ms: float | None = None
    method: str | None = Field(default=None, description="reflink, copy or mixed")
    branches: list[BackupBranchOut] = Field(default_factory=list)
    deployments: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    progress: list[str] = Field(default_factory=list, description="lines so far (this "
                                "run of the platform only)")
    error: str | None = None


def _fail(exc: BackupError) -> NoReturn:
    raise ApiError(exc.status, exc.code, exc.message, exc.field) from exc


def _jobs(request: Request) -> BackupJobs:
    state = request.app.state
    jobs: BackupJobs | None = getattr(state, "backup_jobs", None)
    if jobs is None:
        jobs = state.backup_jobs = BackupJobs(state.services)
    return jobs


def _out(info: BackupInfo) -> BackupOut:
    m = info.manifest
    out = BackupOut(id=info.id, state=info.state, path=info.path,
                    created_at=info.created_at, progress=info.progress, error=info.error)
    if m is not None:
        out.finished_at, out.size_bytes, out.duration_ms = (m.finished_at, m.size_bytes,
                                                            m.duration_ms)
        out.method, out.deployments, out.warnings = m.method, m.deployments, m.warnings
        out.branches = [BackupBranchOut(id=b.id, name=b.name, parent_id=b.parent_id,
                                        bytes=b.copy.bytes, ms=b.copy.ms,
                                        method=b.copy.method) for b in m.branches]
    return out


_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "missing or invalid API key"},
}
# The key is checked by the API's RequestGuard before anything here runs.
router = APIRouter(prefix="/api/v1/backups", tags=["backups"], responses=_ERRORS)
#: As BACKUP_ID_RE, stated in the OpenAPI document.
BackupId = Annotated[str, Path(pattern=r"^bk-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{4}$",
                               description="bk-<UTC time>-<4 hex>")]


@router.post("", status_code=202, openapi_extra=ADMIN,
             responses={409: {"description": "another backup is running"}})
async def create_backup(request: Request) -> BackupOut:
    """Start a backup of the metadata, every branch and the files they need; poll
    ``GET /api/v1/backups/{id}`` for its progress."""
    jobs = _jobs(request)
    try:
        job = jobs.start()
        return _out(jobs.describe(job.id))
    except BackupError as exc:
        _fail(exc)


@router.get("", openapi_extra=ADMIN)
async def list_backups(request: Request) -> list[BackupOut]:
    """Backups in ``<data dir>/backups``, oldest first, and the one running."""
    return [_out(i) for i in _jobs(request).list()]


@router.get("/{backup_id}", openapi_extra=ADMIN,
            responses={400: {"description": "not a backup id"},
                       404: {"description": "no such backup"}})
async def get_backup(backup_id: BackupId, request: Request) -> BackupOut:
    try:
        return _out(_jobs(request).describe(backup_id))
    except BackupError as exc:
        _fail(exc)
