"""The gateway drops every client-sent ``X-Neon-*`` header (trigger deliveries set them,
so a function can trust them), from a trusted proxy too; look-alikes pass."""

from __future__ import annotations

import pytest

from phloem.gateway.http import scan_request_headers, upstream_request_head


@pytest.mark.parametrize("trusted", [False, True])
def test_x_neon_headers_never_reach_the_function(trusted: bool) -> None:
    """<0.1 s."""
    headers = [(b"Host", b"fn.localhost"), (b"X-Neon-Invocation-Id", b"inv-forged"),
               (b"x-neon-trigger", b"nightly"), (b"X-NEON-Anything", b"1"),
               (b"X-Neonish", b"kept"), (b"traceparent", b"00-" + b"1" * 32 + b"-" +
                                         b"2" * 16 + b"-01")]
    head = upstream_request_head(b"POST", b"/", "1.1", headers,
                                 scan_request_headers(headers), request_id=b"rid",
                                 peer_ip="10.0.0.7", proto="http", upgrade=False,
                                 trusted=trusted).lower()
    assert b"x-neon-" not in head
    assert b"x-neonish: kept\r\n" in head
    # A client's traceparent is its own trace: passed on.
    assert b"traceparent: 00-" in head
