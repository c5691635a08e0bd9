"""Branch services: state that lives on a branch beside its database and is copied,
reset and deleted with it (Neon Auth, the AI Gateway, object storage).

Each service is a :class:`~phloem.services.base.BranchService` served through the
gateway's listener at ``<branch_id>--<service>.<domain>``; the platform's
:class:`~phloem.services.registry.ServiceRegistry` routes to them, injects their variables
into the branch's functions and calls them around branch create, reset and delete.
"""
