"""Speculative-decoding metrics: vLLM's spec_decode counters (with the `treadle:` prefix) and its log line.

The engine's SchedulerStats carry cumulative counts (engine_core/spec_decode.py): drafts (a request's drafts
verified in one step), draft tokens, accepted draft tokens, and accepted tokens per draft position. The counters
advance by the difference between successive reports, like the other engine counters (metrics.py). Over each
logging interval with drafts the log line gives, as vLLM's does: the mean acceptance length (1 + accepted /
drafts: tokens a verification step yields per request), accepted and drafted throughput, the totals, the
acceptance rate per draft position (accepted at that position / drafts) and the draft acceptance rate.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter


def engine_stat(stats: Any, name: str, default: Any = 0) -> Any:
    """A field of the engine's SchedulerStats, as the object or its dict (an engine process's), else `default`."""
    if stats is None:
        return default
    if isinstance(stats, dict):
        return stats.get(name, default)
    return getattr(stats, name, default)


class SpecDecodeMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, num_speculative_tokens: int = 0) -> None:
        self.model_name = model_name
        lab = ["model_name"]
        self.num_drafts = Counter(
            "treadle:spec_decode_num_drafts", "Speculative verifications (a request's drafts in one step)", lab,
            registry=registry,
        )  # fmt: skip
        self.num_draft_tokens = Counter(
            "treadle:spec_decode_num_draft_tokens", "Draft tokens verified", lab, registry=registry
        )
        self.num_accepted_tokens = Counter(
            "treadle:spec_decode_num_accepted_tokens", "Draft tokens accepted", lab, registry=registry
        )
        self.num_accepted_tokens_per_pos = Counter(
            "treadle:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, per draft position",
            ["model_name", "position"], registry=registry,
        )  # fmt: skip
        self._counters = {  # SchedulerStats field -> its counter
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
        }
        if num_speculative_tokens:  # with speculation on, every series exists at 0 from the start
            for counter in self._counters.values():
                counter.labels(model_name)
            for pos in range(num_speculative_tokens):
                self.num_accepted_tokens_per_pos.labels(model_name, str(pos))
        self._last: dict[str, int] = {}  # the engine's last cumulative counts
        self._last_per_pos: list[int] = []
        self._start = time.monotonic()  # the logging interval's
        self._window: dict[str, int] = {}
        self._window_per_pos: list[int] = []

    def record(self, stats: Any) -> None:
        m = self.model_name
        for name, counter in self._counters.items():
            value = int(engine_stat(stats, name, 0) or 0)
            delta = value - self._last.get(name, 0)
            self._last[name] = value
            if delta > 0:
                counter.labels(m).inc(delta)
                self._window[name] = self._window.get(name, 0) + delta
        per_pos = list(engine_stat(stats, "spec_num_accepted_tokens_per_pos", None) or [])
        last, window = self._last_per_pos, self._window_per_pos
        for pos, value in enumerate(per_pos):
            if pos >= len(last):
                last.append(0)
            if pos >= len(window):
                window.append(0)
            delta = value - last[pos]
            last[pos] = value
            if delta > 0:
                self.num_accepted_tokens_per_pos.labels(m, str(pos)).inc(delta)
                window[pos] += delta

    def log_line(self) -> str | None:
        """vLLM's "SpecDecoding metrics" line for the interval just ended, or None if nothing was drafted."""
        now = time.monotonic()
        elapsed = max(now - self._start, 1e-6)
        counts, per_pos = self._window, self._window_per_pos
        self._start, self._window, self._window_per_pos = now, {}, [0] * len(per_pos)
        drafts = counts.get("spec_num_drafts", 0)
        if not drafts:
            return None
        drafted = counts.get("spec_num_draft_tokens", 0)
        accepted = counts.get("spec_num_accepted_tokens", 0)
        rates = ", ".join(f"{n / drafts:.3f}" for n in per_pos)
        return (
            f"SpecDecoding metrics: Mean acceptance length: {1 + accepted / drafts:.2f}, "
            f"Accepted throughput: {accepted / elapsed:.2f} tokens/s, "
            f"Drafted throughput: {drafted / elapsed:.2f} tokens/s, "
            f"Accepted: {accepted} tokens, Drafted: {drafted} tokens, "
            f"Per-position acceptance rate: {rates}, "
            f"Avg Draft acceptance rate: {100.0 * accepted / max(drafted, 1):.1f}%"
        )
