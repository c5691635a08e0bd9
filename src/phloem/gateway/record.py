"""What the gateway reports for every finished exchange (``Gateway(on_request=...)``).

    gateway = Gateway(router, GatewayConfig(), on_request=lambda r: print(r.status))
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RequestRecord"]


@dataclass(slots=True)
class RequestRecord:
    """One finished exchange, for logs and metrics (read-only by convention: not frozen,
    which would make building one, once per request, three times as slow).

    ``status`` is the status sent to the client (the upstream's, or the gateway's own for
    errors), 499 when the client went away before the response was complete, and 0 when
    nothing could be sent. ``path`` excludes the query string. ``stream`` is true for an
    SSE response or a WebSocket tunnel (``duration_s`` is then the stream's lifetime).
    ``error`` names a limit that ended the exchange: ``"upstream_timeout"`` (time to first
    byte; status 504) or ``"stream_silence"`` (closed mid-response; status as sent).
    """

    host: str
    method: str
    path: str
    status: int
    duration_s: float
    request_id: str
    stream: bool = False
    error: str | None = None
