"""The response framer with plain bytes: every framing rule both request paths share."""

from __future__ import annotations

import json

import pytest

from phloem.gateway.framing import (
    DONE,
    FAILED,
    HEAD,
    MAX_HEAD_BYTES,
    MORE,
    TUNNEL,
    UPSTREAM_FAILED,
    ResponseFramer,
    error_reply,
    may_replay,
    request_bytes,
    upstream_timeout,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


def framer(*, head: bool = False, upgrade: bool = False) -> ResponseFramer:
    return ResponseFramer(head_request=head, upgrade=upgrade)


def feed_all(f: ResponseFramer, *parts: bytes) -> tuple[list[int], bytes]:
    """Feed each part; the events, and every byte meant for the client."""
    events, out = [], b""
    for part in parts:
        events.append(f.feed(part))
        out += f.out
    return events, out


def test_whole_response_in_one_read() -> None:
    f = framer()
    assert f.feed(OK + b"hello") == DONE
    assert f.out == OK + b"hello"
    assert (f.status, f.keep, f.reusable, f.complete, f.stream) == (200, True, True, True, False)
    assert f.next_parser() is f.resp  # in step: serves the connection's next response
    g = ResponseFramer(head_request=False, upgrade=False, resp=f.next_parser())
    assert g.feed(OK + b"again") == DONE and g.out.endswith(b"again")
    assert g.reusable


def test_head_split_anywhere_and_body_in_pieces() -> None:
    data = OK + b"hello"
    for cut in range(1, len(OK) + 3):
        f = framer()
        events, out = feed_all(f, data[:cut], data[cut:cut + 1], data[cut + 1:])
        assert out == data, cut
        assert events[-1] == DONE and f.reusable, cut
        assert MORE in events[:-1] or HEAD in events, cut


def test_bytes_beyond_content_length_are_cut_off_and_spoil_reuse() -> None:
    f = framer()
    assert f.feed(OK + b"helloJUNK") == DONE
    assert f.out == OK + b"hello"
    assert (f.keep, f.reusable) == (True, False)
    assert f.next_parser() is None

    f = framer()
    assert f.feed(OK + b"he") == HEAD
    assert f.feed(b"lloJUNK") == DONE
    assert f.out == b"llo"
    assert (f.keep, f.reusable) == (True, False)


def test_connection_close_and_http10_decide_keep_alive() -> None:
    f = framer()
    f.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert (f.keep, f.reusable) == (False, False)
    f = framer()
    f.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert f.keep is False
    f = framer()
    f.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n")
    assert f.keep is True


def test_client_is_told_when_its_connection_closes() -> None:
    # The common keep-alive response passes as received.
    f = framer()
    assert f.feed(OK + b"hello") == DONE and f.out == OK + b"hello"
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    # The client asked (or the gateway drains): set until the head arrives.
    f = framer()
    f.close = True
    assert f.feed(OK + b"hello") == DONE and f.out == close
    # The upstream closes (HTTP/1.0 without keep-alive): so does the client connection.
    f = framer()
    f.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert f.out == close.replace(b"1.1", b"1.0", 1) and not f.keep
    # An HTTP/1.0 client that asked for keep-alive is told it is kept; a HEAD's head too.
    f = ResponseFramer(head_request=True, upgrade=False, http10=True)
    assert f.feed(OK) == DONE
    assert f.out == OK[:-2] + b"Connection: keep-alive\r\n\r\n"


def test_hop_by_hop_response_fields_stay_upstream() -> None:
    f = ResponseFramer(head_request=False, upgrade=False, extra=b"X-Route: r\r\n")
    f.feed(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n"
           b"X-Hop: 1\r\nProxy-Connection: keep-alive\r\nContent-Length: 2\r\nA: b\r\n\r\nhi")
    assert f.out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nA: b\r\nX-Route: r\r\n\r\nhi"
    assert (f.keep, f.reusable) == (True, True)
    # Framing fields named in Connection stay; the connection closes after a close.
    f = framer()
    f.feed(b"HTTP/1.1 200 OK\r\nconnection: close, content-length\r\ncontent-length: 2\r\n"
           b"\r\nhi")
    assert f.out == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: close\r\n\r\nhi"
    # After an interim head, only the final head is rewritten; a 101 goes as received.
    f = framer()
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    f.feed(interim + b"HTTP/1.1 204 No Content\r\nKeep-Alive: timeout=5\r\n\r\n")
    assert f.out == interim + b"HTTP/1.1 204 No Content\r\n\r\n"
    up = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    f = framer(upgrade=True)
    assert f.feed(up) == TUNNEL and f.out == up


@pytest.mark.parametrize("line", [
    b"Connection: keep-alive", b"connection: Keep-Alive", b"Connection:keep-alive",
    b"Connection: keep-alive ", b"Connection: close",
])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_lone_connection_field_is_cut_out_wherever_it_is(line: bytes, where: str) -> None:
    # Node sends "Connection: keep-alive" with every response: cut out as a whole line
    # (or by the general strip when spelt otherwise), the other lines as they were.
    others = [b"Content-Type: text/plain", b"Date: x", b"Content-Length: 2"]
    at = {"first": 0, "middle": 1, "last": 3}[where]
    lines = [*others[:at], line, *others[at:]]
    f = framer()
    assert f.feed(b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(lines) + b"\r\n\r\nhi") == DONE
    closing = b"close" in line.lower()
    expected = b"HTTP/1.1 200 OK\r\n" + b"".join(o + b"\r\n" for o in others)
    expected += b"Connection: close\r\n" if closing else b""
    assert f.out == expected + b"\r\nhi"
    assert (f.keep, f.reusable) == (not closing, not closing)
    # The same parser's next response, with a second hop-by-hop field: both go.
    f2 = ResponseFramer(False, False, f.next_parser()) if not closing else framer()
    f2.feed(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nKeep-Alive: timeout=5\r\nA: b\r\n"
            b"Content-Length: 0\r\n\r\n")
    assert f2.out.startswith(b"HTTP/1.1 200 OK\r\nA: b\r\nContent-Length: 0\r\n")


@pytest.mark.parametrize(("head_request", "status"), [(True, 200), (False, 204), (False, 304)])
def test_no_body_whatever_the_headers_say(head_request: bool, status: int) -> None:
    head = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status
    f = framer(head=head_request)
    assert f.feed(head) == DONE
    assert (f.out, f.status, f.reusable) == (head, status, True)
    f = framer(head=head_request)
    assert f.feed(head + b"junk") == DONE
    assert f.out == head  # what follows the head is not passed on
    assert (f.keep, f.reusable) == (True, False)
    if head_request:
        assert f.next_parser() is None  # it would expect the body the head announced


def test_interim_heads_are_passed_on_before_the_final_one() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    f = framer()
    assert f.feed(early) == MORE
    assert f.out == early and f.status == 0
    assert f.feed(OK + b"hello") == DONE
    assert (f.out, f.status) == (OK + b"hello", 200)
    # Interim and final heads in one read.
    f = framer()
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert f.feed(cont + early + OK + b"hello") == DONE
    assert f.out == cont + early + OK + b"hello"


def test_extra_headers_go_into_the_final_head_only() -> None:
    """A route's response_headers (a custom domain's HSTS): after the final head's last
    line, not in interim heads nor a 101's; framing and reuse unchanged."""
    hsts = b"Strict-Transport-Security: max-age=1\r\n"
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    f = ResponseFramer(False, False, extra=hsts)
    assert f.feed(cont + OK + b"hel") == HEAD
    assert f.out == cont + OK[:-2] + hsts + b"\r\nhel"
    assert f.feed(b"lo") == DONE and f.reusable
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    f = ResponseFramer(False, False, extra=hsts)
    assert f.feed(head + b"5\r\nhello\r\n0\r\n\r\n") == DONE
    assert f.out == head[:-2] + hsts + b"\r\n5\r\nhello\r\n0\r\n\r\n" and f.reusable
    f = ResponseFramer(False, True, extra=hsts)
    switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
    assert f.feed(switch) == TUNNEL and f.out == switch


def test_chunked_body_goes_out_as_it_comes() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    f = framer()
    assert f.feed(head) == HEAD
    assert f.out == head
    assert f.feed(b"5\r\nhello\r\n") == MORE
    assert f.out == b"5\r\nhello\r\n"
    assert f.feed(b"0\r\n\r\n") == DONE
    assert (f.complete, f.reusable, f.keep) == (True, True, True)
    # The head and the whole body in one read.
    f = framer()
    assert f.feed(head + b"5\r\nhello\r\n0\r\n\r\n") == DONE
    assert f.out == head + b"5\r\nhello\r\n0\r\n\r\n" and f.reusable


def test_bytes_after_the_last_chunk_close_both_connections() -> None:
    f = framer()
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert f.feed(b"0\r\n\r\nHTTP/1.1 200 OK\r\n") == DONE
    assert (f.complete, f.reusable, f.keep) == (True, False, False)


def test_broken_chunked_body_ends_the_exchange_uncompleted() -> None:
    f = framer()
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert f.feed(head + b"zz\r\n") == DONE
    assert f.out == head  # the head went out; the broken bytes do not
    assert (f.complete, f.reusable, f.keep) == (False, False, False)
    assert "chunked" in f.reason


def test_close_delimited_body_ends_at_eof() -> None:
    f = framer()
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    assert f.feed(head + b"abc") == HEAD
    assert f.out == head + b"abc"
    assert f.feed(b"def") == MORE and f.out == b"def"
    assert f.closed(None) == DONE
    assert (f.complete, f.reusable, f.keep) == (True, False, False)


def test_upstream_closing_mid_body_is_incomplete() -> None:
    f = framer()
    f.feed(OK + b"he")
    assert f.closed(ConnectionResetError()) == DONE
    assert (f.complete, f.reusable, f.keep, f.out) == (False, False, False, b"")
    assert f.reason == "closed mid-body"


def test_event_streams_are_streams() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    f = framer()
    assert f.feed(head + b"data: one\n\n") == HEAD
    # Close-delimited: the client is told the connection ends with it.
    assert (f.stream, f.out) == (True, head[:-2] + b"Connection: close\r\n\r\ndata: one\n\n")
    # Even with all of a Content-Length body at once, it counts as a stream.
    f = framer()
    sized = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 2\r\n\r\n"
    assert f.feed(sized + b"ok") == DONE
    assert (f.stream, f.reusable) == (True, True)


def test_no_answer_at_all_may_be_retried() -> None:
    f = framer()
    assert f.closed(None) == FAILED
    assert (f.retryable, f.undelivered, f.reason) == (True, False, "closed before responding")
    f = framer()
    assert f.closed(BrokenPipeError()) == FAILED
    assert (f.retryable, f.undelivered) == (True, True)
    f = framer()
    assert f.closed(ConnectionResetError()) == FAILED and f.undelivered
    f = framer()
    assert f.closed(TimeoutError()) == FAILED and not f.undelivered
    # Part of a head came: the upstream read the request; never retried.
    f = framer()
    assert f.feed(b"HTTP/1.1 2") == MORE and f.out == b""
    assert f.closed(ConnectionResetError()) == FAILED
    assert (f.retryable, f.undelivered) == (False, False)


def test_bad_heads_fail_without_reaching_the_client() -> None:
    f = framer()
    assert f.feed(b"NOT HTTP\r\n\r\n") == FAILED
    assert f.reason.startswith("invalid response head") and not f.retryable
    f = framer()
    big = b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES
    assert f.feed(big) == FAILED
    assert f.reason == "response head too large" and f.out == b""
    f = framer()
    early = b"HTTP/1.1 103 Early Hints\r\n\r\n"
    switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
    assert f.feed(early + switch) == FAILED
    assert f.out == early  # what already was a response goes out; the 101 does not
    assert "did not ask" in f.reason


def test_101_to_an_upgrade_request_starts_a_tunnel() -> None:
    f = framer(upgrade=True)
    head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
    assert f.feed(head + b"\x81\x02hi") == TUNNEL
    assert (f.out, f.status, f.stream) == (head + b"\x81\x02hi", 101, True)
    assert f.feed(b"raw") == MORE and f.out == b"raw"
    assert f.closed(None) == DONE and not f.reusable
    # An upgrade request may be refused with an ordinary response.
    f = framer(upgrade=True)
    assert f.feed(OK + b"hello") == DONE and f.status == 200


def test_replay_decisions() -> None:
    base = {"undelivered": False, "whole": True, "retryable": False, "idempotent": True,
            "replay_safe": True, "attempt": 1}
    assert not may_replay(**base)
    assert may_replay(**{**base, "undelivered": True})
    assert may_replay(**{**base, "undelivered": True, "attempt": 2})
    assert not may_replay(**{**base, "undelivered": True, "attempt": 3})
    assert not may_replay(**{**base, "undelivered": True, "whole": False})
    assert may_replay(**{**base, "retryable": True})
    assert not may_replay(**{**base, "retryable": True, "replay_safe": False})
    assert not may_replay(**{**base, "retryable": True, "idempotent": False})
    assert not may_replay(**{**base, "retryable": True, "attempt": 2})


def test_request_bytes_keep_the_clients_framing() -> None:
    head = b"POST / HTTP/1.1\r\n\r\n"
    assert request_bytes(head, b"abc", chunked=False) == head + b"abc"
    assert request_bytes(head, b"abc", chunked=True) == head + b"3\r\nabc\r\n0\r\n\r\n"
    assert request_bytes(head, b"", chunked=True) == head + b"0\r\n\r\n"
    assert request_bytes(head, b"", chunked=False) == head


def test_gateway_error_replies() -> None:
    status, code, message = UPSTREAM_FAILED
    data = error_reply(status, code, message, b"rid1", keep=False, head_only=False,
                       http10=False)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Connection: close" in head and b"X-Request-Id: rid1" in head
    assert json.loads(body) == {"error": {"code": "upstream_failed",
                                          "message": "the function failed to respond"}}
    assert b"Content-Length: %d" % len(body) in head
    status, code, message = upstream_timeout(2.5)
    assert (status, code) == (504, "upstream_timeout") and "2.5 s" in message
    data = error_reply(status, code, message, b"r", keep=True, head_only=True, http10=True)
    assert data.endswith(b"Connection: keep-alive\r\n\r\n")  # no body after a HEAD
    assert b"close" not in data
