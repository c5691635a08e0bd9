"""What the gateway reports for every finished exchange (``Gateway(on_request=...)``).

    gateway = Gateway(router, GatewayConfig(), on_request=lambda r: print(r.status))
"""

from __future__ import annotations

__all__ = ["RequestRecord"]


class RequestRecord:
    """One finished exchange, for logs and metrics (read-only by convention).

    ``status`` is the status sent to the client (the upstream's, or the gateway's own for
    errors), 499 when the client went away before the response was complete, and 0 when
    nothing could be sent. ``path`` excludes the query string. ``stream`` is true for an
    SSE response or a WebSocket tunnel (``duration_s`` is then the stream's lifetime).
    ``error`` names a limit that ended the exchange: ``"upstream_timeout"`` (time to first
    byte; status 504) or ``"stream_silence"`` (closed mid-response; status as sent).
    """

    # A written-out __init__, not a dataclass: one is built per request, and the compiled
    # build (phloem.system.native) keeps a dataclass's generated __init__ interpreted.
    __slots__ = ("duration_s", "error", "host", "method", "path", "request_id", "status",
                 "stream")

    def __init__(self, host: str, method: str, path: str, status: int, duration_s: float,
                 request_id: str, stream: bool = False, error: str | None = None) -> None:
        self.host = host
        self.method = method
        self.path = path
        self.status = status
        self.duration_s = duration_s
        self.request_id = request_id
        self.stream = stream
        self.error = error

    def __repr__(self) -> str:
        return (f"RequestRecord(host={self.host!r}, method={self.method!r}, "
                f"path={self.path!r}, status={self.status!r}, "
                f"duration_s={self.duration_s!r}, request_id={self.request_id!r}, "
                f"stream={self.stream!r}, error={self.error!r})")
