"""Property tests: scheduler + KV cache manager + EngineCore loop driven by the fake runner.

Random arrivals, prompt and output lengths, shared prefixes, salts, aborts, priorities, chunking, async
scheduling, sliding-window groups and tight memory (forcing preemption). Invariants:
- at every step: ref counts equal owners, shared blocks are cached prefixes, free queue = unreferenced blocks
  (and the fake runner's shadow KV check: every position read holds the request's own token); the step keeps
  to max_num_batched_tokens and max_num_seqs; only blocks full of known tokens are published; drafts
  (test_spec_scheduler.py runs these workloads with speculative decoding) go to decoding requests only, at most
  num_speculative_tokens of them, never more than the request may still produce;
- every request that is not aborted ends by its own stop condition with exactly the fake model's tokens;
  an aborted one produced a prefix of them;
- every prefix hit equals the longest full-block prefix already computed (with the same salt), as long as no
  cached block was evicted; never more than that;
- at the end every block is free again and no request is left.
"""

from __future__ import annotations

import time

from engine_core_harness import Collected, check_block_ownership, collect, expected_output, make_engine
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from treadle_engine_core.config import FakeRunnerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import EngineCoreRequest
from treadle_model_runner import SamplingParams, SchedulerOutput
from treadle_model_runner.config import SpeculativeConfig

VOCAB = 40


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(8, 48))
    sliding_window = draw(st.sampled_from([None, None, 4, 9]))
    max_batched = draw(st.integers(1, 64))
    chunked = draw(st.booleans()) or max_batched < max_model_len
    blocks_one_req = -(-max_model_len // block_size) * (2 if sliding_window else 1)
    # two in three: a pool barely above one request, so preemption happens
    tight = draw(st.integers(0, 2)) > 0
    num_blocks = 1 + blocks_one_req + (draw(st.integers(0, 4)) if tight else 400)
    prefixes = [
        draw(st.lists(st.integers(2, VOCAB - 1), min_size=0, max_size=30))
        for _ in range(draw(st.integers(1, 3)))
    ]
    reqs = []
    for i in range(draw(st.integers(1, 10))):
        prefix = prefixes[draw(st.integers(0, len(prefixes) - 1))]
        prompt = (prefix + draw(st.lists(st.integers(2, VOCAB - 1), min_size=0, max_size=12)))[:max_model_len]
        if not prompt:
            prompt = [2]
        max_tokens = draw(st.one_of(st.none(), st.integers(0, 20)))
        min_tokens = (
            draw(st.integers(0, 3)) if max_tokens is None else min(max_tokens, draw(st.integers(0, 3)))
        )
        reqs.append(
            dict(
                rid=f"r{i}",
                prompt=prompt,
                params=SamplingParams(
                    max_tokens=max_tokens,
                    min_tokens=min_tokens,
                    ignore_eos=draw(st.booleans()),
                    stop_token_ids=draw(st.lists(st.integers(2, VOCAB - 1), max_size=2)),
                    logprobs=draw(st.sampled_from([None, None, 2])),
                    prompt_logprobs=draw(st.sampled_from([None, None, None, 1])),
                    pooling=draw(st.sampled_from([None, None, None, None, "last", "mean", "cls"])),
                ),
                arrival=draw(st.integers(0, 6)),
                abort_at=draw(st.one_of(st.none(), st.none(), st.integers(0, 30))),
                priority=draw(st.integers(0, 3)),
                salt=draw(st.sampled_from([None, None, "tenant-a"])),
            )
        )
    return dict(
        block_size=block_size,
        max_model_len=max_model_len,
        num_blocks=num_blocks,
        fake=FakeRunnerConfig(
            vocab_size=VOCAB,
            eos_every=draw(st.sampled_from([0, 6, 15])),
            max_model_len=max_model_len,
            sliding_window=sliding_window,
        ),
        scheduler=dict(
            max_num_seqs=draw(st.integers(1, 8)),
            max_num_batched_tokens=max_batched,
            enable_chunked_prefill=chunked,
            policy=draw(st.sampled_from(["fcfs", "priority"])),
            long_prefill_token_threshold=draw(st.sampled_from([0, 0, 3])),
            async_scheduling=draw(st.booleans()),
        ),
        requests=reqs,
    )


class PrefixOracle:
    """Full-block prefixes whose KV was scheduled, per salt; predicts each admitted request's hit."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.known: dict[str | None, set[tuple[int, ...]]] = {}

    def record(self, salt: str | None, tokens: list[int], num_tokens: int) -> None:
        known = self.known.setdefault(salt, set())
        for k in range(1, num_tokens // self.bs + 1):
            known.add(tuple(tokens[: k * self.bs]))

    def expected_hit(self, salt: str | None, tokens: list[int]) -> int:
        known = self.known.get(salt, set())
        k = 0
        while (k + 1) * self.bs <= len(tokens) - 1 and tuple(tokens[: (k + 1) * self.bs]) in known:
            k += 1
        return k * self.bs


def _check_prefix_hits(engine, so: SchedulerOutput, oracle: PrefixOracle, salts: dict, plp: set) -> None:
    sched = engine.scheduler
    for rid in so.scheduled_cached_reqs.req_ids:
        req = sched.requests[rid]
        oracle.record(salts[rid], req.all_token_ids, min(req.num_computed_tokens, req.num_tokens))
    for new in so.scheduled_new_reqs:
        req = sched.requests[new.req_id]
        hit = new.num_computed_tokens
        want = 0 if new.req_id in plp else oracle.expected_hit(salts[new.req_id], req.all_token_ids)
        if sched.kv.pool.num_evictions == 0:
            assert hit == want, f"{new.req_id}: prefix hit {hit} tokens, expected {want}"
        else:
            assert hit <= want, f"{new.req_id}: prefix hit {hit} tokens > {want} ever computed"
        oracle.record(salts[new.req_id], req.all_token_ids, min(req.num_computed_tokens, req.num_tokens))


def _check_step(engine: EngineCore, so: SchedulerOutput, spec: SpeculativeConfig | None) -> None:
    sched = engine.scheduler
    cfg = sched.config
    assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(so.num_scheduled_tokens) <= cfg.max_num_seqs
    bs = sched.kv.block_size
    for rid, num_published in sched.kv.num_cached_blocks.items():
        num_known = len(sched.requests[rid].all_token_ids)
        assert num_published * bs <= num_known, f"{rid}: block with unknown (draft) tokens published"
    if spec is None:
        assert not so.scheduled_spec_decode_tokens
        return
    for rid, drafts in so.scheduled_spec_decode_tokens.items():
        req = sched.requests[rid]
        num_known = len(req.all_token_ids)
        assert 1 <= len(drafts) <= spec.num_speculative_tokens
        assert so.num_scheduled_tokens[rid] == 1 + len(drafts)
        assert req.num_computed_tokens == num_known + len(drafts), f"{rid} was not decoding"
        assert len(req.output_token_ids) + len(drafts) + 1 <= req.max_tokens, f"{rid}: drafts past max_tokens"
        assert num_known + len(drafts) + 1 <= sched.max_model_len, f"{rid}: drafts past max_model_len"
        assert req.sampling_params.pooling is None, f"{rid}: drafts for a pooling request"


@settings(max_examples=450, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_scheduler_invariants(w: dict) -> None:
    run_workload(w)


def run_workload(w: dict, spec: SpeculativeConfig | None = None) -> EngineCore:
    """Drive the workload to its end checking every invariant above; returns the engine (for more checks)."""
    engine = make_engine(
        max_model_len=w["max_model_len"],
        block_size=w["block_size"],
        num_blocks=w["num_blocks"],
        fake=w["fake"],
        speculative_config=spec,
        **w["scheduler"],
    )
    sched = engine.scheduler
    oracle = PrefixOracle(w["block_size"])
    salts = {r["rid"]: r["salt"] for r in w["requests"]}
    # requests that read every prompt position (prompt logprobs, mean or first-token pooling): no prefix hit
    plp = {r["rid"] for r in w["requests"] if r["params"].needs_whole_prompt}
    pending = sorted(w["requests"], key=lambda r: r["arrival"])
    added: dict[str, dict] = {}
    aborted: set[str] = set()
    got: dict[str, Collected] = {}
    real_schedule = sched.schedule

    def schedule_and_check() -> SchedulerOutput:
        so = real_schedule()
        _check_prefix_hits(engine, so, oracle, salts, plp)
        _check_step(engine, so, spec)
        return so

    sched.schedule = schedule_and_check  # type: ignore[method-assign]
    step = 0
    while pending or engine.has_work:
        while pending and pending[0]["arrival"] <= step:
            r = pending.pop(0)
            ereq = EngineCoreRequest(
                r["rid"], r["prompt"], r["params"], time.time(), r["priority"], r["salt"]
            )
            max_tokens = r["params"].max_tokens
            too_long = len(r["prompt"]) + (1 if max_tokens is None else max_tokens) > w["max_model_len"]
            try:
                engine.add_request(ereq)
            except ValueError as e:
                assert too_long, f"{r['rid']} rejected: {e}"
                assert "maximum context length" in str(e)
                continue
            assert not too_long, f"{r['rid']} should have been rejected"
            added[r["rid"]] = r
        for rid, r in added.items():
            if r["abort_at"] == step and rid in sched.requests:
                engine.abort_requests([rid])
                aborted.add(rid)
        collect(engine.step(), got)
        check_block_ownership(sched.kv)
        step += 1
        assert step < 3000, "no progress: the scheduler livelocked"

    kv = sched.kv
    assert not sched.requests and not sched.running and len(sched.waiting) == 0
    assert kv.pool.num_free_blocks == w["num_blocks"] - 1, "blocks leaked"
    assert not kv.req_blocks
    for rid, r in added.items():
        want, reason, stop_reason = expected_output(
            rid, len(r["prompt"]), r["params"], w["max_model_len"], w["fake"]
        )
        c = got.get(rid, Collected())
        if rid in aborted:
            assert c.tokens == want[: len(c.tokens)], f"{rid} (aborted) produced tokens not from the model"
            continue
        assert c.tokens == want, f"{rid}: got {c.tokens}, expected {want}"
        assert c.finish_reason == reason, f"{rid}: finished {c.finish_reason}, expected {reason}"
        assert c.stop_reason == stop_reason
        if r["params"].logprobs is not None:
            assert c.num_logprobs == len(c.tokens)
    stats = engine.get_stats()
    assert stats.prefix_cache_hits <= stats.prefix_cache_queries
    assert stats.kv_cache_usage == 0.0
    assert stats.num_running_reqs == stats.num_waiting_reqs == 0
    event(f"preempted: {stats.num_preemptions > 0}")
    event(f"prefix hit: {stats.prefix_cache_hits > 0}")
    event(f"aborted: {bool(aborted)}")
    event(f"async: {w['scheduler']['async_scheduling']}")
    return engine
