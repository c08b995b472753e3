"""Prometheus metrics of one server: request counts by status, tokens, latency histograms, and engine gauges.

Each server has its own registry (several servers may live in one process, e.g. in tests). Engine gauges are
read from `LLMEngine.stats()` at scrape time, so they are never stale.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from novallm_jax.engine.request import RequestOutput

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for name, key, doc in (
            ("novallm_requests_running", "running", "Requests holding a decode slot."),
            ("novallm_requests_waiting", "waiting", "Requests queued for admission."),
            ("novallm_requests_swapped", "swapped", "Preempted requests swapped to the host."),
            ("novallm_kv_pages_used", "kv_pages_used", "KV-cache pages in use."),
            ("novallm_kv_pages_free", "kv_pages_free", "KV-cache pages free."),
            ("novallm_prefix_cache_pages", "prefix_cache_pages", "Pages held by the prefix cache."),
            (
                "novallm_prefix_cache_hit_rate",
                "prefix_cache_hit_rate",
                "Fraction of looked-up prompt pages found in the prefix cache.",
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=float(s.get(key, 0) or 0))
        yield CounterMetricFamily(
            "novallm_preemptions",
            "Requests preempted for KV pages (swapped or recomputed).",
            value=s.get("preemptions", 0),
        )


class ServerMetrics:
    """The metrics one server exports on /metrics."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "novallm_requests",
            "Finished API requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "novallm_prompt_tokens", "Prompt tokens of admitted requests.", registry=self.registry
        )
        self.generated_tokens = Counter("novallm_generation_tokens", "Tokens generated.", registry=self.registry)
        self.finished = Counter(
            "novallm_sequences_finished", "Finished sequences by finish reason.", ["reason"], registry=self.registry
        )
        self.ttft = Histogram(
            "novallm_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.draft_tokens = Counter(
            "novallm_spec_decode_draft_tokens", "Tokens drafted by speculative decoding.", registry=self.registry
        )
        self.accepted_tokens = Counter(
            "novallm_spec_decode_accepted_tokens",
            "Drafted tokens the model accepted (their ratio to drafted: acceptance rate).",
            registry=self.registry,
        )
        self.tpot = Histogram(
            "novallm_time_per_output_token_seconds",
            "Mean time per generated token after the first, per sequence.",
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe_sequence(self, out: RequestOutput) -> None:
        """Records one finished sequence (its final output)."""
        m = out.metrics
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generated_tokens.inc(len(out.token_ids))
        self.draft_tokens.inc(m.draft_tokens)
        self.accepted_tokens.inc(m.accepted_tokens)
        if out.finish_reason is not None:
            self.finished.labels(out.finish_reason.value).inc()
        if m.first_token is not None:
            self.ttft.observe(max(0.0, m.first_token - m.arrival))
            if m.finished is not None and len(out.token_ids) > 1:
                self.tpot.observe(max(0.0, (m.finished - m.first_token) / (len(out.token_ids) - 1)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
