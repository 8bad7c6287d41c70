"""/metrics: the engine's counters and latency histograms in Prometheus' text format, through prometheus_client.

Names follow vLLM's (`vllm:num_requests_running` is `llama_dist:num_requests_running` here) so its dashboards fit
with the prefix changed. Gauges and counters are read from the engine's metrics at scrape time; latencies are
observed into histograms as the engine records them (a listener on `EngineMetrics`), so nothing is lost between
scrapes. Each server gets its own registry: several in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llama_dist.engine.metrics import EngineMetrics

PREFIX = "llama_dist:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a fraction of a GPU decode step to a long CPU generation.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)

# EngineMetrics' latency deques -> (histogram name, help)
_HISTOGRAMS = {
    "time_to_first_token_s": ("time_to_first_token_seconds", "Time from arrival to the first generated token."),
    "inter_token_latency_s": ("inter_token_latency_seconds", "Time between consecutive tokens of a request."),
    "e2e_latency_s": ("e2e_request_latency_seconds", "Time from arrival to the end of a request."),
    "step_s": ("engine_step_seconds", "Time one engine step computes and samples."),
    "decode_step_s": ("engine_decode_step_seconds", "Time one engine step of decodes only computes and samples."),
}


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's metrics when scraped."""

    def __init__(self, metrics: EngineMetrics, model_name: str):
        self.metrics, self.model_name = metrics, model_name

    def collect(self):
        m, label = self.metrics, [self.model_name]
        gauges = (("num_requests_running", "Requests in the running batch.", m.num_running),
                  ("num_requests_waiting", "Requests waiting to start.", m.num_waiting),
                  ("kv_cache_usage_perc", "Share of the KV cache's blocks in use (1 = all).", m.cache_usage))
        counters = (("prompt_tokens", "Prompt tokens prefilled.", m.prompt_tokens),
                    ("generation_tokens", "Tokens generated.", m.generation_tokens),
                    ("request_success", "Requests finished.", m.finished_requests),
                    ("num_preemptions", "Sequences preempted (recomputed later) when the KV cache ran out.",
                     m.preemptions),
                    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m.prefix_cache_queries),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", m.prefix_cache_hits),
                    ("spec_decode_num_drafts", "Speculative rows verified (a sequence's guesses in one step).",
                     m.spec_drafts),
                    ("spec_decode_num_draft_tokens", "Tokens guessed by speculative decoding.", m.spec_draft_tokens),
                    ("spec_decode_num_accepted_tokens", "Guessed tokens the model agreed with (kept).",
                     m.spec_accepted_tokens))
        for name, help_text, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=["model_name"])
            family.add_metric(label, value)
            yield family
        for name, help_text, value in counters:
            family = CounterMetricFamily(PREFIX + name, help_text, labels=["model_name"])
            family.add_metric(label, value)
            yield family


class ServerMetrics:
    """The registry behind /metrics for one engine: `render()` is the response body."""

    def __init__(self, metrics: EngineMetrics, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(metrics, model_name))
        self._histograms = {
            key: Histogram(PREFIX + name, help_text, ["model_name"], registry=self.registry,
                           buckets=_LATENCY_BUCKETS).labels(model_name)
            for key, (name, help_text) in _HISTOGRAMS.items()
        }
        metrics.listeners.append(self._observe)

    def _observe(self, name: str, seconds: float) -> None:
        histogram = self._histograms.get(name)
        if histogram is not None:
            histogram.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
