"""The HTTP/1.1 proxy in front of isolates, routed by Host, and admission control for both
of the platform's listeners. It imports nothing else of phloem but the shared vocabulary
(:mod:`phloem.system`): the platform hands it a :class:`~phloem.gateway.routing.Router`.

Its modules run compiled when scripts/install could build them (``native`` says whether;
see :mod:`phloem.system.native`).
"""

from phloem.system.native import install

native = install()
