"""Metric families on the server's /metrics endpoint, updated at a bounded rate.
"""

from __future__ import annotations

import time


class Gauges:
    """Sets gauges of `metrics` (name -> pb Metric), skipping a value the gauge already shows:
    each set is a round trip between the stub and the server."""

    def __init__(self, metrics: dict):
        self.metrics = metrics
        self.sent: dict[str, float] = {}

    def set(self, name: str, value) -> None:
        if self.sent.get(name) != value:
            self.metrics[name].set(value)
            self.sent[name] = value

class EngineMetrics:
    """The engine's counters and gauges on Triton's /metrics endpoint, sent at most once per
    `period` seconds and whenever the engine goes idle (each update is a round trip to the
    server, ~27 us; seven per step cost ~1% of a batch-8 decode step and sat on its path).
    Like the tensorrtllm backend's `stats_check_period_ms`."""

    COUNTERS = {
        "steps": "engine steps (forward passes)",
        "batched_steps": "engine steps that advanced more than one sequence",
        "prompt_tokens": "prompt tokens prefilled",
        "generated_tokens": "tokens generated",
    }
    GAUGES = {
        "running_sequences": "sequences in the running batch",
        "waiting_requests": "requests waiting for a place in the batch",
        "last_step_sequences": "sequences advanced by the last step",
    }

    # the engine's prefix cache (engine.prefix): counters from its totals, and its bytes
    PREFIX_COUNTERS = {
        "hit_tokens": "prompt tokens whose KV came from the prefix cache",
        "miss_tokens": "prompt tokens prefilled while the prefix cache is on",
        "evictions": "prefix cache entries evicted for room",
    }

    def __init__(self, pb, labels: dict[str, str], period: float, clock=time.monotonic):
        self.families, self.metrics = {}, {}
        for name, help_text in self.PREFIX_COUNTERS.items():
            key = f"prefix_{name}"
            self.families[key] = pb.MetricFamily(f"qwen3vl_prefix_cache_{name}_total", help_text,
                                                 pb.MetricFamily.COUNTER)
            self.metrics[key] = self.families[key].Metric(labels=labels)
        self.families["prefix_bytes"] = pb.MetricFamily(
            "qwen3vl_prefix_cache_bytes", "bytes of KV the prefix cache holds", pb.MetricFamily.GAUGE)
        self.metrics["prefix_bytes"] = self.families["prefix_bytes"].Metric(labels=labels)
        self.prefix_sent = dict.fromkeys(self.PREFIX_COUNTERS, 0)  # totals already counted
        self.prefix_totals: dict[str, int] = {}
        for kind, names, suffix in ((pb.MetricFamily.COUNTER, self.COUNTERS, "_total"),
                                    (pb.MetricFamily.GAUGE, self.GAUGES, "")):
            for name, help_text in names.items():
                self.families[name] = pb.MetricFamily(f"qwen3vl_engine_{name}{suffix}", help_text, kind)
                self.metrics[name] = self.families[name].Metric(labels=labels)
        self.period, self.clock = period, clock
        self._pb, self.labels = pb, labels
        self.last = clock()
        self.pending = dict.fromkeys(self.COUNTERS, 0)
        self.gauges: dict[str, int] = {}  # latest values, sent by flush
        self.sender = Gauges(self.metrics)

    def info(self, **labels: str) -> None:
        """`qwen3vl_engine_info{<model labels>, runner=..., dtype=...} 1`: which engine serves."""
        family = self.families["info"] = self._pb.MetricFamily(
            "qwen3vl_engine_info", "the engine that serves: runner (ggml, torch) and weights dtype",
            self._pb.MetricFamily.GAUGE)
        self.metrics["info"] = family.Metric(labels={**self.labels, **labels})
        self.metrics["info"].set(1)

    def on_step(self, report) -> None:
        """Engine callback (delivery thread). A report of no sequences: the engine went idle."""
        p = self.pending
        if report.sequences:
            p["steps"] += 1
            p["batched_steps"] += report.sequences > 1
            self.gauges["last_step_sequences"] = report.sequences
        p["prompt_tokens"] += report.prompt_tokens
        p["generated_tokens"] += report.generated
        self.gauges["running_sequences"] = report.running
        self.gauges["waiting_requests"] = report.waiting
        prefix = getattr(report, "prefix", None)
        if prefix is not None:
            self.prefix_totals = {name: getattr(prefix, name) for name in self.PREFIX_COUNTERS}
            self.gauges["prefix_bytes"] = prefix.bytes
        now = self.clock()
        if now - self.last >= self.period or (report.running == 0 and report.waiting == 0):
            self.flush(now)

    def flush(self, now: float) -> None:
        self.last = now
        for name in self.COUNTERS:
            if self.pending[name]:
                self.metrics[name].increment(self.pending[name])
                self.pending[name] = 0
        for name, total in self.prefix_totals.items():
            if total > self.prefix_sent[name]:
                self.metrics[f"prefix_{name}"].increment(total - self.prefix_sent[name])
                self.prefix_sent[name] = total
        for name, value in self.gauges.items():
            self.sender.set(name, value)

    def close(self) -> None:
        # A Metric must go before its MetricFamily: left to interpreter teardown, the order is
        # arbitrary and the stub crashes on exit.
        self.metrics.clear()
        self.families.clear()
