"""What the control API may use of a running platform, and nothing more.

The API's routes get this object instead of the whole platform: what they touch is
listed here, the API cannot reach the lifecycle (start, stop, signals), and
``phloem.control.api`` does not import ``phloem.server.platform`` (which imports it).

    services = ApiServices(settings=s, paths=paths, api_key=key, store=store,
                           branches=branches, deployer=deployer, artifacts=artifacts,
                           function_logs=logs, metrics=metrics, status=running.status)
    app = create_api(services)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from phloem.branches.manager import BranchManager
from phloem.control.artifacts import ArtifactStore
from phloem.control.deployer import Deployer
from phloem.control.logs import FunctionLogs
from phloem.control.triggers import TriggerScheduler
from phloem.metadata.store import Store
from phloem.services.registry import ServiceRegistry
from phloem.system.paths import DataPaths
from phloem.system.settings import Settings


class MetricsPage(Protocol):
    """The Prometheus page (``phloem.server.metrics.Metrics`` is one)."""

    def render(self, accept: str) -> tuple[bytes, str]: ...


@dataclass(frozen=True, eq=False)
class ApiServices:
    """The parts of a started platform the API's routes use (and backups, through
    ``phloem.backup.create.BackupSource``)."""

    #: ``metrics_token`` (RequestGuard) and ``isolate_uid_base`` (backups).
    settings: Settings
    #: Function log files, the backups directory.
    paths: DataPaths
    #: The platform's own key (credentials.json's), checked in memory so the API answers
    #: a 401/200 while the system database does not.
    api_key: str
    store: Store
    branches: BranchManager
    deployer: Deployer
    artifacts: ArtifactStore
    function_logs: FunctionLogs
    metrics: MetricsPage
    #: ``phloem status``: each component probed now.
    status: Callable[[], Awaitable[dict[str, Any]]]
    #: Schedule triggers: their store, and firing one now.
    triggers: TriggerScheduler
    #: Branch services (Neon Auth, AI Gateway, object storage) each branch has on.
    branch_services: ServiceRegistry
