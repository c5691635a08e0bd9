"""The platform in one process: :class:`~phloem.server.platform.Platform` assembles the
layers below it and runs their lifecycle; beside it the gateway's router, health probes,
the start sweep and metrics."""

from phloem.system.native import install

# Before any of its modules is imported: some run compiled (see phloem.system.native).
install()
