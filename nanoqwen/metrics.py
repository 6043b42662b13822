"""The server's Prometheus metrics (`GET /metrics`), through prometheus-client, in a registry of its own per app.

Counted by the HTTP side: requests per endpoint, prompt and generated tokens, time to first token. Read from the
engine when scraped: requests waiting for a row (queue depth), rows decoding, KV blocks in use and in the pool, and
the prefix cache's blocks looked up and found (their ratio is the hit rate). Names follow vLLM's where they exist.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, loop):
        """loop: the server's EngineLoop (its queue, running rows and engine are read at each scrape)."""
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("nanoqwen_requests", "HTTP generation requests", ["endpoint"], registry=registry)
        self.prompt_tokens = Counter("nanoqwen_prompt_tokens", "prompt tokens of the requests", registry=registry)
        self.generation_tokens = Counter("nanoqwen_generation_tokens", "tokens generated", registry=registry)
        self.time_to_first_token = Histogram("nanoqwen_time_to_first_token_seconds",
                                             "from a request's arrival to its first token", buckets=TTFT_BUCKETS,
                                             registry=registry)
        pool = loop.engine.cache.pool
        gauges = {
            "nanoqwen_queue_depth": ("requests waiting for a row", lambda: len(loop.waiting)),
            "nanoqwen_running_rows": ("requests being decoded", lambda: len(loop.running)),
            "nanoqwen_kv_blocks_used": ("KV-cache blocks held by rows", lambda: pool.used),
            "nanoqwen_kv_blocks_total": ("KV-cache blocks in the pool", lambda: pool.num_blocks - 1),
            "nanoqwen_prefix_cache_queried_blocks": ("full prompt blocks looked up", lambda: pool.queried),
            "nanoqwen_prefix_cache_hit_blocks": ("full prompt blocks found cached", lambda: pool.hit),
            "nanoqwen_prefix_cache_hit_rate": ("found / looked-up prompt blocks (0 before any)",
                                               lambda: pool.hit / pool.queried if pool.queried else 0.0),
        }
        for name, (description, read) in gauges.items():
            Gauge(name, description, registry=registry).set_function(read)

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
