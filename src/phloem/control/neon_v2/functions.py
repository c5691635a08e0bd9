"""``.../branches/{id}/functions``: phloem's functions in Neon's shape.

``neon functions deploy`` bundles the function itself (its own esbuild) and posts a zip of
the output as multipart form data with ``runtime`` and ``environment`` (a JSON object).
phloem takes the zip as a prebuilt bundle: it becomes an artifact (a .tar.gz of the same
files) deployed with the bundle's ``index.mjs`` as entry, through the same deployer as
``phloem functions deploy``. ``environment``, when sent, is the deployment's whole env;
without it the previous deployment's carries over.

Neon's deployment ids are numbers the CLI compares to find a new one; here a
deployment's number is its position among its function's deployments (1, 2, ...).
Statuses: phloem's ``building``/``ready``/``failed`` are Neon's
``building``/``completed``/``failed``.

    neon functions deploy hello --src ./hello --env GREETING=hi
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import zipfile
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from phloem.control.deployer import DeployRequest, NotFound
from phloem.control.neon_v2.errors import NeonError, NeonRoute
from phloem.control.neon_v2.project import iso, project_of
from phloem.control.scopes import needs
from phloem.metadata.store import BranchRow, DeploymentRow, FunctionRow
from phloem.runtimes.registry import runtime_for_source

if TYPE_CHECKING:
    from phloem.control.services import ApiServices

router = APIRouter(route_class=NeonRoute)

FUNCTIONS = "/api/v2/projects/{project_id}/branches/{branch_id}/functions"
FUNCTION = FUNCTIONS + "/{slug}"
NEON_STATUS = {"building": "building", "ready": "completed", "failed": "failed"}
#: Where Neon's bundler puts the function (``outfile: "index.mjs"``); else the first
#: module in the zip.
BUNDLE_ENTRY = "index.mjs"
#: Cap of a deployment's multipart body (the zip is read whole: the MIME parser and the
#: zip reader need all of it). phloem's artifacts are capped at 100 MiB; a bundle is
#: one minified module, far smaller.
MAX_BUNDLE_BYTES = 50 * 1024 * 1024


def is_bundle_upload(method: str, path: str) -> bool:
    """Whether ``method path`` is a deployment upload, whose cap is
    :data:`MAX_BUNDLE_BYTES` (the API's body guard asks, before reading the body)."""
    parts = path.split("/")
    return (method == "POST" and len(parts) == 10 and parts[1:4] == ["api", "v2", "projects"]
            and parts[5] == "branches" and parts[7] == "functions"
            and parts[9] == "deployments")


class Deployment(BaseModel):
    id: int
    status: str
    memory_mib: int
    runtime: str
    created_at: str
    environment: list[str] = []
    error: str | None = None


class Function(BaseModel):
    id: str
    slug: str
    name: str
    invocation_url: str
    current_deployment: Deployment | None = None
    active_deployment: Deployment | None = None
    created_at: str


class FunctionOut(BaseModel):
    function: Function


class FunctionsOut(BaseModel):
    functions: list[Function]
    pagination: dict[str, str] = {}


class DeploymentOut(BaseModel):
    deployment: Deployment


def deployment_model(platform: ApiServices, dep: DeploymentRow, number: int) -> Deployment:
    memory = (dep.limits or {}).get("memory_mb", platform.settings.function_limits.memory_mb)
    return Deployment(
        id=number, status=NEON_STATUS.get(dep.status, dep.status), memory_mib=int(memory),
        runtime=dep.runtime, created_at=iso(dep.created_at) or "",
        environment=sorted(dep.env_keys if dep.env_keys is not None else dep.env),
        error=dep.error)


async def function_model(platform: ApiServices, branch: BranchRow, fn: FunctionRow) -> Function:
    deps = await platform.store.list_deployments(fn.id)  # newest first
    numbered = {d.id: (d, len(deps) - i) for i, d in enumerate(deps)}
    current = deployment_model(platform, deps[0], len(deps)) if deps else None
    active = None
    if fn.active_deployment_id in numbered:
        dep, number = numbered[fn.active_deployment_id]
        active = deployment_model(platform, dep, number)
    return Function(id=fn.id, slug=fn.slug, name=fn.name,
                    invocation_url=platform.deployer.invocation_url(branch.id, fn.slug),
                    current_deployment=current, active_deployment=active,
                    created_at=iso(fn.created_at) or "")


async def _branch(request: Request, project_id: str,
                  branch_id: str) -> tuple[ApiServices, BranchRow]:
    platform, _ = await project_of(request, project_id)
    return platform, await platform.branches.get(branch_id.replace("%2F", "/"))


@router.get(FUNCTIONS, openapi_extra=needs("read"))
async def list_functions(request: Request, project_id: str, branch_id: str) -> FunctionsOut:
    """Every function of the branch in one page (no ``pagination.next``)."""
    platform, branch = await _branch(request, project_id, branch_id)
    fns = await platform.store.list_functions(branch.id)
    return FunctionsOut(functions=[await function_model(platform, branch, f) for f in fns])


@router.get(FUNCTION, openapi_extra=needs("read"))
async def get_function(request: Request, project_id: str, branch_id: str,
                       slug: str) -> FunctionOut:
    platform, branch = await _branch(request, project_id, branch_id)
    fn = await platform.store.get_function(branch.id, slug)
    if fn is None:
        raise NotFound("function", slug)
    return FunctionOut(function=await function_model(platform, branch, fn))


@router.delete(FUNCTION, status_code=204, openapi_extra=needs("deploy"))
async def delete_function(request: Request, project_id: str, branch_id: str,
                          slug: str) -> Response:
    platform, branch = await _branch(request, project_id, branch_id)
    await platform.deployer.delete(branch, slug)
    return Response(status_code=204)


def form_fields(content_type: str, body: bytes) -> dict[str, Message]:
    """The parts of a multipart/form-data body by name (the standard library's MIME
    parser: phloem has no multipart dependency, and bodies are capped)."""
    if not content_type.startswith("multipart/form-data"):
        raise NeonError(400, "invalid_input", "body: must be multipart/form-data with a "
                        f"'zip' part (got {content_type or 'no Content-Type'!r})")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise NeonError(400, "invalid_input", "body: not a multipart body")
    parts: dict[str, Message] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            parts[name] = part
    return parts


def _text(part: Message | None) -> str | None:
    if part is None:
        return None
    payload = part.get_payload(decode=True)
    return payload.decode() if isinstance(payload, bytes) else None


def bundle_to_artifact(zip_bytes: bytes) -> tuple[bytes, str]:
    """A .tar.gz artifact holding the zip's files, and the entry module."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(zip_bytes))
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
    except zipfile.BadZipFile as exc:
        raise NeonError(400, "invalid_input", f"zip: not a zip archive ({exc})") from None
    for name in names:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts:
            raise NeonError(400, "invalid_input", f"zip: {name!r} is outside the bundle")
    modules = [n for n in names if n.endswith((".mjs", ".js"))]
    entry = BUNDLE_ENTRY if BUNDLE_ENTRY in names else (modules[0] if modules else None)
    if entry is None:
        raise NeonError(400, "invalid_input", "zip: holds no .mjs or .js module "
                        f"(files: {', '.join(names[:10]) or 'none'})")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name in names:
            data = archive.read(name)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), entry


def parse_environment(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    try:
        env = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NeonError(400, "invalid_input", f"environment: must be a JSON object of "
                        f"strings ({exc})") from None
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise NeonError(400, "invalid_input", "environment: must be a JSON object of "
                        "strings, e.g. {\"KEY\": \"value\"}")
    return env


@router.post(FUNCTION + "/deployments", status_code=201, openapi_extra=needs("deploy"))
async def create_deployment(request: Request, project_id: str, branch_id: str,
                            slug: str) -> DeploymentOut:
    platform, branch = await _branch(request, project_id, branch_id)
    parts = form_fields(request.headers.get("content-type", ""), await request.body())
    # Neon's runtime names are phloem's; the deployer refuses one this machine lacks.
    runtime_name = _text(parts.get("runtime"))
    env = parse_environment(_text(parts.get("environment")))
    zip_part = parts.get("zip")
    zip_bytes = zip_part.get_payload(decode=True) if zip_part is not None else None
    if not isinstance(zip_bytes, bytes):
        raise NeonError(400, "invalid_input", "zip: the form has no 'zip' file part")
    artifact, entry = await asyncio.to_thread(bundle_to_artifact, zip_bytes)
    if runtime_name is None:  # the runtime whose modules the bundle's entry is
        by_source = runtime_for_source(entry)
        runtime_name = by_source.name if by_source is not None else None
    sha = await asyncio.to_thread(platform.artifacts.put, artifact)
    dep = await platform.deployer.deploy(branch, DeployRequest(
        slug=slug, artifact_sha256=sha, entry=entry, runtime=runtime_name,
        env=env, replace_env=env is not None))
    number = len(await platform.store.list_deployments(dep.function_id))
    return DeploymentOut(deployment=deployment_model(platform, dep, number))
