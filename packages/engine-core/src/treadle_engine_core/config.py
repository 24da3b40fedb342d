"""Configs owned by the engine core: how the scheduler spends each step, and how the engine is assembled.

`SchedulerConfig` is frozen and validated in __post_init__; values that depend on the model (max_model_len,
async scheduling on GPU) are settled by `resolve()` once the executor reports them. `EngineConfig` composes
the model runner's `ModelConfig`, `CacheConfig`, `LoRAConfig` and `SpeculativeConfig` with it, plus the executor
choice.

Speculative decoding runs under async scheduling too: the engine schedules ahead only while no step with drafts
is in flight and the proposer finds none to make (core.py), so a workload the n-gram proposer cannot draft for
keeps the overlap, and one it can runs its verification steps synchronously.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from treadle_model_runner.config import (
    CacheConfig,
    LoRAConfig,
    ModelConfig,
    SpeculativeConfig,
    config_from_json,
)

POLICIES = ("fcfs", "priority")
EXECUTORS = ("inproc", "fake")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # most requests in one step (--max-num-seqs)
    max_num_batched_tokens: int = 8192  # token budget of one step (--max-num-batched-tokens)
    max_model_len: int | None = None  # prompt + output cap per request; None = the model's (resolve())
    policy: str = "fcfs"  # fcfs: arrival order | priority: lowest `priority` value first, then arrival
    enable_chunked_prefill: bool = True  # split long prompts across steps; off = whole prompts only
    long_prefill_token_threshold: int = 0  # cap on one request's prefill tokens per step; 0 = no cap
    async_scheduling: bool | None = None  # schedule step N+1 while N runs; None = on with CUDA, off on CPU

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}; raise --max-num-seqs")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}; "
                "raise --max-num-batched-tokens"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be >= 0 (0 = off), got {self.long_prefill_token_threshold}"
            )
        if self.max_model_len is not None:
            if self.max_model_len < 1:
                raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
            if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
                raise ValueError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                    f"({self.max_model_len}) with chunked prefill off: prompts longer than "
                    f"{self.max_num_batched_tokens} tokens could never be scheduled; raise "
                    "--max-num-batched-tokens, lower --max-model-len, or enable chunked prefill"
                )

    def resolve(self, model_max_model_len: int, has_cuda: bool) -> SchedulerConfig:
        """Settle model-dependent defaults: max_model_len (capped by the model's) and async scheduling."""
        max_len = self.max_model_len
        if max_len is None:
            max_len = model_max_model_len
        elif max_len > model_max_model_len:
            raise ValueError(
                f"max_model_len ({max_len}) is larger than the model's maximum context length "
                f"({model_max_model_len}); lower --max-model-len"
            )
        async_sched = has_cuda if self.async_scheduling is None else self.async_scheduling
        return dataclasses.replace(self, max_model_len=max_len, async_scheduling=async_sched)


def parse_speculative_config(
    value: SpeculativeConfig | dict[str, Any] | str | None,
) -> SpeculativeConfig | None:
    """A SpeculativeConfig from itself, a dict or its JSON text (--speculative-config); None: speculation off."""
    return None if value is None else config_from_json(SpeculativeConfig, value, "speculative_config")


@dataclass(frozen=True)
class FakeRunnerConfig:
    """The deterministic fake model runner (tests, benchmarks, process tests without a model)."""

    vocab_size: int = 1000  # tokens are drawn from [2, vocab_size)
    eos_token_id: int = 1  # the fake model's EOS
    eos_every: int = 0  # about one token in eos_every is EOS (0 = never)
    max_model_len: int = 2048
    num_blocks: int = 1024  # KV pool size (CacheConfig.num_gpu_blocks_override wins)
    sliding_window: int | None = None  # add a second KV-cache group with this window (hybrid models)
    step_delay_s: float = 0.0  # sleep per step, to give requests a lifetime in process tests
    check_kv: bool = True  # keep a shadow KV cache and assert every read returns the request's own tokens
    fail_on_step: int = -1  # raise in this step (>= 0), to test error propagation
    startup_delay_s: float = 0.0  # sleep while "loading", to test signals during start-up
    # > 0: the token at position p is the one at p % repeat_period (EOS stays aperiodic), so output repeats and
    # the n-gram proposer's drafts are accepted (speculative decoding tests)
    repeat_period: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3, got {self.vocab_size}")
        if self.repeat_period < 0:
            raise ValueError(f"repeat_period must be >= 0 (0 = off), got {self.repeat_period}")


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig  # what to load (for the fake executor: only max_model_len is read)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    executor: str = "inproc"  # inproc: ModelRunner in this process | fake: FakeModelRunner
    fake_runner: FakeRunnerConfig = field(default_factory=FakeRunnerConfig)
    log_stats: bool = True  # attach SchedulerStats to every EngineCoreOutputs
    data_parallel_size: int = 1  # engine processes, each on its own device(s) (dp_client.py; API server only)
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES the engine process sets first (data parallel)
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA adapters (off unless enable_lora)
    # speculative decoding (None: off); a dict or its JSON text is parsed into a SpeculativeConfig
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative_config", parse_speculative_config(self.speculative_config))
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")

    @property
    def max_loras(self) -> int:
        """Most distinct LoRA adapters in one step (0: LoRA is off)."""
        return self.lora_config.max_loras if self.lora_config.enable_lora else 0
