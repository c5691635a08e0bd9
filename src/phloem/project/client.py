"""A small synchronous client for the phloem API; the CLI's only way to the platform.

    client = Client.from_environment()
    client.get_function("main", "todos")
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from phloem.project.packing import pack_path
from phloem.system.settings import default_data_dir


def _ref(branch: str) -> str:
    """A branch name or id as one path segment ('preview/login' -> 'preview%2Flogin')."""
    return quote(branch, safe="")


#: How long ``put_services`` waits for the API (a first Neon Auth provision installs
#: Better Auth; 60 s was not enough on a loaded 2-core machine).
SERVICES_TIMEOUT_S = 900.0

class ClientError(RuntimeError):
    """An API error (``code`` from the response) or a connection problem."""

    def __init__(self, message: str, code: str = "client_error", status: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.field = code, status, field


@dataclass(frozen=True)
class Credentials:
    api_url: str
    api_key: str = field(repr=False)
    #: A CA certificate (PEM) to verify an https API with, besides the system's.
    ca_cert: Path | None = None


def profiles_path() -> Path:
    """``$XDG_CONFIG_HOME/phloem/profiles.json`` (``~/.config`` by default): where
    ``phloem login`` keeps remote platforms' URLs and keys (0600)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "phloem" / "profiles.json"


def read_profiles() -> dict[str, Any]:
    """``{"current": name, "profiles": {name: {api_url, api_key, ca_cert}}}``; empty
    when there is no file."""
    path = profiles_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"current": None, "profiles": {}}
    except (OSError, ValueError) as exc:
        raise ClientError(f"{path}: not readable ({exc}); fix or remove it ('phloem "
                          "logout --all')", "bad_profiles") from None
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        raise ClientError(f"{path}: not a phloem profiles file", "bad_profiles")
    return data


def write_profiles(data: dict[str, Any]) -> Path:
    """Write the profiles file 0600 (its directory 0700), atomically: it holds keys."""
    path = profiles_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def _profile(name: str | None) -> dict[str, Any] | None:
    """The named profile (else ``PHLOEM_PROFILE``, else the current one), or None."""
    data = read_profiles()
    wanted = name or os.environ.get("PHLOEM_PROFILE") or data.get("current")
    if not wanted:
        return None
    found = data["profiles"].get(wanted)
    if found is None and (name or os.environ.get("PHLOEM_PROFILE")):
        raise ClientError(f"profile: no profile {wanted!r} in {profiles_path()} "
                          "('phloem login --profile NAME' makes one)", "no_profile")
    return found if isinstance(found, dict) else None


def load_credentials(api_url: str | None = None, api_key: str | None = None,
                     data_dir: Path | None = None, profile: str | None = None,
                     ca_cert: Path | None = None) -> Credentials:
    """Explicit values, else ``PHLOEM_API_URL``/``PHLOEM_API_KEY`` (``PHLOEM_CA_CERT``),
    else the profile (``profile``, ``PHLOEM_PROFILE``, else the one ``phloem login`` made
    current), else the credentials file ``phloem up`` wrote into its data dir."""
    url = api_url or os.environ.get("PHLOEM_API_URL")
    key = api_key or os.environ.get("PHLOEM_API_KEY")
    env_ca = os.environ.get("PHLOEM_CA_CERT")
    ca = ca_cert or (Path(env_ca) if env_ca else None)
    if not (url and key):
        saved = _profile(profile)
        if saved is not None:
            if ca is None and saved.get("ca_cert"):
                ca = Path(saved["ca_cert"])
        else:
            saved = _data_dir_credentials(data_dir)
        url = url or saved["api_url"]
        key = key or saved["api_key"]
    return Credentials(url.rstrip("/"), key, ca)


def _data_dir_credentials(data_dir: Path | None) -> dict[str, Any]:
    path = (data_dir or default_data_dir()) / "credentials.json"
    try:
        saved: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ClientError(
            f"no API credentials: {path} is not readable ({exc.__class__.__name__}); "
            "start the platform with 'phloem up', 'phloem login' to a remote one, or set "
            "PHLOEM_API_URL and PHLOEM_API_KEY", "no_credentials") from None
    return saved


class Client:
    def __init__(self, creds: Credentials, timeout: float = 60.0) -> None:
        self.creds = creds
        verify: ssl.SSLContext | bool = True
        if creds.ca_cert is not None:
            try:
                verify = ssl.create_default_context(cafile=str(creds.ca_cert))
            except (OSError, ssl.SSLError) as exc:
                raise ClientError(f"ca_cert: {creds.ca_cert}: not a readable PEM CA "
                                  f"certificate ({exc})", "bad_ca_cert", field="ca_cert") from None
        self.http = httpx.Client(base_url=creds.api_url + "/api/v1", timeout=timeout,
                                 headers={"Authorization": f"Bearer {creds.api_key}"},
                                 verify=verify)

    @classmethod
    def from_environment(cls, data_dir: Path | None = None) -> Client:
        return cls(load_credentials(data_dir=data_dir))

    @classmethod
    def local(cls, data_dir: Path) -> Client:
        """The platform of this data dir, whatever profile or variables say."""
        saved = _data_dir_credentials(data_dir)
        return cls(Credentials(saved["api_url"].rstrip("/"), saved["api_key"]))

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the phloem API at {self.creds.api_url}: {exc}; "
                              "is 'phloem up' running?", "unreachable") from None
        if resp.status_code >= 400 and method != "HEAD":
            try:
                err = resp.json()["error"]
                raise ClientError(err["message"], err["code"], resp.status_code,
                                  err.get("field"))
            except (ValueError, KeyError, TypeError):
                raise ClientError(f"HTTP {resp.status_code}: {resp.text[:500]}", "http_error",
                                  resp.status_code) from None
        return resp

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # -- endpoints -----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", "/status")
        return result

    def list_branches(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.json("GET", "/branches")
        return result

    def get_branch(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/branches/{_ref(ref)}")
        return result

    def create_branch(self, name: str | None, parent: str | None,
                      copy_functions: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self.json("POST", "/branches", json={
            "name": name, "parent": parent, "copy_functions": copy_functions})
        return result

    def set_branch_lifetime(self, ref: str, changes: dict[str, Any]) -> dict[str, Any]:
        """``changes``: ``ttl_s`` (expires that long after its creation), ``clear_ttl``,
        ``protected``."""
        result: dict[str, Any] = self.json("PATCH", f"/branches/{_ref(ref)}", json=changes)
        return result

    def reset_branch(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("POST", f"/branches/{_ref(ref)}/reset")
        return result

    def delete_branch(self, ref: str, recursive: bool = False) -> list[str]:
        result: dict[str, Any] = self.json("DELETE", f"/branches/{_ref(ref)}",
                                           params={"recursive": recursive})
        return list(result["deleted"])

    def connection_string(self, branch: str, pooled: bool) -> str:
        result: dict[str, Any] = self.json("GET", f"/branches/{_ref(branch)}/connection",
                                           params={"pooled": pooled})
        return str(result["uri"])

    def list_functions(self, branch: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.json("GET", f"/branches/{_ref(branch)}/functions")
        return result

    def get_function(self, branch: str, slug: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/branches/{_ref(branch)}/functions/{slug}")
        return result

    def env_digest(self, env: dict[str, str]) -> str:
        """The platform's keyed fingerprint of ``env`` (compare with a deployment's)."""
        return str(self.json("POST", "/env-digest", json={"env": env})["digest"])

    def function_env(self, branch: str, slug: str, show_values: bool) -> dict[str, Any]:
        result: dict[str, Any] = self.json(
            "GET", f"/branches/{_ref(branch)}/functions/{slug}/env",
            params={"show_values": show_values})
        return result

    def delete_function(self, branch: str, slug: str) -> None:
        self.request("DELETE", f"/branches/{_ref(branch)}/functions/{slug}")

    def function_logs(self, branch: str, slug: str, lines: int = 200,
                      since_s: float | None = None) -> str:
        params: dict[str, Any] = {"lines": lines}
        if since_s is not None:
            params["since"] = since_s
        return self.request("GET", f"/branches/{_ref(branch)}/functions/{slug}/logs",
                            params=params).text

    def follow_logs(self, branch: str, slug: str, lines: int = 200,
                    since_s: float | None = None) -> Iterator[str]:
        """Yield log lines as they are written, until interrupted."""
        params: dict[str, Any] = {"lines": lines, "follow": True}
        if since_s is not None:
            params["since"] = since_s
        url = f"/branches/{_ref(branch)}/functions/{slug}/logs"
        try:
            with self.http.stream("GET", url, params=params, timeout=None) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ClientError(resp.json()["error"]["message"], status=resp.status_code)
                yield from resp.iter_lines()
        except httpx.TransportError as exc:
            raise ClientError(f"log stream from {self.creds.api_url} broke: {exc}",
                              "unreachable") from None

    def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/deployments/{deployment_id}")
        return result

    def list_deployments(self, branch: str, slug: str) -> list[dict[str, Any]]:
        """The function's deployments, newest first, each with its ``state``."""
        result: list[dict[str, Any]] = self.json(
            "GET", f"/branches/{_ref(branch)}/functions/{slug}/deployments")
        return result

    def rollback(self, branch: str, slug: str, to: str | None = None) -> dict[str, Any]:
        """Switch back to ``to`` (default: the previous deployment); no rebuild."""
        result: dict[str, Any] = self.json(
            "POST", f"/branches/{_ref(branch)}/functions/{slug}/rollback",
            json={"deployment_id": to} if to else {})
        return result

    # -- branch services -------------------------------------------------------------
    def get_services(self, branch: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/branches/{_ref(branch)}/services")
        return result

    def service_env(self, branch: str) -> dict[str, Any]:
        """``{"env": {...}, "hosts": [...]}``: the variables of the branch's services."""
        result: dict[str, Any] = self.json("GET", f"/branches/{_ref(branch)}/services/env")
        return result

    def put_services(self, branch: str, services: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Make the branch's services exactly ``services`` (service -> config). Waits
        up to :data:`SERVICES_TIMEOUT_S`: a first provision installs the service's
        packages and migrates its tables before the API answers."""
        result: dict[str, Any] = self.json("PUT", f"/branches/{_ref(branch)}/services",
                                           json={"services": services},
                                           timeout=SERVICES_TIMEOUT_S)
        return result

    # -- API keys ----------------------------------------------------------------------
    def create_key(self, name: str, scopes: list[str], branches: list[str] | None,
                   expires_in_s: int | None) -> dict[str, Any]:
        """A new key; its ``secret`` is in this answer only."""
        result: dict[str, Any] = self.json("POST", "/keys", json={
            "name": name, "scopes": scopes, "branches": branches,
            "expires_in_s": expires_in_s})
        return result

    def list_keys(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.json("GET", "/keys")
        return result

    def my_key(self) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", "/keys/me")
        return result

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("DELETE", f"/keys/{quote(key_id, safe='')}")
        return result

    # -- schedule triggers -----------------------------------------------------------
    def list_triggers(self, branch: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.json("GET", f"/branches/{_ref(branch)}/triggers")
        return result

    def put_triggers(self, branch: str, triggers: dict[str, Any],
                     owner: str | None = None) -> list[dict[str, Any]]:
        """Make ``owner``'s triggers on the branch exactly ``triggers`` (neon.ts's shape)."""
        result: list[dict[str, Any]] = self.json(
            "PUT", f"/branches/{_ref(branch)}/triggers",
            json={"triggers": triggers, "owner": owner})
        return result

    def trigger_action(self, branch: str, name: str, action: str) -> dict[str, Any]:
        """``enable``, ``disable`` (the trigger) or ``run`` (the run started)."""
        result: dict[str, Any] = self.json(
            "POST", f"/branches/{_ref(branch)}/triggers/{quote(name, safe='')}/{action}")
        return result

    def trigger_history(self, branch: str, name: str, limit: int = 50) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.json(
            "GET", f"/branches/{_ref(branch)}/triggers/{quote(name, safe='')}/history",
            params={"limit": limit})
        return result

    def upload(self, data: bytes, sha256: str) -> None:
        if self.request("HEAD", f"/artifacts/{sha256}").status_code == 200:
            return
        self.request("PUT", f"/artifacts/{sha256}", content=data,
                     headers={"Content-Type": "application/gzip"})

    def deploy(self, branch: str, slug: str, path: Path, entry: str, *,
               env: dict[str, str] | None = None, name: str | None = None,
               runtime: str | None = None, limits: dict[str, float] | None = None,
               unset_env: list[str] | None = None, replace_env: bool = False,
               progress: Callable[[str], None] = lambda _: None,
               timeout: float = 1800.0, wait: bool = True,
               bundle: bool = True) -> dict[str, Any]:
        """Pack, upload, deploy and wait until the deployment is ready or failed; returns
        the deployment. ``path`` may be a file with ``bundle=False`` (a prebuilt bundle:
        only that file is uploaded, and it is the entry)."""
        progress(f"packing {path}")
        data, sha = pack_path(path)
        progress(f"uploading {len(data) / 1024:.1f} KiB ({sha[:12]})")
        self.upload(data, sha)
        return self.deploy_artifact(branch, slug, sha, entry, env=env, name=name,
                                    runtime=runtime, limits=limits, unset_env=unset_env,
                                    replace_env=replace_env, progress=progress,
                                    timeout=timeout, wait=wait, bundle=bundle)

    def deploy_artifact(self, branch: str, slug: str, sha: str, entry: str, *,
                        env: dict[str, str] | None = None, name: str | None = None,
                        runtime: str | None = None, limits: dict[str, float] | None = None,
                        unset_env: list[str] | None = None, replace_env: bool = False,
                        progress: Callable[[str], None] = lambda _: None,
                        timeout: float = 1800.0, wait: bool = True,
                        owner: str | None = None, bundle: bool = True) -> dict[str, Any]:
        """Deploy an uploaded artifact and wait until it is ready or failed (``wait``
        False: return the deployment as accepted, still ``building``)."""
        body: dict[str, Any] = {"artifact_sha256": sha, "entry": entry, "env": env or {},
                                "unset_env": unset_env or [], "replace_env": replace_env,
                                "limits": limits or {}}
        if name is not None:
            body["name"] = name
        if runtime is not None:
            body["runtime"] = runtime
        if owner is not None:
            body["owner"] = owner
        if not bundle:
            body["bundle"] = False
        dep: dict[str, Any] = self.json(
            "POST", f"/branches/{_ref(branch)}/functions/{slug}/deployments", json=body)
        if not wait:
            return dep
        deadline = time.monotonic() + timeout
        shown = 0
        while dep["status"] == "building":
            if time.monotonic() > deadline:
                raise ClientError(f"deployment {dep['id']} still building after {timeout} s",
                                  "timeout")
            time.sleep(0.2)
            dep = self.get_deployment(dep["id"])
            lines = dep["build_log"].splitlines()
            for line in lines[shown:]:
                progress(line)
            shown = len(lines)
        return dep
