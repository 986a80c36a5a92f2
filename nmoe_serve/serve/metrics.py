"""Metrics through ray.util.metrics, named like vLLM's so existing dashboards translate.

Ray exports them on its Prometheus endpoint with a `ray_` prefix (e.g.
`ray_nmoe_time_to_first_token_seconds_bucket`) and the Ray dashboard shows them. Created inside
the replicas that record them (the ingress: latencies and errors; the coordinator: the engine).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from nmoe_serve.engine.coordinator import StepReport

LATENCY_BUCKETS = [
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    8.0,
    12.0,
    20.0,
    40.0,
    80.0,
]
STEP_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0]


class FrontendMetrics:
    def __init__(self, model: str) -> None:
        tags = ("model",)
        self.model = {"model": model}
        self.ttft = Histogram(
            "nmoe_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS, tags
        )
        self.itl = Histogram(
            "nmoe_inter_token_latency_seconds", "Time between streamed tokens", LATENCY_BUCKETS, tags
        )
        self.e2e = Histogram(
            "nmoe_e2e_request_latency_seconds", "Request latency, end to end", LATENCY_BUCKETS, tags
        )
        self.errors = Counter(
            "nmoe_request_errors_total", "Requests answered with an error", ("model", "status")
        )
        for m in (self.ttft, self.itl, self.e2e):
            m.set_default_tags(self.model)

    def error(self, status: int) -> None:
        self.errors.inc(1, {"model": self.model["model"], "status": str(status)})


class EngineMetrics:
    def __init__(self, model: str, group: str) -> None:
        tags = ("model", "group")
        self.tags = {"model": model, "group": group}
        self.running = Gauge("nmoe_num_requests_running", "Requests on the ranks", tags)
        self.waiting = Gauge("nmoe_num_requests_waiting", "Requests queued for admission", tags)
        self.kv_usage = Gauge("nmoe_kv_cache_usage_perc", "Fraction of KV pages in use (0-1)", tags)
        self.prompt_tokens = Counter("nmoe_prompt_tokens_total", "Prompt tokens admitted", tags)
        self.generation_tokens = Counter("nmoe_generation_tokens_total", "Tokens generated", tags)
        self.step_seconds = Histogram(
            "nmoe_step_seconds",
            "Time of one global step on the ranks",
            STEP_BUCKETS,
            ("model", "group", "kind"),
        )
        self.preemptions = Counter("nmoe_preemptions_total", "Requests preempted (recomputed later)", tags)
        self.cache_queries = Counter(
            "nmoe_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", tags
        )
        self.cache_hits = Counter(
            "nmoe_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (not computed)", tags
        )
        # speculative decoding, named like vLLM's spec_decode metrics; the acceptance rate is
        # accepted / draft tokens and the mean accepted length 1 + accepted / drafts (per step)
        self.spec_drafts = Counter(
            "nmoe_spec_decode_num_drafts_total", "Sequence-steps whose drafts were verified", tags
        )
        self.spec_draft_tokens = Counter(
            "nmoe_spec_decode_num_draft_tokens_total", "Draft tokens verified", tags
        )
        self.spec_accepted_tokens = Counter(
            "nmoe_spec_decode_num_accepted_tokens_total", "Draft tokens accepted", tags
        )
        self.spec_acceptance_rate = Gauge(
            "nmoe_spec_decode_acceptance_rate", "Draft tokens accepted / verified, since the start", tags
        )
        self.spec_mean_accepted_length = Gauge(
            "nmoe_spec_decode_mean_accepted_length",
            "Tokens a sequence gets per verify step (1 + accepted drafts), since the start",
            tags,
        )
        for m in (
            self.running,
            self.waiting,
            self.kv_usage,
            self.prompt_tokens,
            self.generation_tokens,
            self.preemptions,
            self.cache_queries,
            self.cache_hits,
            self.spec_drafts,
            self.spec_draft_tokens,
            self.spec_accepted_tokens,
            self.spec_acceptance_rate,
            self.spec_mean_accepted_length,
        ):
            m.set_default_tags(self.tags)
        self._preemptions_seen = 0
        self._cache_seen = (0, 0)  # (queries, hits) counted so far
        self._spec_seen = (0, 0, 0)  # (drafts, draft tokens, accepted) counted so far

    def idle(self, stats: dict[str, float]) -> None:
        """Set the gauges from the coordinator's counters (between steps, or with no step at all:
        an exporter drops a gauge nobody has set for a while)."""
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_usage"])

    def after_step(self, report: StepReport) -> None:
        self.step_seconds.observe(report.seconds, {**self.tags, "kind": report.kind})
        if report.tokens:
            self.generation_tokens.inc(report.tokens)
        self.running.set(report.running)
        self.waiting.set(report.waiting)
        self.kv_usage.set(report.kv_usage)
        if report.preemptions > self._preemptions_seen:
            self.preemptions.inc(report.preemptions - self._preemptions_seen)
            self._preemptions_seen = report.preemptions
        queries, hits = self._cache_seen
        if report.cache_queries > queries:
            self.cache_queries.inc(report.cache_queries - queries)
        if report.cache_hits > hits:
            self.cache_hits.inc(report.cache_hits - hits)
        self._cache_seen = (report.cache_queries, report.cache_hits)
        self._speculative(report)

    def _speculative(self, report: StepReport) -> None:
        seen = self._spec_seen
        now = (report.spec_drafts, report.spec_draft_tokens, report.spec_accepted_tokens)
        if now == seen:
            return
        for counter, before, after in zip(
            (self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens), seen, now, strict=True
        ):
            if after > before:
                counter.inc(after - before)
        self._spec_seen = now
        drafts, draft_tokens, accepted = now
        if draft_tokens:
            self.spec_acceptance_rate.set(accepted / draft_tokens)
            self.spec_mean_accepted_length.set(1 + accepted / drafts)
