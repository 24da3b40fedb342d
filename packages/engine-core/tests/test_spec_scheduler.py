"""Speculative decoding in the scheduler, driven by the fake runner (shadow-KV check on): the output is the
non-speculative output token for token, drafts are accepted and counted consistently, the step's budgets hold,
and stops inside an accepted run of drafts, preemption, aborts and prefix caching behave."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from engine_core_harness import Collected, collect, expected_output, make_engine
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_scheduler_properties import run_workload, workloads

from treadle_engine_core.config import EngineConfig, FakeRunnerConfig, SchedulerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.fake_runner import FakeModelRunner, fake_token
from treadle_engine_core.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from treadle_engine_core.request import FinishReason
from treadle_model_runner import ModelConfig, SamplingParams, SchedulerOutput
from treadle_model_runner.config import SpeculativeConfig

NGRAM = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)


def _runner(engine: EngineCore) -> FakeModelRunner:
    runner = engine.executor.runner
    assert isinstance(runner, FakeModelRunner)
    return runner


def _check_counts(engine: EngineCore) -> SchedulerStats:
    """The scheduler's acceptance counters agree with what the fake runner verified and rejected."""
    stats = engine.get_stats()
    runner = _runner(engine)
    assert stats.spec_num_draft_tokens == runner.num_draft_tokens
    assert stats.spec_num_accepted_tokens == runner.num_draft_tokens - runner.num_rejected_draft_tokens
    assert stats.spec_num_accepted_tokens == sum(stats.spec_num_accepted_tokens_per_pos)
    per_pos = stats.spec_num_accepted_tokens_per_pos
    assert all(a >= b for a, b in itertools.pairwise(per_pos)), "position i+1 kept only after i"
    k = len(per_pos)
    assert stats.spec_num_drafts <= stats.spec_num_draft_tokens <= k * stats.spec_num_drafts
    return stats


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(0, 9), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2))
def test_scheduler_invariants_with_speculation(w: dict, period: int, k: int, hi: int, span: int) -> None:
    """The property workloads (chunking, shared prefixes, salts, aborts, priorities, tight KV pools, sliding
    windows, stop rules, logprobs) with n-gram drafts on a fake model whose tokens repeat: every request gives
    exactly the fake model's tokens, every invariant of test_scheduler_properties holds at every step."""
    w["scheduler"]["async_scheduling"] = False
    w["fake"] = dataclasses.replace(w["fake"], repeat_period=period)
    spec = SpeculativeConfig(
        num_speculative_tokens=k, prompt_lookup_min=max(1, hi - span), prompt_lookup_max=hi
    )
    engine = run_workload(w, spec)
    stats = engine.get_stats()
    runner = _runner(engine)
    assert stats.spec_num_draft_tokens == runner.num_draft_tokens
    assert stats.spec_num_accepted_tokens == runner.num_draft_tokens - runner.num_rejected_draft_tokens
    assert stats.spec_num_accepted_tokens == sum(stats.spec_num_accepted_tokens_per_pos)
    event(f"drafts accepted: {stats.spec_num_accepted_tokens > 0}")
    event(f"drafts rejected: {runner.num_rejected_draft_tokens > 0}")


def _add(engine: EngineCore, rid: str, prompt: list[int], **params: object) -> None:
    engine.add_request(EngineCoreRequest(rid, prompt, SamplingParams(**params), 0.0))  # type: ignore[arg-type]


def _run(engine: EngineCore) -> tuple[dict[str, Collected], int]:
    got: dict[str, Collected] = {}
    steps = 0
    while engine.has_work:
        collect(engine.step(), got)
        steps += 1
        assert steps < 5000
    return got, steps


def _mixed_workload(engine: EngineCore, fake: FakeRunnerConfig) -> dict[str, tuple[int, SamplingParams]]:
    """40 requests: shared prompt prefixes (prefix hits), long prompts (chunked), stop tokens, EOS, min_tokens."""
    shared = [(7 * i) % 37 + 2 for i in range(24)]
    added: dict[str, tuple[int, SamplingParams]] = {}
    for i in range(40):
        prompt = (shared[: 8 + i % 17] if i % 3 else []) + [(5 * i + j) % 31 + 2 for j in range(3 + i % 11)]
        stop = [fake_token(f"r{i}", len(prompt) + 9, fake)] if i % 5 == 0 else []
        params = SamplingParams(
            max_tokens=[12, 30, 45, None][i % 4],
            min_tokens=i % 3,
            ignore_eos=i % 7 == 0,
            stop_token_ids=stop,
            logprobs=2 if i % 6 == 0 else None,
        )
        engine.add_request(EngineCoreRequest(f"r{i}", prompt, params, 0.0))
        added[f"r{i}"] = (len(prompt), params)
    return added


@pytest.mark.parametrize("num_blocks", [400, 26])
@pytest.mark.parametrize("max_num_batched_tokens", [64, 7])
def test_same_output_with_and_without_speculation(num_blocks: int, max_num_batched_tokens: int) -> None:
    """Many requests at once, with and without drafts: identical tokens, finish and stop reasons, equal to the fake
    model.s; with drafts, fewer steps. 26 blocks force preemptions, a budget of 7 chunks prompts and trims drafts."""
    fake = FakeRunnerConfig(vocab_size=40, eos_every=23, repeat_period=6, max_model_len=96)
    results = []
    for spec in (None, NGRAM):
        engine = make_engine(
            max_model_len=96, block_size=4, num_blocks=num_blocks, fake=fake, speculative_config=spec,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=16,
        )  # fmt: skip
        added = _mixed_workload(engine, fake)
        got, steps = _run(engine)
        for rid, (prompt_len, params) in added.items():
            want, reason, stop_reason = expected_output(rid, prompt_len, params, 96, fake)
            assert (got[rid].tokens, got[rid].finish_reason, got[rid].stop_reason) == (
                want,
                reason,
                stop_reason,
            ), rid
            if params.logprobs is not None:
                assert got[rid].num_logprobs == len(want)
        assert engine.scheduler.kv.pool.num_free_blocks == num_blocks - 1
        results.append((got, steps, engine))
    (plain, plain_steps, plain_engine), (spec_got, spec_steps, engine) = results
    assert {r: c.tokens for r, c in plain.items()} == {r: c.tokens for r, c in spec_got.items()}
    stats = _check_counts(engine)
    assert stats.spec_num_accepted_tokens > 100, stats
    assert _runner(engine).num_rejected_draft_tokens > 0
    assert plain_engine.get_stats().spec_num_drafts == 0
    if max_num_batched_tokens == 64:
        assert spec_steps < plain_steps, (spec_steps, plain_steps)
    if num_blocks == 26:
        assert stats.num_preemptions > 0


def _copying_prompt(rid: str, fake: FakeRunnerConfig, prompt_len: int, copied: int) -> list[int]:
    """A prompt that holds the fake model's own next `copied` tokens (those it will produce right after the
    prompt), then filler: once the output starts repeating that copy, every draft is right."""
    future = [fake_token(rid, prompt_len + i, fake) for i in range(copied)]
    return future + [30 + i % 7 for i in range(prompt_len - copied)]


@pytest.mark.parametrize(
    "case",
    ["eos", "stop_token", "max_tokens", "max_model_len", "min_tokens_skips_eos"],
)
def test_stop_inside_an_accepted_run_of_drafts(case: str) -> None:
    """Drafts copied from the prompt are all right, so one step returns several tokens; a stop among them ends the
    request right there (later tokens of the step dropped), as token-by-token decoding would."""
    fake = FakeRunnerConfig(vocab_size=1000, eos_every=9 if "eos" in case else 0, max_model_len=64)
    rid, prompt_len = "c3", 30  # its first EOS (eos_every=9) comes 12 tokens after the prompt
    prompt = _copying_prompt(rid, fake, prompt_len, 24)
    future = prompt[:24]
    params = {"max_tokens": 20}
    if case == "eos":
        assert fake.eos_token_id in future[3:]
    elif case == "stop_token":
        params["stop_token_ids"] = [future[11]]
        assert future[11] not in future[:11]
    elif case == "max_tokens":
        params["max_tokens"] = 13
    elif case == "max_model_len":
        params["max_tokens"] = None
        fake = dataclasses.replace(fake, max_model_len=prompt_len + 14)
    else:
        first_eos = future.index(fake.eos_token_id)
        params["min_tokens"] = first_eos + 1
    max_len = fake.max_model_len
    engine = make_engine(
        max_model_len=max_len, block_size=4, num_blocks=100, fake=fake,
        speculative_config=SpeculativeConfig(num_speculative_tokens=5, prompt_lookup_min=2, prompt_lookup_max=2),
    )  # fmt: skip
    sp = SamplingParams(**params)  # type: ignore[arg-type]
    engine.add_request(EngineCoreRequest(rid, prompt, sp, 0.0))
    runs: list[tuple[int, int]] = []  # per step: tokens the runner returned, tokens the engine kept
    real_update = engine.scheduler.update_from_output

    def update(so: SchedulerOutput, mro):  # type: ignore[no-untyped-def]
        out: EngineCoreOutputs = real_update(so, mro)
        j = mro.req_id_to_index.get(rid)
        if j is not None and mro.sampled_token_ids[j]:
            kept = sum(len(o.new_token_ids) for o in out.outputs if o.request_id == rid)
            runs.append((len(mro.sampled_token_ids[j]), kept))
        return out

    engine.scheduler.update_from_output = update  # type: ignore[method-assign]
    got, _ = _run(engine)
    want, reason, stop_reason = expected_output(rid, prompt_len, sp, max_len, fake)
    assert (got[rid].tokens, got[rid].finish_reason, got[rid].stop_reason) == (want, reason, stop_reason)
    last_returned, last_kept = runs[-1]
    assert last_kept > 1, f"the stop should come inside a run of accepted drafts: {runs}"
    if case in ("eos", "stop_token", "min_tokens_skips_eos"):
        assert reason == FinishReason.STOP
        assert last_returned > last_kept, f"tokens after the stop should be dropped: {runs}"
    else:  # drafts never reach past what the request may produce: the run ends exactly at the cap
        assert reason == FinishReason.LENGTH and last_returned == last_kept, runs
    if case == "min_tokens_skips_eos":
        assert want.count(fake.eos_token_id) >= 2
    _check_counts(engine)
    assert not engine.scheduler.spec.proposer.rows, "the proposer should forget finished requests"  # type: ignore[union-attr]


def test_drafts_fit_the_token_budget_and_threshold() -> None:
    fake = FakeRunnerConfig(vocab_size=1000, max_model_len=64)
    prompt = _copying_prompt("copy", fake, 30, 24)
    for budget, threshold, want in ((64, 0, 6), (4, 0, 4), (64, 3, 3)):
        engine = make_engine(
            max_model_len=64, fake=fake, max_num_batched_tokens=budget, long_prefill_token_threshold=threshold,
            speculative_config=SpeculativeConfig(num_speculative_tokens=5, prompt_lookup_max=2),
        )  # fmt: skip
        _add(engine, "copy", prompt, max_tokens=30)
        while len(engine.scheduler.requests["copy"].output_token_ids) < 2:
            engine.step()  # prefill, then decode until the output's suffix matches the prompt's start
        so = engine.scheduler.schedule()
        assert so.num_scheduled_tokens == {"copy": want}, (budget, threshold)
        assert so.scheduled_spec_decode_tokens == {"copy": prompt[2 : 2 + want - 1]}


def test_prefix_hits_on_blocks_written_by_drafts() -> None:
    """A request continues another's prompt + output, whose blocks were filled by accepted and rejected drafts:
    it hits the full blocks of known tokens and reads their KV (shadow check), never a rejected draft's."""
    fake = FakeRunnerConfig(vocab_size=30, repeat_period=5, eos_every=11, max_model_len=128)
    engine = make_engine(max_model_len=128, block_size=4, num_blocks=200, fake=fake, speculative_config=NGRAM)
    prompt = [3, 4, 5, 6, 7, 8, 9]
    _add(engine, "a", prompt, max_tokens=40, ignore_eos=True)
    got, _ = _run(engine)
    assert _runner(engine).num_rejected_draft_tokens > 0
    follow = prompt + got["a"].tokens[:30]
    _add(engine, "b", follow, max_tokens=5)
    so = engine.scheduler.schedule()
    assert so.scheduled_new_reqs[0].num_computed_tokens == (len(follow) - 1) // 4 * 4
    engine.scheduler.update_from_output(so, engine.executor.execute(so))
    _run(engine)


def test_abort_and_preemption_with_drafts_in_flight() -> None:
    fake = FakeRunnerConfig(vocab_size=1000, max_model_len=52)
    engine = make_engine(
        max_model_len=52, block_size=4, num_blocks=14, fake=fake, enable_prefix_caching=False,
        speculative_config=SpeculativeConfig(num_speculative_tokens=5, prompt_lookup_max=2),
    )  # fmt: skip
    prompts = {rid: _copying_prompt(rid, fake, 20, 16) for rid in ("x", "y", "z")}
    for rid, prompt in prompts.items():
        _add(engine, rid, prompt, max_tokens=30, ignore_eos=True)
    sched = engine.scheduler
    got: dict[str, Collected] = {}
    preempted: set[str] = set()
    aborted = False
    for _ in range(500):
        if not engine.has_work:
            break
        so = sched.schedule()
        preempted |= so.preempted_req_ids
        if not aborted and "x" in so.scheduled_spec_decode_tokens:
            engine.abort_requests(["x"])  # while its drafts are being verified
            aborted = True
        collect(sched.update_from_output(so, engine.executor.execute(so)), got)
    assert aborted and not engine.has_work
    assert "x" not in sched.spec.proposer.rows  # type: ignore[union-attr]
    assert preempted, "the 13-block pool should preempt one of three 50-token requests"
    for rid in ("y", "z"):
        want, _, _ = expected_output(rid, 20, SamplingParams(max_tokens=30, ignore_eos=True), 52, fake)
        assert got[rid].tokens == want
    x_want, _, _ = expected_output("x", 20, SamplingParams(max_tokens=30), 52, fake)
    assert got["x"].tokens == x_want[: len(got["x"].tokens)]
    assert sched.kv.pool.num_free_blocks == 13


def test_speculative_config_parsing_and_async_scheduling() -> None:
    model = ModelConfig(model="fake", max_model_len=64)
    cfg = EngineConfig(
        model, executor="fake", speculative_config='{"method": "ngram", "num_speculative_tokens": 3}'
    )
    assert cfg.speculative_config == SpeculativeConfig(num_speculative_tokens=3)
    assert EngineConfig(
        model, speculative_config={"prompt_lookup_max": 4}
    ).speculative_config == SpeculativeConfig(prompt_lookup_min=4, prompt_lookup_max=4)
    with pytest.raises(
        ValueError, match=r"'lookahead' not supported; its keys are method, num_speculative_tokens"
    ):
        EngineConfig(model, speculative_config={"method": "ngram", "lookahead": 2})
    with pytest.raises(ValueError, match="is not JSON"):
        EngineConfig(model, speculative_config="{method: ngram}")
    with pytest.raises(ValueError, match="method 'eagle' is not supported"):
        EngineConfig(model, speculative_config={"method": "eagle"})
    for key, value in [("num_speculative_tokens", "5"), ("num_speculative_tokens", 2.5), ("num_speculative_tokens", None),
                       ("prompt_lookup_max", 2.0), ("prompt_lookup_min", True)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"{key} must be an integer, got {value!r}"):
            EngineConfig(model, speculative_config={key: value})
    # async scheduling and speculation together (core.py schedules ahead only while nothing is to be drafted)
    both = EngineConfig(model, scheduler_config=SchedulerConfig(async_scheduling=True), speculative_config={})
    assert both.scheduler_config.async_scheduling and both.speculative_config == SpeculativeConfig()
    assert SchedulerConfig().resolve(64, has_cuda=True).async_scheduling is True


def test_speculation_in_an_engine_process() -> None:
    """The speculative config travels with the EngineConfig to the engine process; its outputs and stats come back
    over ZMQ (several tokens per output, the spec counters in SchedulerStats)."""
    from treadle_engine_core.mp_client import SyncMPClient

    fake = FakeRunnerConfig(vocab_size=50, repeat_period=4, max_model_len=128)
    config = EngineConfig(
        ModelConfig(model="fake", max_model_len=128),
        executor="fake",
        fake_runner=fake,
        speculative_config='{"num_speculative_tokens": 3, "prompt_lookup_max": 2}',
    )
    client = SyncMPClient(config)
    try:
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        for i in range(3):
            client.add_request(EngineCoreRequest(f"p{i}", [3 + i, 9, 4], params, 0.0))
        got: dict[str, Collected] = {}
        most = 0
        while len([c for c in got.values() if c.finish_reason is not None]) < 3:
            out = client.get_output(timeout_s=30)
            most = max([most, *(len(o.new_token_ids) for o in out.outputs)])
            collect(out, got)
        stats = client.get_stats()
    finally:
        client.shutdown()
    for i in range(3):
        assert got[f"p{i}"].tokens == expected_output(f"p{i}", 3, params, 128, fake)[0]
    assert most > 1 and stats.spec_num_accepted_tokens > 0
    assert stats.spec_num_accepted_tokens == sum(stats.spec_num_accepted_tokens_per_pos)


def test_data_parallel_stats_sum_per_position() -> None:
    from treadle_engine_core.dp_client import _sum_stats

    a = SchedulerStats(
        spec_num_drafts=2, spec_num_accepted_tokens=3, spec_num_accepted_tokens_per_pos=[2, 1, 0]
    )
    b = SchedulerStats(
        spec_num_drafts=1, spec_num_accepted_tokens=1, spec_num_accepted_tokens_per_pos=[1, 0, 0]
    )
    total = _sum_stats([a, b, SchedulerStats()])
    assert (total.spec_num_drafts, total.spec_num_accepted_tokens) == (3, 4)
    assert total.spec_num_accepted_tokens_per_pos == [3, 1, 0]


def test_drafts_travel_to_tensor_parallel_workers() -> None:
    """The tensor-parallel executor sends each SchedulerOutput to the other ranks msgpack-encoded: drafts included."""
    from treadle_engine_core import messages

    engine = make_engine(speculative_config=NGRAM, fake=FakeRunnerConfig(repeat_period=3))
    _add(engine, "a", [5, 6, 7], max_tokens=20)
    while not engine.scheduler.requests["a"].output_token_ids[4:]:
        engine.step()
    so = engine.scheduler.schedule()
    assert so.scheduled_spec_decode_tokens
    decoded = messages.decode(messages.encode(so), SchedulerOutput)
    assert decoded.scheduled_spec_decode_tokens == so.scheduled_spec_decode_tokens
    assert decoded.num_scheduled_tokens == so.num_scheduled_tokens
