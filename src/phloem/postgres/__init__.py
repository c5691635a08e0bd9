"""PostgreSQL clusters: binaries, initdb, start/stop, admin connections."""

from phloem.postgres.binaries import PgBinaries, install_binaries
from phloem.postgres.cluster import Cluster, ClusterError

__all__ = ["Cluster", "ClusterError", "PgBinaries", "install_binaries"]
