"""Prometheus metrics of one data plane, in its own registry (no process-global state).

Besides loraplane's own series, the engine state is also exported under vLLM's names and
labels, so LoRA-affinity routers built for vLLM (Gateway API Inference Extension, llm-d)
read a loraplane replica unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from data_plane.server.engine_loop import EngineStats

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _adapter_name(key: str) -> str:
    return key.split("@", 1)[0]


class _EngineCollector:
    """Gauges read from the engine loop's latest snapshot at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model: str, max_loras: int):
        self.stats = stats
        self.model = model
        self.max_loras = max_loras

    def collect(self):
        s = self.stats()
        for name, doc, value in (
            ("loraplane_requests_running", "Requests running in the engine.", s.running),
            ("loraplane_requests_waiting", "Requests waiting to be scheduled.", s.waiting),
            ("loraplane_kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", s.kv_usage),
            ("loraplane_lora_free_slots", "GPU LoRA slots holding no adapter.", s.free_slots),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", s.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model], value)
            yield g
        for name, doc, value in (
            ("loraplane_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("loraplane_prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             s.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", s.prefix_cache_hits),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model], value)
            yield c
        # vLLM's form: the value is a timestamp, the adapters are comma-joined label values.
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(sorted({_adapter_name(k) for k in s.running_adapters})),
                         ",".join(dict.fromkeys(_adapter_name(k) for k in s.waiting_adapters)),
                         str(self.max_loras)], time.time())
        yield info


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], model: str, max_loras: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram("loraplane_request_duration_seconds", "Generate call duration.",
                                         ["finish_reason"], buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram("loraplane_request_queue_seconds",
                                       "Time from arrival to the first scheduled step (adapter loading included).",
                                       buckets=_LATENCY, registry=r)
        self.ttft_seconds = Histogram("loraplane_time_to_first_token_seconds", "Time to first token.",
                                      buckets=_LATENCY, registry=r)
        self.itl_seconds = Histogram("loraplane_inter_token_latency_seconds", "Time between streamed tokens.",
                                     buckets=_LATENCY, registry=r)
        self.adapter_requests = Counter("loraplane_adapter_requests_total", "Generate requests per adapter.",
                                        ["adapter"], registry=r)
        self.cache_lookups = Counter("loraplane_adapter_cache_lookups_total", "Adapter cache lookups per tier.",
                                     ["tier", "result"], registry=r)
        self.load_seconds = Histogram("loraplane_adapter_load_seconds",
                                      "Time to bring an adapter into a tier, by where it came from.",
                                      ["source"], buckets=_LATENCY, registry=r)
        self.evictions = Counter("loraplane_adapter_evictions_total", "Adapters evicted per tier.", ["tier"],
                                 registry=r)
        r.register(_EngineCollector(stats, model, max_loras))

    def cache_lookup(self, tier: str, hit: bool) -> None:
        self.cache_lookups.labels(tier, "hit" if hit else "miss").inc()

    def adapter_loaded(self, source: str, seconds: float) -> None:
        self.load_seconds.labels(source).observe(seconds)

    def evicted(self, tier: str) -> None:
        self.evictions.labels(tier).inc()

    def promoted(self, key: str, seconds: float, victim: str | None) -> None:
        self.load_seconds.labels("cpu").observe(seconds)
        if victim is not None:
            self.evicted("gpu")

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Expose /metrics over HTTP; returns (server, thread) so the caller can shut it down."""
        return start_http_server(port, addr=addr, registry=self.registry)
