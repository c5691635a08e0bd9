"""The control plane: the deployer and the routing table it writes, artifacts, function
logs, and the REST API over them. Metadata lives below, in :mod:`phloem.metadata`."""

from phloem.system.native import install

# Before any of its modules is imported: some run compiled (see phloem.system.native).
install()
