"""The request reader with plain bytes: which heads are "plain" (forwarded as received, with
the gateway's headers appended) and that what goes upstream then is what the rewriting
path would send."""

from __future__ import annotations

import pytest

from phloem.gateway import http
from phloem.gateway.reader import RequestReader
from phloem.gateway.request import Request

PLAIN = b"GET /x?y=1 HTTP/1.1\r\nHost: app.test\r\nAccept: */*\r\n\r\n"


class _Owner:
    def head_begun(self) -> None: ...

    def wake_handler(self) -> None: ...


def parse(data: bytes) -> list[Request]:
    reader = RequestReader(1024, _Owner())
    reader.feed(data)
    return list(reader.pending)


def test_a_plain_head_alone_is_kept_as_received() -> None:
    [req] = parse(PLAIN)
    assert req.complete
    assert req.host == b"app.test"
    assert req.raw == PLAIN


def test_the_plain_head_goes_upstream_as_the_rewriting_path_sends_it() -> None:
    [req] = parse(PLAIN)
    info = http.scan_request_headers(req.headers)
    rewritten = http.upstream_request_head(
        req.method, req.target, req.version, req.headers, info, request_id=b"rid1",
        peer_ip="10.0.0.7", proto="https", upgrade=False)
    plain = http.plain_request_head(req.raw, b"X-Forwarded-For: 10.0.0.7\r\n", b"rid1",
                                    b"https", b"app.test")
    assert plain == rewritten


@pytest.mark.parametrize("header", [
    b"Connection: keep-alive", b"X-Forwarded-For: 1.2.3.4", b"x-neon-invocation-id: 1",
    b"Content-Length: 0", b"X-Request-Id: abc", b"Forwarded: for=1.2.3.4", b"Host: other",
    b"Expect: 100-continue", b"TE: trailers",
])
def test_a_head_the_gateway_must_rewrite_is_not_plain(header: bytes) -> None:
    [req] = parse(PLAIN[:-2] + header + b"\r\n\r\n")
    assert req.host is None and req.raw == b""


@pytest.mark.parametrize("data", [
    PLAIN + PLAIN,  # pipelined: neither is the whole read
    b"\r\n" + PLAIN,  # a blank line llhttp skips
    PLAIN + b"\r\n",
])
def test_a_plain_head_not_alone_in_its_read_is_rewritten(data: bytes) -> None:
    reqs = parse(data)
    assert reqs and all(r.host == b"app.test" and r.raw == b"" for r in reqs)


def test_http10_and_a_missing_host_are_not_plain() -> None:
    [req] = parse(b"GET / HTTP/1.0\r\nHost: app.test\r\n\r\n")
    assert req.host is None
    [req] = parse(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n")
    assert req.host is None


def test_a_head_split_over_reads_is_plain_but_not_kept() -> None:
    reader = RequestReader(1024, _Owner())
    reader.feed(PLAIN[:20])
    reader.feed(PLAIN[20:])
    [req] = reader.pending
    assert req.host == b"app.test" and req.raw == b""


# Keep-alive, so that a request may follow it on the connection.
H10 = b"GET /old HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n"


@pytest.mark.parametrize(("feeds", "versions"), [
    ([PLAIN], ["1.1"]),
    ([H10], ["1.0"]),
    ([PLAIN + H10], ["1.1", "1.0"]),  # the second of a read is not the first line's
    ([H10 + PLAIN], ["1.0", "1.1"]),
    ([b"\r\n" + H10], ["1.0"]),  # a blank line first: no first request line to read
    ([H10[:12], H10[12:]], ["1.0"]),  # the line split: the version comes in a later read
    ([PLAIN[:10], PLAIN[10:]], ["1.1"]),
    ([PLAIN[:30], PLAIN[30:] + H10], ["1.1", "1.0"]),
    ([b"GET /x%20HTTP/1.1 HTTP/1.0\r\nHost: a\r\n\r\n"], ["1.0"]),
])
def test_each_request_gets_its_own_http_version(feeds: list[bytes],
                                                versions: list[str]) -> None:
    # The first request line of a read is read for its version; any other request's
    # version comes from the parser.
    reader = RequestReader(1024, _Owner())
    for data in feeds:
        reader.feed(data)
    assert [r.version for r in reader.pending] == versions
    assert reader.bad_request is None
