"""Prometheus metrics for the platform, in the text exposition format.

    metrics = Metrics(load=lambda: {("br-quiet-moon-3f9a2c", "todos"): FunctionLoad(1, 3, 0)})
    series = metrics.requests_of("br-quiet-moon-3f9a2c", "todos")  # per Host: server.dispatch
    gateway = Gateway(router, config,
                      on_request=lambda r: series.observe(r.status, r.duration_s, r.stream))
    metrics.observe_cold_start("br-quiet-moon-3f9a2c", "todos", 0.041)
    metrics.observe_eviction("br-quiet-moon-3f9a2c", "todos", "idle")
    metrics.connections = lambda: {"gateway": ListenerLoad(open=12, limit=9360,
                                                           refused={"per_peer": 3})}
    body, content_type = metrics.render(accept=request_accept_header)

Each :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` (never the
process-global one), so several can coexist, e.g. one per test. Counters and histograms are
fed as events happen; the gauges (isolates, in-flight requests, open streams) are read from
a callable at scrape time, so there is nothing to keep in sync.

The per-request series (``phloem_requests_total``, ``phloem_request_duration_seconds``) are
plain ints and floats in dicts, turned into metric families only when scraped: the gateway
feeds them once per request, and prometheus_client's labelled children (a lock and a label
lookup per call) cost several microseconds there. They are fed from the event loop's thread
only, like everything on the gateway's path; the exposition is the same as
prometheus_client's own counters and histograms (``_created`` samples included).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = [
    "COLD_START_BUCKETS",
    "REQUEST_BUCKETS",
    "ConnectionSource",
    "FunctionLoad",
    "FunctionRequests",
    "ListenerLoad",
    "LoadSource",
    "Metrics",
]

logger = logging.getLogger("phloem.server.metrics")

# 1 ms to 15 min (the default time-to-first-byte limit), roughly 1-2.5-5 per decade.
REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    900.0,
)
# Forked Python isolates start in tens of ms; a first start with dependencies takes seconds.
COLD_START_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
)

_FUNCTION = ("branch", "function")


@dataclass(frozen=True, slots=True)
class FunctionLoad:
    """What one function on one branch is doing right now."""

    isolates: int = 0
    inflight: int = 0
    open_streams: int = 0


# Called at every scrape: (branch, function) -> its current load.
LoadSource = Callable[[], Mapping[tuple[str, str], FunctionLoad]]


@dataclass(frozen=True, slots=True)
class ListenerLoad:
    """One listener's client connections (see phloem.gateway.admission)."""

    open: int = 0
    limit: int = 0
    #: Connections refused or closed by a limit, per reason.
    refused: Mapping[str, int] = field(default_factory=dict)


# Called at every scrape: listener name ("gateway", "api") -> its connections.
ConnectionSource = Callable[[], Mapping[str, ListenerLoad]]


class _ConnectionCollector:
    """Open connections and limit hits per listener, read from ``Metrics.connections``."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily("phloem_open_connections",
                              "Client connections open now, per listener (gateway, api).",
                              labels=("listener",)),
            GaugeMetricFamily("phloem_connection_limit",
                              "Client connections a listener keeps open at most.",
                              labels=("listener",)),
            CounterMetricFamily(
                "phloem_connections_refused_total",
                "Client connections refused or closed by a limit, by reason: per_peer, "
                "capacity (listener full, none idle), evicted (the longest-waiting one "
                "closed to make room), head_timeout, descriptors (accept out of them).",
                labels=("listener", "reason")),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        open_, limit, refused = families = self._families()
        source = self._metrics.connections
        if source is None:
            return families
        try:
            listeners = dict(source())
        except Exception:
            logger.exception("metrics connection source failed")
            return families
        for name, load in sorted(listeners.items()):
            open_.add_metric((name,), load.open)
            limit.add_metric((name,), load.limit)
            for reason, n in sorted(load.refused.items()):
                refused.add_metric((name, reason), n)
        return families


class _LoadCollector:
    """The gauges, read from ``Metrics.load`` when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "phloem_isolates", "Running isolates (processes) per function.", labels=_FUNCTION
            ),
            GaugeMetricFamily(
                "phloem_inflight_requests",
                "Requests being handled that are not streams, per function.",
                labels=_FUNCTION,
            ),
            GaugeMetricFamily(
                "phloem_open_streams",
                "Open SSE responses and WebSocket tunnels per function.",
                labels=_FUNCTION,
            ),
        )

    def describe(self) -> Iterable[Metric]:
        # Names only, so the registry can refuse a clashing metric; never calls the source.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        isolates, inflight, streams = families = self._families()
        source = self._metrics.load
        if source is None:
            return families
        try:
            loads = dict(source())
        except Exception:
            # A broken source must not fail the whole scrape: the counters still matter.
            logger.exception("metrics load source failed")
            return families
        for (branch, function), load in sorted(loads.items()):
            labels = (branch, function)
            isolates.add_metric(labels, load.isolates)
            inflight.add_metric(labels, load.inflight)
            streams.add_metric(labels, load.open_streams)
        return families


class _Count:
    """One status's requests of one function, and when it was first seen."""

    __slots__ = ("created", "n")

    def __init__(self) -> None:
        self.n = 0
        self.created = time.time()


class FunctionRequests:
    """One function's request series: a count per status, and its request durations as a
    count per bucket (not cumulative; the last one is ``+Inf``) and their sum. The request
    observer keeps one per Host (see :meth:`Metrics.requests_of`), so counting a request
    builds no key.

        metrics.requests_of("br-quiet-moon-3f9a2c", "todos").observe(200, 0.004, False)
    """

    __slots__ = ("buckets", "created", "statuses", "total")

    def __init__(self) -> None:
        self.statuses: dict[int, _Count] = {}
        self.buckets = [0] * (len(REQUEST_BUCKETS) + 1)
        self.total = 0.0
        self.created = time.time()

    def observe(self, status: int, duration_s: float, stream: bool) -> None:
        """Count one finished exchange. A stream's duration is its lifetime, not a
        latency, so streams are counted but kept out of the duration histogram."""
        count = self.statuses.get(status)
        if count is None:
            count = self.statuses[status] = _Count()
        count.n += 1
        if not stream:
            self.buckets[_bucket(duration_s)] += 1
            self.total += duration_s


def _bucket(duration_s: float) -> int:
    """The index of the first bucket whose bound is at least ``duration_s`` (its ``le`` is
    <=), ``len(REQUEST_BUCKETS)`` for ``+Inf``: as ``bisect.bisect_left``, which costs more
    for the short durations almost every request has (a call, a boxed float, a generic
    comparison per step; compiled, this loop compares doubles from the lowest bound up)."""
    i = 0
    for bound in REQUEST_BUCKETS:
        if duration_s <= bound:
            return i
        i += 1
    return i


_LE: list[str] = [*(floatToGoString(b) for b in REQUEST_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]


class _RequestCollector:
    """``phloem_requests_total`` and ``phloem_request_duration_seconds``, from plain
    counts (see the module docstring)."""

    def __init__(self) -> None:
        self.functions: dict[tuple[str, str], FunctionRequests] = {}

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "phloem_requests_total",
                "Requests answered, by status (499: the client left; 0: nothing could be sent).",
                labels=(*_FUNCTION, "status"),
            ),
            HistogramMetricFamily(
                "phloem_request_duration_seconds",
                "Time from the request head to the end of the response (streams excluded).",
                labels=_FUNCTION,
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        requests, durations = families = self._families()
        functions = sorted(self.functions.items())
        for (branch, function), t in functions:
            for status, count in sorted(t.statuses.items()):
                requests.add_metric((branch, function, str(status)), count.n,
                                    created=count.created)
        for (branch, function), t in functions:
            if not any(t.buckets):
                continue  # streams only: no durations to show
            cumulative, running = [], 0
            for le, n in zip(_LE, t.buckets, strict=True):
                running += n
                cumulative.append((le, float(running)))
            durations.add_metric((branch, function), cumulative, t.total)
            labels = {"branch": branch, "function": function}
            durations.samples.append(
                Sample("phloem_request_duration_seconds_created", labels, t.created)
            )
        return families


class Metrics:
    """phloem's Prometheus metrics, in a registry of their own."""

    def __init__(self, load: LoadSource | None = None,
                 connections: ConnectionSource | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Settable later: the platform may build its supervisor after its metrics.
        self.load = load
        self.connections = connections
        r = self.registry
        self._request_series = _RequestCollector()
        r.register(self._request_series)
        self._cold_starts = Counter(
            "phloem_cold_starts_total", "Isolates started for a function.", _FUNCTION, registry=r
        )
        self._cold_start_seconds = Histogram(
            "phloem_cold_start_seconds",
            "Time from spawning an isolate until it is ready to serve.",
            _FUNCTION,
            buckets=COLD_START_BUCKETS,
            registry=r,
        )
        self._evictions = Counter(
            "phloem_evictions_total",
            "Isolates stopped by the platform, by reason (idle, memory, drained, ...).",
            (*_FUNCTION, "reason"),
            registry=r,
        )
        r.register(_LoadCollector(self))
        r.register(_ConnectionCollector(self))

    def requests_of(self, branch: str, function: str) -> FunctionRequests:
        """The function's request series (made on its first request)."""
        functions = self._request_series.functions
        series = functions.get((branch, function))
        if series is None:
            series = functions[(branch, function)] = FunctionRequests()
        return series

    def observe_cold_start(self, branch: str, function: str, seconds: float) -> None:
        self._cold_starts.labels(branch, function).inc()
        self._cold_start_seconds.labels(branch, function).observe(seconds)

    def observe_eviction(self, branch: str, function: str, reason: str) -> None:
        self._evictions.labels(branch, function, reason).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its Content-Type. ``accept`` is the scraper's Accept
        header: OpenMetrics when it asks for it, else the classic text format (0.0.4)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
