"""A fake engine core with the client interface the frontend uses: tokens from a seeded RNG, no model.

Token choice: greedy requests take a function of (prompt, position); seeded ones of (seed, position); others
a shared RNG. Logprobs and prompt logprobs are synthetic but well-formed (chosen token first, ranks from 1).
`tokens_per_step` > 1 emits several tokens per step (like speculative decoding), which exercises text that
arrives in uneven chunks. `kill()` makes the next get_output raise, like a dead engine process.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

from treadle_model_runner.outputs import Logprobs


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any
    arrival_time: float = 0.0
    priority: int = 0
    cache_salt: str | None = None


def fake_request(
    request_id: str,
    prompt_token_ids: list[int],
    params: Any,
    arrival_time: float,
    priority: int = 0,
    cache_salt: str | None = None,
) -> FakeRequest:
    return FakeRequest(request_id, prompt_token_ids, params, arrival_time, priority, cache_salt)


@dataclass
class FakeOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprobs] | None = None
    new_prompt_logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # why the engine rejected the request (finish_reason "error")


@dataclass
class FakeStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


@dataclass
class FakeOutputs:
    outputs: list[FakeOutput]
    scheduler_stats: FakeStats | None = None


@dataclass
class _Running:
    req: FakeRequest
    output: list[int] = field(default_factory=list)
    rng: random.Random | None = None
    prompt_logprobs_sent: bool = False


class FakeEngine:
    def __init__(
        self,
        vocab_size: int,
        special_ids: set[int],
        eos_id: int,
        tokens_per_step: int = 1,
        capacity_tokens: int = 4096,
    ) -> None:
        self.vocab = [t for t in range(vocab_size) if t not in special_ids]
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.tokens_per_step = tokens_per_step
        self.capacity_tokens = capacity_tokens
        self.running: dict[str, _Running] = {}
        self.shared_rng = random.Random(1234)
        self.dead = False
        self.eos_at: dict[int, int] = {}  # prompt length -> position where EOS is emitted (tests)
        self.script: list[int] | None = (
            None  # when set, every request's reply: these tokens, then EOS (tests)
        )
        self.cached_prefix_tokens = (
            0  # prompt tokens each request's first output reports as prefix-cache hits
        )
        self.num_added = 0
        self.num_aborted = 0
        self.reject: str | None = None  # when set, every request added is rejected with this reason (tests)
        self.rejected: list[str] = []
        self.hold = False  # when set, running requests wait (no output), as behind a long queue (tests)

    def add(self, req: FakeRequest) -> None:
        if self.reject is not None:  # as the engine process answers a ValueError from add_request
            self.rejected.append(req.request_id)
            return
        p = req.sampling_params
        rng = None
        if p.seed is not None:
            rng = random.Random(p.seed)
        elif p.temperature <= 1e-5:
            rng = random.Random(hash(tuple(req.prompt_token_ids)))
        self.running[req.request_id] = _Running(req, rng=rng)
        self.num_added += 1

    def abort(self, ids: list[str]) -> None:
        for rid in ids:
            if self.running.pop(rid, None) is not None:
                self.num_aborted += 1

    def _logprobs(self, rng: random.Random, chosen: int, k: int) -> Logprobs:
        pool = list(range(self.vocab_size)) if k == -1 else self.vocab  # -1: the whole vocabulary
        top = rng.sample(pool, len(pool) if k == -1 else k) if k else []
        values = sorted((-rng.random() * 3 for _ in top), reverse=True)
        if len(values) >= 3:
            values[-1] = float("-inf")  # a masked token: must reach JSON as -9999.0, never -inf
        return Logprobs([chosen, *top], [-0.25 - rng.random(), *values], chosen_rank=rng.randint(1, 5))

    def step(self) -> FakeOutputs:
        if self.dead:
            raise RuntimeError("engine core process died (fake)")
        outs = [FakeOutput(rid, [], finish_reason="error", error=self.reject) for rid in self.rejected]
        self.rejected = []
        if self.hold:
            return FakeOutputs(outs, FakeStats(num_waiting_reqs=len(self.running)))
        for rid, r in list(self.running.items()):
            p = r.req.sampling_params
            rng = r.rng or self.shared_rng
            out = FakeOutput(rid, [])
            if not r.output:
                out.num_cached_tokens = min(self.cached_prefix_tokens, len(r.req.prompt_token_ids) - 1)
            if p.prompt_logprobs is not None and not r.prompt_logprobs_sent:
                r.prompt_logprobs_sent = True
                ids = r.req.prompt_token_ids
                out.new_prompt_logprobs = [
                    self._logprobs(rng, ids[i], p.prompt_logprobs) for i in range(1, len(ids))
                ]
            for _ in range(self.tokens_per_step):
                pos = len(r.output)
                if self.script is not None:
                    tok = self.script[pos] if pos < len(self.script) else self.eos_id
                elif self.eos_at.get(len(r.req.prompt_token_ids)) == pos and not p.ignore_eos:
                    tok = self.eos_id
                else:
                    tok = rng.choice(self.vocab)
                r.output.append(tok)
                out.new_token_ids.append(tok)
                if p.logprobs is not None:
                    out.new_logprobs = (out.new_logprobs or []) + [self._logprobs(rng, tok, p.logprobs)]
                if tok == self.eos_id and not p.ignore_eos:
                    out.finish_reason = "stop"
                elif tok in p.stop_token_ids:
                    out.finish_reason, out.stop_reason = "stop", tok
                elif p.max_tokens is not None and len(r.output) >= p.max_tokens:
                    out.finish_reason = "length"
                if out.finish_reason:
                    del self.running[rid]
                    break
            outs.append(out)
        used = sum(len(r.req.prompt_token_ids) + len(r.output) for r in self.running.values())
        stats = FakeStats(
            num_running_reqs=len(self.running), kv_cache_usage=min(1.0, used / self.capacity_tokens)
        )
        return FakeOutputs(outs, stats)


class FakeSyncClient:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def add_request(self, request: FakeRequest) -> None:
        self.engine.add(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.engine.abort(request_ids)

    def get_output(self) -> FakeOutputs:
        return self.engine.step()

    def call_utility(self, method: str, *args: Any) -> Any:
        return None

    def shutdown(self) -> None:
        pass


class FakeAsyncClient:
    def __init__(self, engine: FakeEngine, step_delay: float = 0.002) -> None:
        self.engine = engine
        self.step_delay = step_delay
        self._wake = asyncio.Event()

    async def add_request_async(self, request: FakeRequest) -> None:
        self.engine.add(request)
        self._wake.set()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        self.engine.abort(request_ids)

    async def get_output_async(self) -> FakeOutputs:
        while not self.engine.running and not self.engine.rejected and not self.engine.dead:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.05)
        await asyncio.sleep(self.step_delay)
        return self.engine.step()

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        return None

    def kill(self) -> None:
        self.engine.dead = True
        self._wake.set()

    def shutdown(self) -> None:
        pass
