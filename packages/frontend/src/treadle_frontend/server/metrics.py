"""Prometheus metrics (vLLM's names with the `treadle:` prefix, labelled model_name) and the stats log line.

The engine reports SchedulerStats with each step: gauges (running, waiting, KV usage) and cumulative counters
(prefix-cache queries/hits, preemptions, prompt/generation tokens); counters here advance by the difference
between successive reports. The frontend's IterationStats supply the latency histograms and finished-request
counts. Each server owns its registry, so several servers can live in one process (tests).

The periodic log line (every `interval` seconds while anything ran) gives prompt and generation throughput,
running / waiting requests, KV usage and the prefix-cache hit rate over the interval; with speculative decoding
a second line gives its acceptance (spec_metrics.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from treadle_engine_core.request import FinishReason
from treadle_frontend.output_processor import IterationStats
from treadle_frontend.server.spec_metrics import SpecDecodeMetrics, engine_stat

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_COUNTERS = {  # SchedulerStats cumulative field -> metric attribute
    "prefix_cache_queries": "prefix_cache_queries",
    "prefix_cache_hits": "prefix_cache_hits",
    "num_preemptions": "num_preemptions",
    "num_prompt_tokens": "prompt_tokens",
    "num_generation_tokens": "generation_tokens",
}


def length_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's buckets for the request-length histograms)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int = 8192, num_speculative_tokens: int = 0) -> None:
        """`num_speculative_tokens`: the engine's (0: no speculative decoding; its series then stay empty)."""
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, lab = self.registry, ["model_name"]
        self.num_requests_running = Gauge(
            "treadle:num_requests_running", "Requests in the running batch", lab, registry=r
        )
        self.num_requests_waiting = Gauge(
            "treadle:num_requests_waiting", "Requests waiting to be scheduled", lab, registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            "treadle:kv_cache_usage_perc", "KV-cache usage (1 = full)", lab, registry=r
        )
        self.prompt_tokens = Counter("treadle:prompt_tokens", "Prefill tokens processed", lab, registry=r)
        self.generation_tokens = Counter("treadle:generation_tokens", "Generated tokens", lab, registry=r)
        self.num_preemptions = Counter("treadle:num_preemptions", "Preemptions", lab, registry=r)
        self.prefix_cache_queries = Counter(
            "treadle:prefix_cache_queries", "Prefix-cache queried tokens", lab, registry=r
        )
        self.prefix_cache_hits = Counter(
            "treadle:prefix_cache_hits", "Prefix-cache hit tokens", lab, registry=r
        )
        self.request_success = Counter(
            "treadle:request_success", "Finished requests", ["model_name", "finished_reason"], registry=r
        )
        self.time_to_first_token_seconds = Histogram(
            "treadle:time_to_first_token_seconds",
            "Time to first token",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            "treadle:inter_token_latency_seconds",
            "Inter-token latency",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency_seconds = Histogram(
            "treadle:e2e_request_latency_seconds",
            "End-to-end request latency",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        lengths = length_buckets(
            max_model_len
        )  # finished requests' prompt and generated tokens (not aborted)
        self.request_prompt_tokens = Histogram(
            "treadle:request_prompt_tokens",
            "Prompt tokens per finished request",
            lab,
            buckets=lengths,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "treadle:request_generation_tokens", "Generated tokens per finished request", lab, buckets=lengths,
            registry=r,
        )  # fmt: skip
        # every series exists at 0 from the start (as vLLM's): dashboards and rate() see 0, not "no data"
        for metric in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                       self.prompt_tokens, self.generation_tokens, self.num_preemptions, self.prefix_cache_queries,
                       self.prefix_cache_hits, self.time_to_first_token_seconds, self.inter_token_latency_seconds,
                       self.e2e_request_latency_seconds, self.request_prompt_tokens,
                       self.request_generation_tokens):  # fmt: skip
            metric.labels(model_name)
        for reason in (str(r) for r in FinishReason):  # stop, length, abort, error
            self.request_success.labels(model_name, reason)
        self.spec = SpecDecodeMetrics(r, model_name, num_speculative_tokens)
        self._last: dict[str, float] = {}  # last cumulative engine counters
        self._engine_counts_tokens = False  # the engine reports token counters (else the frontend counts)
        self.window = _Window()

    def record(self, sched: Any, it: IterationStats) -> None:
        m = self.model_name
        if sched is not None:
            self.set_gauges(sched)
            self.spec.record(sched)
            for field_name, attr in _COUNTERS.items():
                value = engine_stat(sched, field_name, None)
                if value is None:
                    continue
                if field_name in ("num_prompt_tokens", "num_generation_tokens"):
                    self._engine_counts_tokens = True
                delta = value - self._last.get(field_name, 0)
                self._last[field_name] = value
                if delta > 0:
                    getattr(self, attr).labels(m).inc(delta)
                    self.window.add(field_name, delta)
        if not self._engine_counts_tokens:
            self.prompt_tokens.labels(m).inc(it.num_prompt_tokens)
            self.generation_tokens.labels(m).inc(it.num_generation_tokens)
            self.window.add("num_prompt_tokens", it.num_prompt_tokens)
            self.window.add("num_generation_tokens", it.num_generation_tokens)
        for v in it.time_to_first_tokens:
            self.time_to_first_token_seconds.labels(m).observe(v)
        for v in it.inter_token_latencies:
            self.inter_token_latency_seconds.labels(m).observe(v)
        for f in it.finished:
            if f.finish_reason != "abort":  # a client that gave up says nothing of how long a reply takes
                self.e2e_request_latency_seconds.labels(m).observe(f.e2e_latency)
                self.request_prompt_tokens.labels(m).observe(f.num_prompt_tokens)
                self.request_generation_tokens.labels(m).observe(f.num_generation_tokens)
            self.request_success.labels(m, f.finish_reason).inc()
        if it.num_generation_tokens or it.num_prompt_tokens or it.finished:
            self.window.busy = True

    def set_gauges(self, sched: Any) -> None:
        m = self.model_name
        running, waiting = engine_stat(sched, "num_running_reqs"), engine_stat(sched, "num_waiting_reqs")
        usage = float(engine_stat(sched, "kv_cache_usage", 0.0))
        self.num_requests_running.labels(m).set(running)
        self.num_requests_waiting.labels(m).set(waiting)
        self.kv_cache_usage_perc.labels(m).set(usage)
        self.window.last_gauges = (running, waiting, usage)
        if running or waiting:
            self.window.busy = True

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def log_line(self) -> str | None:
        """The stats line for the interval just ended, or None if the engine was idle throughout."""
        lines = self.log_lines()
        return lines[0] if lines else None

    def log_lines(self) -> list[str]:
        """The stats lines for the interval just ended: throughput and state (none if the engine was idle), then
        speculative decoding's acceptance (if anything was drafted)."""
        lines = [self.window.flush(), self.spec.log_line()]
        return [line for line in lines if line is not None]


class _Window:
    """Counts over one logging interval."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.counts: dict[str, float] = {}
        self.busy = False
        self.last_gauges: tuple[float, float, float] = (0, 0, 0.0)

    def add(self, name: str, delta: float) -> None:
        self.counts[name] = self.counts.get(name, 0) + delta

    def flush(self) -> str | None:
        now = time.monotonic()
        elapsed = max(now - self.start, 1e-6)
        busy, counts = self.busy, self.counts
        self.start, self.counts, self.busy = now, {}, bool(self.last_gauges[0] or self.last_gauges[1])
        if not busy:
            return None
        running, waiting, usage = self.last_gauges
        queries = counts.get("prefix_cache_queries", 0)
        hit_rate = 100.0 * counts.get("prefix_cache_hits", 0) / queries if queries else 0.0
        return (
            f"Avg prompt throughput: {counts.get('num_prompt_tokens', 0) / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {counts.get('num_generation_tokens', 0) / elapsed:.1f} tokens/s, "
            f"Running: {int(running)} reqs, Waiting: {int(waiting)} reqs, "
            f"KV cache usage: {100.0 * usage:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%"
        )
