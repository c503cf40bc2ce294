"""The server's Prometheus metrics (GET /metrics, text format), through `prometheus_client`.

    realm_requests_total{tenant, model, endpoint, finish_reason}   generations that ended
    realm_prompt_tokens_total{tenant, model}                       prompt tokens (once per request)
    realm_completion_tokens_total{tenant, model}                   generated tokens (every choice)
    realm_time_to_first_token_seconds{tenant, model}               histogram: admission -> first token
    realm_request_latency_seconds{tenant, model}                   histogram: admission -> last choice ends
    realm_queue_depth{model}, realm_running_sequences{model}       read from each scheduler when scraped

Each Service has its own registry, so two services in one process (tests) never share counts. A
tenant's scrape shows its own series and the gauges of the models it may use, never another
tenant's (`text(tenant, models)`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from realm_wasm.scheduler import Finished

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: a decode step on the H200 is ~1 ms, a long prompt on 2 CPU cores tens of seconds
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Schedulers(Collector):
    """Queue depth and running sequences of every model's scheduler, read at scrape time."""

    def __init__(self, workers: Mapping[str, Any]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily("realm_queue_depth", "Requests waiting for a KV slot", labels=["model"])
        running = GaugeMetricFamily("realm_running_sequences", "Sequences holding a KV slot", labels=["model"])
        for name, worker in self.workers.items():
            stats = worker.scheduler.stats()
            queued.add_metric([name], stats.queued)
            running.add_metric([name], stats.running)
        yield queued
        yield running


class Metrics:
    """Counters and histograms of one Service; `request()` observes one generation."""

    def __init__(self, workers: Mapping[str, Any]) -> None:
        self.registry = CollectorRegistry()
        who = ("tenant", "model")
        self.requests = Counter("realm_requests", "Generations that ended, by how",
                                (*who, "endpoint", "finish_reason"), registry=self.registry)
        self.prompt_tokens = Counter("realm_prompt_tokens", "Prompt tokens", who, registry=self.registry)
        self.completion_tokens = Counter("realm_completion_tokens", "Generated tokens", who, registry=self.registry)
        self.ttft = Histogram("realm_time_to_first_token_seconds", "From admission to the first generated token",
                              who, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("realm_request_latency_seconds", "From admission to the end of the last choice",
                                 who, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_Schedulers(workers))

    def request(self, tenant: str, model: str, endpoint: str) -> RequestObserver:
        return RequestObserver(self, tenant, model, endpoint)

    def text(self, tenant: str, may_use_model: Callable[[str], bool]) -> bytes:
        """The Prometheus text of what `tenant` may see."""
        return generate_latest(_TenantView(self.registry, tenant, may_use_model))


class _TenantView(Collector):
    """The registry's samples labelled with `tenant` (or with no tenant, of a model it may use)."""

    def __init__(self, registry: CollectorRegistry, tenant: str, may_use_model: Callable[[str], bool]) -> None:
        self.registry, self.tenant, self.may_use_model = registry, tenant, may_use_model

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():  # fresh Metric objects on every collect: ours to trim
            family.samples = [s for s in family.samples if s.labels.get("tenant", self.tenant) == self.tenant
                              and self.may_use_model(s.labels.get("model", ""))]
            yield family


class RequestObserver:
    """What one generation adds to the metrics, as its events arrive (on the event loop)."""

    def __init__(self, metrics: Metrics, tenant: str, model: str, endpoint: str) -> None:
        self.metrics, self.labels, self.endpoint = metrics, (tenant, model), endpoint
        self.t0 = time.perf_counter()
        self.seen_first = False

    def first_token(self) -> None:
        if not self.seen_first:
            self.seen_first = True
            self.metrics.ttft.labels(*self.labels).observe(time.perf_counter() - self.t0)

    def finished(self, event: Finished, count_prompt: bool, last: bool) -> None:
        m = self.metrics
        if count_prompt:
            m.prompt_tokens.labels(*self.labels).inc(event.prompt_tokens)
        m.completion_tokens.labels(*self.labels).inc(event.completion_tokens)
        if last:
            m.requests.labels(*self.labels, self.endpoint, event.reason).inc()
            m.latency.labels(*self.labels).observe(time.perf_counter() - self.t0)
