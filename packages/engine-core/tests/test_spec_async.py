"""Speculative decoding under async scheduling, driven by the fake runner: the engine schedules ahead only while no
step with drafts is in flight and the proposer finds nothing to draft (core.py), and the output stays the fake
model's."""

from __future__ import annotations

import pytest
from engine_core_harness import expected_output, make_engine
from test_spec_scheduler import _check_counts, _run

from treadle_engine_core.config import FakeRunnerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import EngineCoreRequest
from treadle_model_runner import SamplingParams, SchedulerOutput
from treadle_model_runner.config import SpeculativeConfig


class _QueueWatch:
    """Wraps an engine's execute_async: per submitted step, (steps in flight, any of them with drafts, it has
    drafts)."""

    def __init__(self, engine: EngineCore) -> None:
        self.log: list[tuple[int, bool, bool]] = []
        submit = engine.executor.execute_async

        def watched(so: SchedulerOutput) -> object:
            queue = engine._batch_queue
            in_flight_drafts = any(q.scheduled_spec_decode_tokens for q, _ in queue)
            self.log.append((len(queue), in_flight_drafts, bool(so.scheduled_spec_decode_tokens)))
            return submit(so)

        engine.executor.execute_async = watched  # type: ignore[method-assign]


@pytest.mark.parametrize("repeat_period", [6, 0])
def test_async_scheduling_with_speculation(repeat_period: int) -> None:
    """Async scheduling with drafts: the tokens are the fake model's (the same as without speculation); a step with
    drafts is submitted only with no step in flight, and no step while one with drafts is in flight. Tokens the
    proposer cannot draft for (repeat_period 0, 3-grams over 1,000 tokens) keep the async overlap: steps are
    submitted with the previous one in flight."""
    fake = FakeRunnerConfig(vocab_size=1000, eos_every=0, repeat_period=repeat_period, max_model_len=96)
    spec = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=3, prompt_lookup_max=3)
    engine = make_engine(
        max_model_len=96, block_size=4, num_blocks=400, fake=fake, speculative_config=spec,
        max_num_batched_tokens=64, max_num_seqs=16, async_scheduling=True,
    )  # fmt: skip
    assert engine.scheduler_config.async_scheduling
    watch = _QueueWatch(engine)
    added = {}
    for i in range(12):
        prompt = [(5 * i + j) % 31 + 2 for j in range(4 + i % 9)]
        params = SamplingParams(max_tokens=[20, 33, 47][i % 3], ignore_eos=True)
        engine.add_request(EngineCoreRequest(f"r{i}", prompt, params, 0.0))
        added[f"r{i}"] = (len(prompt), params)
    got, _ = _run(engine)
    for rid, (prompt_len, params) in added.items():
        want, _, _ = expected_output(rid, prompt_len, params, 96, fake)
        assert got[rid].tokens == want, rid
    assert not any(in_flight for _, in_flight, _ in watch.log), "a step scheduled behind one with drafts"
    assert not any(depth and drafts for depth, _, drafts in watch.log), "a step with drafts behind another"
    stats = _check_counts(engine)
    ahead = sum(1 for depth, _, _ in watch.log if depth)
    if repeat_period:
        assert stats.spec_num_accepted_tokens > 50, stats
    else:
        assert stats.spec_num_drafts == 0
        assert ahead >= len(watch.log) // 2, (ahead, len(watch.log))
