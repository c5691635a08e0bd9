"""phloem.server.metrics: the rendered exposition, parsed back with prometheus_client's parser."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from phloem.gateway.routing import RouteError, Upstream
from phloem.gateway.server import Gateway, GatewayConfig, RequestRecord
from phloem.server.metrics import REQUEST_BUCKETS, FunctionLoad, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def record(status: int = 200, duration_s: float = 0.002, *, stream: bool = False) -> RequestRecord:
    return RequestRecord("h", "GET", "/", status, duration_s, "rid", stream=stream)


FN = {"branch": "br-quiet-moon-3f9a2c", "function": "todos"}
OTHER = {"branch": "br-quiet-moon-3f9a2c", "function": "other"}


def observe(m: Metrics, r: RequestRecord, branch: str, function: str) -> None:
    """Count ``r`` as the platform does (``server.dispatch.RequestObserver``): into the
    function's series."""
    m.requests_of(branch, function).observe(r.status, r.duration_s, r.stream)


def test_requests_are_counted_by_status_and_timed() -> None:
    m = Metrics()
    observe(m, record(200, 0.002), **FN)
    observe(m, record(200, 0.3), **FN)
    observe(m, record(504, 900.5), **FN)
    observe(m, record(200, 0.004), **OTHER)
    s = scrape(m)
    assert value(s, "phloem_requests_total", **FN, status="200") == 2
    assert value(s, "phloem_requests_total", **FN, status="504") == 1
    assert value(s, "phloem_requests_total", **OTHER, status="200") == 1
    assert value(s, "phloem_requests_total", **OTHER, status="504") is None

    duration = "phloem_request_duration_seconds"
    assert value(s, f"{duration}_count", **FN) == 3
    assert value(s, f"{duration}_sum", **FN) == 0.002 + 0.3 + 900.5
    assert value(s, f"{duration}_bucket", **FN, le="0.001") == 0
    assert value(s, f"{duration}_bucket", **FN, le="0.0025") == 1
    assert value(s, f"{duration}_bucket", **FN, le="0.5") == 2
    assert value(s, f"{duration}_bucket", **FN, le="900.0") == 2
    assert value(s, f"{duration}_bucket", **FN, le="+Inf") == 3
    assert (REQUEST_BUCKETS[0], REQUEST_BUCKETS[-1]) == (0.001, 900.0)


def test_a_duration_on_a_bound_counts_in_that_bucket() -> None:
    # Buckets are "less than or equal": a request of exactly 1 ms is in le="0.001".
    m = Metrics()
    for duration_s in (0.0, 0.001, 0.0010001, 0.0025, 900.0, 900.0001):
        observe(m, record(200, duration_s), **FN)
    s = scrape(m)
    bucket = "phloem_request_duration_seconds_bucket"
    assert value(s, bucket, **FN, le="0.001") == 2
    assert value(s, bucket, **FN, le="0.0025") == 4
    assert value(s, bucket, **FN, le="0.005") == 4
    assert value(s, bucket, **FN, le="900.0") == 5
    assert value(s, bucket, **FN, le="+Inf") == 6


def test_streams_are_counted_but_not_timed() -> None:
    m = Metrics()
    observe(m, record(101, 3600.0, stream=True), **FN)
    observe(m, record(200, 0.01), **FN)
    s = scrape(m)
    assert value(s, "phloem_requests_total", **FN, status="101") == 1
    assert value(s, "phloem_request_duration_seconds_count", **FN) == 1
    assert value(s, "phloem_request_duration_seconds_sum", **FN) == 0.01


def test_cold_starts_and_evictions() -> None:
    m = Metrics()
    m.observe_cold_start(**FN, seconds=0.041)
    m.observe_cold_start(**FN, seconds=2.0)
    m.observe_eviction(**FN, reason="idle")
    m.observe_eviction(**FN, reason="idle")
    m.observe_eviction(**FN, reason="memory")
    s = scrape(m)
    assert value(s, "phloem_cold_starts_total", **FN) == 2
    assert value(s, "phloem_cold_start_seconds_count", **FN) == 2
    assert value(s, "phloem_cold_start_seconds_sum", **FN) == 2.041
    assert value(s, "phloem_cold_start_seconds_bucket", **FN, le="0.05") == 1
    assert value(s, "phloem_cold_start_seconds_bucket", **FN, le="+Inf") == 2
    assert value(s, "phloem_evictions_total", **FN, reason="idle") == 2
    assert value(s, "phloem_evictions_total", **FN, reason="memory") == 1


def test_gauges_are_read_at_scrape_time() -> None:
    loads = {("br-quiet-moon-3f9a2c", "todos"): FunctionLoad(isolates=2, inflight=5)}
    m = Metrics(load=lambda: loads)
    s = scrape(m)
    assert value(s, "phloem_isolates", **FN) == 2
    assert value(s, "phloem_inflight_requests", **FN) == 5
    assert value(s, "phloem_open_streams", **FN) == 0

    loads[("br-quiet-moon-3f9a2c", "todos")] = FunctionLoad(isolates=1, open_streams=7)
    loads[("br-quiet-moon-3f9a2c", "other")] = FunctionLoad(isolates=1)
    s = scrape(m)
    assert value(s, "phloem_isolates", **FN) == 1
    assert value(s, "phloem_inflight_requests", **FN) == 0
    assert value(s, "phloem_open_streams", **FN) == 7
    assert value(s, "phloem_isolates", **OTHER) == 1

    del loads[("br-quiet-moon-3f9a2c", "todos")]
    s = scrape(m)
    assert value(s, "phloem_isolates", **FN) is None  # a function gone is not reported as 0


def test_a_failing_load_source_does_not_break_the_scrape() -> None:
    def broken() -> dict[tuple[str, str], FunctionLoad]:
        raise RuntimeError("supervisor is gone")

    m = Metrics(load=broken)
    observe(m, record(), **FN)
    s = scrape(m)
    assert value(s, "phloem_requests_total", **FN, status="200") == 1
    assert not any(name == "phloem_isolates" for name, _ in s)


def test_registries_are_independent_and_the_source_can_be_set_later() -> None:
    a, b = Metrics(), Metrics()
    observe(a, record(), **FN)
    assert value(scrape(a), "phloem_requests_total", **FN, status="200") == 1
    assert value(scrape(b), "phloem_requests_total", **FN, status="200") is None
    assert value(scrape(b), "phloem_isolates", **FN) is None
    b.load = lambda: {("br-quiet-moon-3f9a2c", "todos"): FunctionLoad(isolates=3)}
    assert value(scrape(b), "phloem_isolates", **FN) == 3


def test_openmetrics_when_asked() -> None:
    m = Metrics()
    observe(m, record(), **FN)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


class NoRoutes:
    async def acquire(self, host: str) -> Upstream:
        raise RouteError(404, "unknown_host", f"no function serves {host}")

    def acquire_nowait(self, host: str) -> Upstream | None:
        return None


async def test_fed_by_a_real_gateway() -> None:
    """Records from a Gateway's on_request hook, gauges from its counters."""
    m = Metrics()
    gateway = Gateway(
        NoRoutes(), GatewayConfig(port=0), on_request=lambda r: observe(m, r, **FN)
    )
    m.load = lambda: {
        ("br-quiet-moon-3f9a2c", "todos"): FunctionLoad(
            inflight=gateway.inflight, open_streams=gateway.open_streams
        )
    }
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as client:
            for _ in range(3):
                r = await client.get("/", headers={"Host": "nope.test"})
                assert r.status_code == 404
    finally:
        await gateway.stop_accepting()
        await asyncio.wait_for(gateway.drain(1.0), 5)
    s = scrape(m)
    assert value(s, "phloem_requests_total", **FN, status="404") == 3
    assert value(s, "phloem_request_duration_seconds_count", **FN) == 3
    assert value(s, "phloem_inflight_requests", **FN) == 0
