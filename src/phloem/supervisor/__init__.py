"""The supervisor owns isolates: it starts them, leases connections to them, retires old
deployments' isolates and stops everything on shutdown."""

from phloem.supervisor.isolate import Isolate, IsolateFailed, IsolateSpec
from phloem.supervisor.supervisor import Supervisor

__all__ = ["Isolate", "IsolateFailed", "IsolateSpec", "Supervisor"]
