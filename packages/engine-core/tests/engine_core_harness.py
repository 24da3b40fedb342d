"""Test helpers: an EngineCore on the fake runner, a reference for what each request must produce, and the
block-ownership invariant check."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

from treadle_engine_core.config import EngineConfig, FakeRunnerConfig, SchedulerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.executor import FakeExecutor
from treadle_engine_core.fake_runner import fake_token
from treadle_engine_core.kv_cache_manager import KVCacheManager
from treadle_engine_core.messages import EngineCoreOutputs
from treadle_engine_core.request import FinishReason
from treadle_model_runner import CacheConfig, ModelConfig, ModelRunnerOutput, SamplingParams, SchedulerOutput
from treadle_model_runner.config import LoRAConfig, SpeculativeConfig


class SyncFakeExecutor(FakeExecutor):
    """Runs each step at submission (like a device stream), so async scheduling is deterministic in tests."""

    def execute_async(self, so: SchedulerOutput) -> Future[ModelRunnerOutput]:
        fut: Future[ModelRunnerOutput] = Future()
        fut.set_result(self.execute(so))
        return fut


def make_engine(
    *,
    max_model_len: int = 128,
    block_size: int = 4,
    num_blocks: int = 64,
    fake: FakeRunnerConfig | None = None,
    enable_prefix_caching: bool = True,
    lora: LoRAConfig | None = None,
    speculative_config: SpeculativeConfig | None = None,
    **scheduler_kwargs: object,
) -> EngineCore:
    fake = fake or FakeRunnerConfig()
    cfg = EngineConfig(
        model_config=ModelConfig(model="fake", max_model_len=max_model_len),
        cache_config=CacheConfig(
            block_size=block_size,
            num_gpu_blocks_override=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler_config=SchedulerConfig(**scheduler_kwargs),  # type: ignore[arg-type]
        executor="fake",
        fake_runner=fake,
        lora_config=lora or LoRAConfig(),
        speculative_config=speculative_config,
    )
    return EngineCore(cfg, executor=SyncFakeExecutor(cfg))


def expected_output(
    request_id: str, prompt_len: int, params: SamplingParams, max_model_len: int, fake: FakeRunnerConfig
) -> tuple[list[int], FinishReason, int | None]:
    """What the engine must return for a request that runs to its end: tokens, finish reason, stop reason."""
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - prompt_len
    out: list[int] = []
    if max_tokens == 0:
        return out, FinishReason.LENGTH, None
    while True:
        tok = fake_token(request_id, prompt_len + len(out), fake)
        out.append(tok)
        if (
            len(out) > params.min_tokens
        ):  # EOS first (vLLM's order: no stop_reason when EOS is a stop token too)
            if not params.ignore_eos and tok == fake.eos_token_id:
                return out, FinishReason.STOP, None
            if tok in params.stop_token_ids:
                return out, FinishReason.STOP, tok
        if len(out) >= max_tokens or prompt_len + len(out) >= max_model_len:
            return out, FinishReason.LENGTH, None


@dataclass
class Collected:
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    num_logprobs: int = 0


def collect(outputs: EngineCoreOutputs, into: dict[str, Collected]) -> None:
    for o in outputs.outputs:
        c = into.setdefault(o.request_id, Collected())
        assert c.finish_reason is None, f"{o.request_id}: output after its finish ({o})"
        c.tokens.extend(o.new_token_ids)
        if o.new_logprobs is not None:
            assert len(o.new_logprobs) == len(o.new_token_ids)
            assert [lp.token_ids[0] for lp in o.new_logprobs] == o.new_token_ids
            c.num_logprobs += len(o.new_logprobs)
        c.finish_reason = o.finish_reason
        c.stop_reason = o.stop_reason
        c.num_cached_tokens = o.num_cached_tokens


def check_block_ownership(kv: KVCacheManager) -> None:
    """ref_cnt == number of tables holding a block; a block in two tables is a cached prefix at one position;
    free queue == blocks with ref_cnt 0."""
    owners: Counter[int] = Counter()
    position: dict[int, int] = {}
    for tables in kv.req_blocks.values():
        for table in tables:
            for idx, b in enumerate(table):
                if b.block_id == 0:
                    continue
                owners[b.block_id] += 1
                if b.block_id in position:
                    assert b.block_hash is not None, f"block {b.block_id} shared by two tables but not cached"
                    assert position[b.block_id] == idx, f"block {b.block_id} shared at different positions"
                position[b.block_id] = idx
    pool = kv.pool
    free = set(pool.free_queue.block_ids())
    assert len(free) == pool.num_free_blocks
    for b in pool.blocks[1:]:
        assert b.ref_cnt == owners[b.block_id], (
            f"block {b.block_id}: ref_cnt {b.ref_cnt} != {owners[b.block_id]}"
        )
        assert (b.ref_cnt == 0) == (b.block_id in free), f"block {b.block_id}: free-queue membership wrong"
    for g, table in enumerate(pool.cached):
        for h, b in table.items():
            assert b.block_hash == h and b.group_id == g
