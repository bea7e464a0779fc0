"""Prometheus metrics of the router, per strategy and per drafter."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("taps_requests", "finished requests", ["strategy"], registry=r)
        self.tokens = Counter("taps_generated_tokens", "generated tokens", ["strategy"], registry=r)
        self.steps = Counter("taps_steps", "verifier steps", ["strategy"], registry=r)
        self.step_tokens = Counter("taps_step_tokens", "tokens emitted by steps (tau numerator)", ["strategy"],
                                   registry=r)
        self.draft_tokens = Counter("taps_draft_tokens_verified", "draft nodes verified", ["strategy"], registry=r)
        self.selected = Counter("taps_drafter_selected", "steps won by a drafter's tree", ["drafter", "strategy"],
                                registry=r)
        self.drafter_errors = Counter("taps_drafter_errors", "drafter calls left out of a step", ["drafter"],
                                      registry=r)
        self.rejected = Counter("taps_rejected_requests", "requests refused with 429 (queue full)", registry=r)
        self.acceptance = Histogram("taps_acceptance_length", "acceptance length per request", ["strategy"],
                                    buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8), registry=r)
        self.latency = Histogram("taps_request_seconds", "request latency", ["strategy"], registry=r)

    def observe(self, stats) -> None:
        s = stats.strategy
        self.requests.labels(s).inc()
        self.tokens.labels(s).inc(stats.new_tokens)
        self.steps.labels(s).inc(stats.steps)
        self.step_tokens.labels(s).inc(stats.step_tokens)
        self.draft_tokens.labels(s).inc(stats.draft_tokens_verified)
        for name, n in stats.selected.items():
            self.selected.labels(name, s).inc(n)
        if stats.steps:
            self.acceptance.labels(s).observe(stats.acceptance_length)
        self.latency.labels(s).observe(stats.total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
