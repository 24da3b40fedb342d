"""Scheduler behaviours one at a time: budget and chunking, preemption order, stop rules, async placeholders,
config errors, prefix hits and reset."""

from __future__ import annotations

import pytest
from engine_core_harness import Collected, collect, expected_output, make_engine

from treadle_engine_core.config import FakeRunnerConfig, SchedulerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import EngineCoreRequest
from treadle_engine_core.request import FinishReason
from treadle_model_runner import SamplingParams


def _add(engine: EngineCore, rid: str, prompt: list[int], priority: int = 0, **params: object) -> None:
    engine.add_request(EngineCoreRequest(rid, prompt, SamplingParams(**params), 0.0, priority))  # type: ignore[arg-type]


def _run(engine: EngineCore, max_steps: int = 1000) -> dict[str, Collected]:
    got: dict[str, Collected] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            return got
        collect(engine.step(), got)
    raise AssertionError("engine did not finish")


def test_token_budget_chunks_long_prompts_and_decodes_first() -> None:
    engine = make_engine(max_num_batched_tokens=16, max_num_seqs=4, long_prefill_token_threshold=0)
    _add(engine, "a", list(range(2, 12)), max_tokens=5)
    engine.step()  # a: 10-token prefill
    _add(engine, "b", list(range(50, 90)), max_tokens=2)
    so = engine.scheduler.schedule()
    assert so.num_scheduled_tokens == {"a": 1, "b": 15}  # the decode first, then b's chunk fills the budget
    assert so.scheduled_new_reqs[0].num_computed_tokens == 0


def test_long_prefill_threshold_caps_a_chunk() -> None:
    engine = make_engine(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    _add(engine, "a", list(range(2, 30)), max_tokens=1)
    assert engine.scheduler.schedule().num_scheduled_tokens == {"a": 8}


def test_preemption_takes_the_latest_request_and_it_resumes_with_its_tokens() -> None:
    fake = FakeRunnerConfig(max_model_len=32)
    # 2 requests x 32 tokens need 16 blocks of 4; the pool has 9 usable: one must be preempted.
    engine = make_engine(
        max_model_len=32, block_size=4, num_blocks=10, fake=fake, enable_prefix_caching=False
    )
    _add(engine, "first", [2, 3, 4, 5], max_tokens=28, ignore_eos=True)
    _add(engine, "second", [6, 7, 8, 9], max_tokens=28, ignore_eos=True)
    got = _run(engine)
    assert engine.get_stats().num_preemptions >= 1
    for rid in ("first", "second"):
        want, reason, _ = expected_output(rid, 4, SamplingParams(max_tokens=28, ignore_eos=True), 32, fake)
        assert got[rid].tokens == want and got[rid].finish_reason == reason == FinishReason.LENGTH
    assert engine.scheduler.kv.pool.num_free_blocks == 9


def test_priority_policy_preempts_the_lowest_priority() -> None:
    engine = make_engine(
        max_model_len=32, block_size=4, num_blocks=10, policy="priority", max_num_batched_tokens=8
    )
    _add(engine, "low", [2, 3, 4, 5], priority=5, max_tokens=28, ignore_eos=True)
    _add(engine, "high", [6, 7, 8, 9], priority=0, max_tokens=28, ignore_eos=True)
    preempted: list[str] = []
    while engine.has_work:
        so = engine.scheduler.schedule()
        preempted.extend(so.preempted_req_ids)
        engine.scheduler.update_from_output(so, engine.executor.execute(so))
    assert preempted and set(preempted) == {"low"}


def test_stop_rules() -> None:
    fake = FakeRunnerConfig(eos_every=3)
    engine = make_engine(fake=fake)
    specs = {
        "eos": dict(max_tokens=40),
        "ignore_eos": dict(max_tokens=12, ignore_eos=True),
        "min_tokens": dict(max_tokens=40, min_tokens=6),
        "zero": dict(max_tokens=0, prompt_logprobs=1),
        "to_len": dict(max_tokens=None, ignore_eos=True),
    }
    stop_tok = expected_output("stop_tok", 3, SamplingParams(max_tokens=40, ignore_eos=True), 128, fake)[0][4]
    specs["stop_tok"] = dict(max_tokens=40, ignore_eos=True, stop_token_ids=[stop_tok])
    specs["eos_in_stop_ids"] = dict(max_tokens=40, stop_token_ids=[fake.eos_token_id])  # EOS wins: no reason
    for rid, p in specs.items():
        _add(engine, rid, [7, 8, 9], **p)
    got = _run(engine)
    for rid, p in specs.items():
        want, reason, stop_reason = expected_output(rid, 3, SamplingParams(**p), 128, fake)  # type: ignore[arg-type]
        assert (got[rid].tokens, got[rid].finish_reason, got[rid].stop_reason) == (
            want,
            reason,
            stop_reason,
        ), rid
    assert got["eos"].tokens[-1] == fake.eos_token_id and got["eos"].finish_reason == FinishReason.STOP
    assert fake.eos_token_id in got["ignore_eos"].tokens
    assert len(got["ignore_eos"].tokens) == 12
    assert len(got["min_tokens"].tokens) > 6
    assert got["stop_tok"].stop_reason == stop_tok
    eos_stop = got["eos_in_stop_ids"]
    assert eos_stop.tokens[-1] == fake.eos_token_id and eos_stop.stop_reason is None, eos_stop
    assert got["zero"].tokens == [] and got["zero"].finish_reason == FinishReason.LENGTH
    assert len(got["to_len"].tokens) == 128 - 3


def test_async_scheduling_schedules_ahead_with_placeholders() -> None:
    engine = make_engine(async_scheduling=True)
    _add(engine, "a", [2, 3, 4, 5, 6], max_tokens=3, ignore_eos=True)
    sched = engine.scheduler
    so1 = sched.schedule()
    req = sched.requests["a"]
    assert so1.num_scheduled_tokens == {"a": 5} and req.num_output_placeholders == 1
    out1 = engine.executor.execute(so1)
    so2 = sched.schedule()  # before step 1's token is known
    assert so2.num_scheduled_tokens == {"a": 1} and req.num_output_placeholders == 2
    out2 = engine.executor.execute(so2)
    got: dict[str, Collected] = {}
    collect(sched.update_from_output(so1, out1), got)
    assert req.num_output_tokens == 1 and req.num_output_placeholders == 1
    collect(sched.update_from_output(so2, out2), got)
    for key, val in _run(engine).items():
        got[key].tokens += val.tokens
        got[key].finish_reason = val.finish_reason
    want = expected_output("a", 5, SamplingParams(max_tokens=3), 128, FakeRunnerConfig())[0]
    assert got["a"].tokens == want and got["a"].finish_reason == FinishReason.LENGTH


def test_prefix_hit_is_reported_and_reset_clears_it() -> None:
    engine = make_engine(block_size=4)
    prompt = list(range(2, 16))  # 14 tokens: 3 full blocks
    _add(engine, "a", prompt, max_tokens=1)
    _run(engine)
    _add(engine, "b", prompt, max_tokens=1)
    assert _run(engine)["b"].num_cached_tokens == 12
    _add(engine, "c", prompt[:12], max_tokens=1)  # a whole-prompt hit still computes the last token
    assert _run(engine)["c"].num_cached_tokens == 8
    engine.add_request(EngineCoreRequest("salted", prompt, SamplingParams(max_tokens=1), 0.0, cache_salt="s"))
    assert _run(engine)["salted"].num_cached_tokens == 0
    assert engine.call_utility("reset_prefix_cache", []) is True
    _add(engine, "d", prompt, max_tokens=1)
    assert _run(engine)["d"].num_cached_tokens == 0
    stats = engine.get_stats()
    assert stats.prefix_cache_hits == 20 and stats.prefix_cache_queries == 14 * 4 + 12


def test_abort_frees_everything() -> None:
    engine = make_engine(max_num_batched_tokens=8)
    _add(engine, "a", list(range(2, 40)), max_tokens=10)
    _add(engine, "b", list(range(2, 6)), max_tokens=10)
    engine.step()
    engine.abort_requests(["a", "b", "unknown"])
    assert not engine.has_work and engine.scheduler.kv.pool.usage == 0.0
    assert engine.scheduler.schedule().finished_req_ids == {"a", "b"}


def test_rejects_too_long_and_duplicate_requests() -> None:
    engine = make_engine(max_model_len=64)
    with pytest.raises(
        ValueError, match=r"maximum context length is 64 tokens\. However, you requested 70 tokens"
    ):
        _add(engine, "x", [1] * 60, max_tokens=10)
    with pytest.raises(ValueError, match="prompt is empty"):
        _add(engine, "y", [], max_tokens=1)
    _add(engine, "z", [1], max_tokens=1)
    with pytest.raises(ValueError, match="already in flight"):
        _add(engine, "z", [1], max_tokens=1)


def test_scheduler_config_errors_name_value_and_fix() -> None:
    with pytest.raises(
        ValueError, match=r"max_num_batched_tokens \(2048\) is smaller than max_model_len \(4096\)"
    ):
        SchedulerConfig(max_num_batched_tokens=2048, max_model_len=4096, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="policy 'lifo' is not one of fcfs, priority"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"max_model_len \(9000\) is larger than the model's"):
        SchedulerConfig(max_model_len=9000).resolve(4096, has_cuda=False)
    resolved = SchedulerConfig().resolve(4096, has_cuda=True)
    assert resolved.max_model_len == 4096 and resolved.async_scheduling is True
    with pytest.raises(ValueError, match=r"max_model_len \(128\) needs 32 KV blocks .* the cache has 9"):
        make_engine(max_model_len=128, block_size=4, num_blocks=10)
