"""FakeModelRunner: a model runner without a model, for tests, benchmarks and process tests.

It keeps the same persistent per-request state a real runner keeps (from NewRequestData once, then the
CachedRequestData diffs) and asserts the SchedulerOutput invariants on every step. Its "sampled" token for
position p of request r is `fake_token(r, p)`: a pure function, so the expected output of any request is
known in advance however it was batched, chunked or preempted. With `check_kv` it also keeps a shadow KV
cache (slot -> token id and LoRA adapter id), writes every scheduled token through the block tables and checks
every position a query could attend to holds that request's own token, computed under its own adapter: a leaked,
double-owned or wrongly shared block fails. LoRA adapters are only counted (`loras`, `most_loras_in_a_step`).

Speculative decoding: a request with drafts in `scheduled_spec_decode_tokens` is verified as the contract says.
Its drafts are written into their KV slots like any token; the output is each draft while it equals
`fake_token` at its position, then one `fake_token` more. Rejected drafts leave their slots stale: the shadow-KV
check then proves the scheduler schedules those positions again before anything reads them, and never shares a
block holding them.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from treadle_engine_core.config import FakeRunnerConfig
from treadle_model_runner.kv_cache_spec import KVCacheConfig, KVCacheGroupSpec
from treadle_model_runner.outputs import Logprobs, ModelRunnerOutput
from treadle_model_runner.sampling_params import SamplingParams, num_top_logprobs
from treadle_model_runner.scheduler_output import SchedulerOutput

_MASK = 0xFFFFFFFF


def fake_token(request_id: str, position: int, config: FakeRunnerConfig, seed: int | None = None) -> int:
    """The token the fake model samples at `position` (0-based index in prompt + output) of a request."""
    if seed is None:
        seed = zlib.crc32(request_id.encode())
    x = _mix(seed, position)
    if config.eos_every and x % config.eos_every == 0:
        return config.eos_token_id
    if config.repeat_period:
        x = _mix(seed, position % config.repeat_period)
    return 2 + (x >> 5) % (config.vocab_size - 2)


def _mix(seed: int, position: int) -> int:
    x = (seed * 0x9E3779B1 + (position + 1) * 0x85EBCA77) & _MASK
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _MASK
    x ^= x >> 12
    return x


@dataclass(slots=True)
class _ReqState:
    tokens: list[int]  # prompt + every token known to the runner (including ones it sampled)
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: list[list[int]]  # per group
    params: SamplingParams
    seed: int
    sampled: list[int] = field(default_factory=list)
    lora_id: int = 0  # its LoRA adapter (0: the base model)


class FakeModelRunner:
    def __init__(self, config: FakeRunnerConfig, block_size: int, num_blocks: int | None = None) -> None:
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks or config.num_blocks
        self.max_model_len = config.max_model_len
        self.vocab_size = config.vocab_size
        self.eos_token_ids = {config.eos_token_id}
        self.reqs: dict[str, _ReqState] = {}
        self.kv: dict[
            int, tuple[int, int]
        ] = {}  # shadow KV: slot -> (token id, LoRA adapter id) written there
        self.windows: list[int | None] = [None]
        self.num_steps = 0
        self.loras: set[int] = set()  # adapters added (add_lora)
        self.most_loras_in_a_step = 0  # distinct adapters of the busiest step
        self.unloadable_loras: set[int] = set()  # adapters whose (re)load at admission fails (tests set it)
        self.held_loras: dict[str, int] = {}  # request id -> adapter held at its last admission
        self.num_draft_tokens = 0  # drafts verified (speculative decoding)
        self.num_rejected_draft_tokens = 0  # drafts whose slots were left stale

    def add_lora(self, request: Any, load_inplace: bool = False) -> bool:
        self.loras.add(request.lora_int_id)
        return True

    def hold_lora(self, request_id: str, request: Any) -> None:
        """Admission holds an adapter; one in `unloadable_loras` fails to load, as a deleted directory would."""
        if request.lora_int_id in self.unloadable_loras:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: {request.lora_path} is not a directory")
        self.held_loras[request_id] = request.lora_int_id

    def remove_lora(self, lora_id: int) -> bool:
        found = lora_id in self.loras
        self.loras.discard(lora_id)
        return found

    def list_loras(self) -> list[int]:
        return sorted(self.loras)

    def release_graphs(self) -> None:
        """Nothing to free: the fake runner captures no CUDA graphs."""

    def initialize_kv_cache(self) -> KVCacheConfig:
        groups = [KVCacheGroupSpec(layer_indices=(0,), sliding_window=None)]
        if self.config.sliding_window is not None:
            groups.append(KVCacheGroupSpec(layer_indices=(1,), sliding_window=self.config.sliding_window))
        self.windows = [g.sliding_window for g in groups]
        return KVCacheConfig(self.num_blocks, self.block_size, tuple(groups), bytes_per_block=0)

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.num_steps += 1
        if self.config.fail_on_step == self.num_steps - 1:
            raise RuntimeError(f"fake runner: injected failure in step {self.num_steps - 1}")
        if self.config.step_delay_s:
            time.sleep(self.config.step_delay_s)
        for rid in so.finished_req_ids:
            self.reqs.pop(rid, None)
        for rid in so.preempted_req_ids:
            assert self.reqs.pop(rid, None) is not None, f"preempted request {rid} was not running"
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.reqs, f"new request {new.req_id} is already in the runner"
            self.reqs[new.req_id] = _ReqState(
                tokens=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                num_computed_tokens=new.num_computed_tokens,
                block_ids=[list(b) for b in new.block_ids],
                params=new.sampling_params,
                seed=zlib.crc32(new.req_id.encode()),
                lora_id=new.lora_request.lora_int_id if new.lora_request is not None else 0,
            )
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self.reqs.get(rid)
            assert st is not None, f"cached request {rid} is unknown to the runner"
            assert cached.num_computed_tokens[i] == st.num_computed_tokens, (
                f"{rid}: scheduler says {cached.num_computed_tokens[i]} computed, runner has {st.num_computed_tokens}"
            )
            new_ids = cached.new_block_ids[i]
            if new_ids:
                for g, ids in enumerate(new_ids):
                    st.block_ids[g].extend(ids)
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        for rid, drafts in so.scheduled_spec_decode_tokens.items():
            st = self.reqs[rid]
            assert drafts and st.num_computed_tokens == len(st.tokens) - 1, (
                f"{rid}: drafts {drafts} for a request that is not decoding ({st.num_computed_tokens} computed of "
                f"{len(st.tokens)} tokens)"
            )
            assert so.num_scheduled_tokens[rid] == 1 + len(drafts), (
                f"{rid}: {so.num_scheduled_tokens[rid]} tokens scheduled for {len(drafts)} drafts"
            )
            st.tokens.extend(drafts)  # the positions this step computes (verify() takes back the rejected)
        step_loras = {self.reqs[rid].lora_id for rid in so.num_scheduled_tokens} - {0}
        self.most_loras_in_a_step = max(self.most_loras_in_a_step, len(step_loras))
        if self.config.check_kv:
            self._write_and_check_kv(so)
        return self._sample(so)

    def _sample(self, so: SchedulerOutput) -> ModelRunnerOutput:
        req_ids = list(so.num_scheduled_tokens)
        sampled: list[list[int]] = []
        logprobs: list[list[Logprobs] | None] = []
        prompt_logprobs: dict[str, list[Logprobs]] = {}
        any_logprobs = False
        for rid in req_ids:
            st = self.reqs[rid]
            n = so.num_scheduled_tokens[rid]
            start = st.num_computed_tokens
            end = start + n
            assert n > 0 and end <= len(st.tokens), (
                f"{rid}: scheduled {start}+{n} > {len(st.tokens)} known tokens"
            )
            st.num_computed_tokens = end
            if st.params.prompt_logprobs is not None and start < st.num_prompt_tokens - 1:
                prompt_logprobs[rid] = [
                    Logprobs([st.tokens[p + 1]], [-1.0], 1)
                    for p in range(start, min(end, st.num_prompt_tokens - 1))
                ]
            drafts = so.scheduled_spec_decode_tokens.get(rid)
            if drafts or end == len(st.tokens):
                new = (
                    self._verify(rid, st, drafts) if drafts else [fake_token(rid, end, self.config, st.seed)]
                )
                if not drafts:
                    st.tokens.extend(new)
                sampled.append(new)
                if st.params.logprobs is not None:
                    any_logprobs = True
                    k = num_top_logprobs(st.params.logprobs, self.vocab_size)  # -1: the whole vocabulary
                    top = [(2 + j) % self.vocab_size for j in range(k)]
                    logprobs.append([Logprobs([tok, *top], [-0.5] * (k + 1), 1) for tok in new])
                else:
                    logprobs.append(None)
            else:
                sampled.append([])
                logprobs.append(None)
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=logprobs if any_logprobs else [],
            prompt_logprobs=prompt_logprobs,
        )

    def _verify(self, rid: str, st: _ReqState, drafts: list[int]) -> list[int]:
        """The contract's verification: drafts kept while each equals the model's token at its position, then one
        token more. The request's tokens drop the rejected drafts; num_computed_tokens counts what was kept."""
        first = len(st.tokens) - len(drafts)  # position of the first draft
        out: list[int] = []
        for i in range(len(drafts) + 1):
            tok = fake_token(rid, first + i, self.config, st.seed)
            out.append(tok)
            if i == len(drafts) or drafts[i] != tok:
                break
        num_rejected = len(drafts) - (len(out) - 1)
        del st.tokens[first:]
        st.tokens.extend(out)
        st.num_computed_tokens -= num_rejected
        self.num_draft_tokens += len(drafts)
        self.num_rejected_draft_tokens += num_rejected
        return out

    def _write_and_check_kv(self, so: SchedulerOutput) -> None:
        """Write every scheduled token's KV, then check each request can read exactly its own tokens."""
        bs = self.block_size
        for rid, n in so.num_scheduled_tokens.items():
            st = self.reqs[rid]
            for g, table in enumerate(st.block_ids):
                assert len(table) * bs >= st.num_computed_tokens + n, (
                    f"{rid} group {g}: {len(table)} blocks cannot hold {st.num_computed_tokens + n} tokens"
                )
                for p in range(st.num_computed_tokens, st.num_computed_tokens + n):
                    block = table[p // bs]
                    assert block != 0, f"{rid} group {g}: writes position {p} into the null block"
                    self.kv[block * bs + p % bs] = (st.tokens[p], st.lora_id)
        for rid, n in so.num_scheduled_tokens.items():
            st = self.reqs[rid]
            end = st.num_computed_tokens + n
            for g, table in enumerate(st.block_ids):
                w = self.windows[g]
                first = 0 if w is None else max(0, st.num_computed_tokens - w + 1)
                for p in range(first, end):
                    slot = table[p // bs] * bs + p % bs
                    assert self.kv.get(slot) == (st.tokens[p], st.lora_id), (
                        f"{rid} group {g}: position {p} reads (token, adapter) {self.kv.get(slot)} from block "
                        f"{table[p // bs]}, expected {(st.tokens[p], st.lora_id)} (corrupted or wrongly shared KV "
                        "block)"
                    )
