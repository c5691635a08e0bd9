"""The HTTP/1.1 proxy in front of isolates, routed by Host, and admission control for both
of the platform's listeners. It imports nothing else of phloem: the platform hands it a
:class:`~phloem.gateway.routing.Router`."""
