"""Prometheus metrics for ``GET /metrics`` (prometheus_client, one registry per app).

Counters by mode: requests (by HTTP status), prompt and generated tokens, nfe. Histograms
by mode: tokens_per_forward and acceptance_length per choice, time to first token and
end-to-end latency (seconds). Gauges read from ``engine.stats()`` at scrape time: running
and waiting requests (the queue), KV rows, tokens and pages in use, cached and in total, the
prefix cache's hit rate; counters from it: page evictions, preemptions, prefix-cache
queried and hit prompt tokens (their ratio is the hit rate).

Step metrics, from every engine step's ``StepRecord`` (``engine/step_stats.py``, observed on
the engine's thread): step duration (seconds), rows and query tokens per step (histograms);
per mode and draft slot i, drafts proposed and accepted (slot i accepted / proposed is the
chance the first i drafts all pass); the ``auto`` controller's mode switches (from, to); and,
at scrape time, the engine-wide running draft acceptance per mode (a gauge, exponentially
weighted over recent verifies).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TPF_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
ACCEPT_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STATS = {"running": "requests being decoded", "waiting": "requests queued for a batch slot",
         "kv_rows_used": "KV pool rows in use", "kv_rows_total": "KV pool rows",
         "kv_tokens_used": "KV pool token slots in use", "kv_tokens_total": "KV pool token slots",
         "kv_pages_total": "KV pages", "kv_pages_used": "KV pages running requests read",
         "kv_pages_cached": "KV pages kept for the prefix cache (evictable)",
         "prefix_cache_hit_rate": "prompt tokens read from the prefix cache / prompt tokens"}
COUNTS = {"kv_page_evictions": "cached KV pages evicted for new pages",
          "preemptions": "requests preempted (KV freed, recomputed later)",
          "prefix_cache_queries": "prompt tokens of admitted requests",
          "prefix_cache_hits": "prompt tokens read from the prefix cache"}


class _EngineStats:
    """Collector: one gauge per ``engine.stats()`` key, read when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, text in STATS.items():
            if key in stats:
                gauge = GaugeMetricFamily(f"trimode_{key}", text)
                gauge.add_metric([], float(stats[key]))
                yield gauge
        for key, text in COUNTS.items():
            if key in stats:
                yield CounterMetricFamily(f"trimode_{key}", text, value=float(stats[key]))
        rates = getattr(getattr(self.engine, "engine", self.engine), "acceptance", None)
        if rates is not None:
            gauge = GaugeMetricFamily("trimode_draft_acceptance_rate", "running accepted / "
                                      "proposed drafts per mode (recent verifies)", labels=["mode"])
            for mode, rate in sorted(rates.rates().items()):
                gauge.add_metric([mode], rate)
            yield gauge


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("trimode_requests", "HTTP requests by mode and status",
                                ["endpoint", "mode", "status"], registry=r)
        self.prompt_tokens = Counter("trimode_prompt_tokens", "prompt tokens", ["mode"], registry=r)
        self.generation_tokens = Counter("trimode_generation_tokens", "tokens returned",
                                         ["mode"], registry=r)
        self.nfe = Counter("trimode_nfe", "model forwards taken part in", ["mode"], registry=r)
        self.tokens_per_forward = Histogram("trimode_tokens_per_forward", "per choice",
                                            ["mode"], buckets=TPF_BUCKETS, registry=r)
        self.acceptance_length = Histogram("trimode_acceptance_length",
                                           "per choice (speculative modes)", ["mode"],
                                           buckets=ACCEPT_BUCKETS, registry=r)
        self.ttft = Histogram("trimode_time_to_first_token_seconds", "first text sent",
                              ["mode"], buckets=TIME_BUCKETS, registry=r)
        self.latency = Histogram("trimode_e2e_latency_seconds", "request start to end",
                                 ["mode"], buckets=TIME_BUCKETS, registry=r)
        self.step_duration = Histogram("trimode_step_duration_seconds", "one engine step",
                                       buckets=STEP_BUCKETS, registry=r)
        self.step_rows = Histogram("trimode_step_rows", "requests in one step's forwards",
                                   buckets=COUNT_BUCKETS, registry=r)
        self.step_tokens = Histogram("trimode_step_query_tokens", "query tokens in one step's "
                                     "forwards (before padding)", buckets=COUNT_BUCKETS, registry=r)
        self.slot_proposed = Counter("trimode_draft_slot_proposed", "drafts verified at slot i",
                                     ["mode", "slot"], registry=r)
        self.slot_accepted = Counter("trimode_draft_slot_accepted", "drafts accepted at slot i",
                                     ["mode", "slot"], registry=r)
        self.switches = Counter("trimode_auto_mode_switches", "mode changes by the auto "
                                "controller", ["from_mode", "to_mode"], registry=r)
        r.register(_EngineStats(engine))
        observers = getattr(getattr(engine, "engine", engine), "step_observers", None)
        if observers is not None:
            observers.append(self.step)

    def step(self, record) -> None:
        """Record one engine step (a ``StepRecord``; called on the engine's thread)."""
        self.step_duration.observe(record.duration_s)
        self.step_rows.observe(record.rows)
        self.step_tokens.observe(record.query_tokens)
        for mode, slots in record.drafts.items():
            for i, (proposed, accepted) in enumerate(slots, start=1):
                self.slot_proposed.labels(mode, str(i)).inc(proposed)
                if accepted:
                    self.slot_accepted.labels(mode, str(i)).inc(accepted)
        for before, after in record.switches:
            self.switches.labels(before, after).inc()

    def choice(self, mode: str, n_tokens: int, metrics) -> None:
        """Record one finished choice; ``metrics`` is the engine's RequestMetrics or None."""
        self.generation_tokens.labels(mode).inc(n_tokens)
        if metrics is None:
            return
        self.nfe.labels(mode).inc(metrics.nfe)
        if metrics.nfe:
            self.tokens_per_forward.labels(mode).observe(metrics.tokens_per_forward)
        if metrics.acceptance_length is not None:
            self.acceptance_length.labels(mode).observe(metrics.acceptance_length)

    def render(self) -> bytes:
        return generate_latest(self.registry)
