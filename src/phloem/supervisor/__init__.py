"""The supervisor owns isolates: it starts them, leases connections to them, retires old
deployments' isolates and stops everything on shutdown."""

from phloem.system.native import install

# Before any of its modules is imported: the leases run compiled (see phloem.system.native).
install()


from phloem.supervisor.isolate import Isolate, IsolateFailed, IsolateSpec  # noqa: E402
from phloem.supervisor.supervisor import Supervisor  # noqa: E402

__all__ = ["Isolate", "IsolateFailed", "IsolateSpec", "Supervisor"]
