"""Executors: where the model runner(s) live, behind one interface the EngineCore calls.

`InprocExecutor` holds one `ModelRunner` in this process (one device). `FakeExecutor` holds the
`FakeModelRunner` (tests, benchmarks). `TensorParallelExecutor` (tp_executor.py, one process per device) keeps
rank 0's runner here and feeds every call to the other ranks' processes: `initialize()` returns the KV-cache
layout all ranks agreed on, `execute()` runs one SchedulerOutput everywhere and returns rank 0's output.

`execute_async` runs a step on a single worker thread and returns a Future; the async-scheduling loop uses it
to schedule step N+1 on the host while step N runs on the device (the runner releases the GIL while it
waits for the device).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from treadle_engine_core import envs
from treadle_engine_core.config import EngineConfig
from treadle_engine_core.fake_runner import FakeModelRunner
from treadle_model_runner.kv_cache_spec import KVCacheConfig
from treadle_model_runner.outputs import AsyncModelRunnerOutput, ModelRunnerOutput
from treadle_model_runner.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

# Under async scheduling two Python threads share the GIL: the engine's (scheduling, outputs) and the worker that
# launches each step. The worker drops the GIL in every torch call and every token wait; at CPython's default
# 5 ms switch interval it may then wait that long to get it back while the device idles. Measured on an H200
# (results/gpu-structured-async-h200-*): Qwen3-0.6B, 256 requests under a grammar, 20.6-23.1k output tok/s at
# 5 ms against 28.0-28.6k at 0.5 ms. TREADLE_GIL_SWITCH_INTERVAL_S overrides it (0: leave the interpreter's).
GIL_SWITCH_INTERVAL_S = 0.0005


def _shorten_gil_switch_interval() -> None:
    interval = envs.TREADLE_GIL_SWITCH_INTERVAL_S(GIL_SWITCH_INTERVAL_S)
    if interval is not None and sys.getswitchinterval() > interval:
        sys.setswitchinterval(interval)


class _Runner(Protocol):
    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> set[int]: ...

    def initialize_kv_cache(self) -> KVCacheConfig: ...

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput | AsyncModelRunnerOutput: ...

    def release_graphs(self) -> None: ...


class Executor:
    """One runner in this process; subclasses decide how it is built."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner: _Runner = self._make_runner()
        self._thread: ThreadPoolExecutor | None = None

    @staticmethod
    def create(config: EngineConfig) -> Executor:
        tp = config.model_config.tensor_parallel_size
        if config.executor == "fake":
            if tp > 1:
                raise ValueError("the fake executor has no tensor parallelism; use tensor_parallel_size 1")
            return FakeExecutor(config)
        if tp > 1:
            from treadle_engine_core.tp_executor import TensorParallelExecutor

            return TensorParallelExecutor(config)
        return InprocExecutor(config)

    def _make_runner(self) -> _Runner:
        raise NotImplementedError

    def initialize(self) -> KVCacheConfig:
        """Load the model (if any) and allocate the KV cache; returns its layout."""
        kv = self.runner.initialize_kv_cache()
        logger.info(
            "KV cache: %d blocks x %d tokens (%d groups) = %d tokens per sequence",
            kv.num_blocks - 1,
            kv.block_size,
            len(kv.groups),
            kv.num_tokens,
        )
        return kv

    @property
    def max_model_len(self) -> int:
        return int(self.runner.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.runner.vocab_size)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.runner.eos_token_ids)

    def describe(self) -> dict[str, str]:
        """The runner's device, dtypes, backend and graph mode in words (empty for runners that do not say)."""
        describe = getattr(self.runner, "describe", None)
        return dict(describe()) if callable(describe) else {}

    def check_structured_outputs(self, params: Any) -> None:
        """ValueError when the runner cannot constrain a request to `params` (an invalid grammar, no tokenizer,
        or a runner without structured outputs)."""
        check = getattr(self.runner, "check_structured_outputs", None)
        if not callable(check):
            raise ValueError("structured outputs are not supported by this engine's runner")
        check(params)

    def add_lora(self, request: Any, load_inplace: bool = False) -> bool:
        """Load and check a LoRA adapter (a LoRARequest) before requests use it: ValueError when it cannot run.
        `load_inplace`: replace the weights of the adapter with its id."""
        return bool(self._lora_call("add_lora", request, load_inplace))

    def hold_lora(self, request_id: str, request: Any) -> None:
        """An admitted request's adapter stays in the runner's host memory until the request leaves it, loaded
        again if it was evicted: ValueError when that load fails (model_runner/lora/host_cache.py)."""
        self._lora_call("hold_lora", request_id, request)

    def remove_lora(self, lora_id: int) -> bool:
        return bool(self._lora_call("remove_lora", lora_id))

    def list_loras(self) -> list[int]:
        return list(self._lora_call("list_loras"))

    def _lora_call(self, method: str, *args: Any) -> Any:
        call = getattr(self.runner, method, None)
        if not callable(call):
            raise ValueError("LoRA adapters are not supported by this engine's runner")
        return call(*args)

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(so).get_output()

    def set_async_output(self, enabled: bool) -> None:
        """Let the runner return before a step's sampled tokens reach the host (async scheduling only)."""
        if hasattr(self.runner, "async_output"):
            self.runner.async_output = enabled  # type: ignore[attr-defined]

    def execute_async(self, so: SchedulerOutput) -> Future[ModelRunnerOutput | AsyncModelRunnerOutput]:
        if self._thread is None:
            _shorten_gil_switch_interval()
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="treadle-execute")
        return self._thread.submit(self.runner.execute, so)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
            self._thread = None


class InprocExecutor(Executor):
    """The real ModelRunner on this process's device."""

    def _make_runner(self) -> _Runner:
        return build_runner(self.config)


def build_runner(config: EngineConfig, device: Any = None) -> Any:
    """The real ModelRunner for `config`, its model loaded (on `device`; None = the default device)."""
    from treadle_model_runner.runner import ModelRunner  # heavy (torch, model code): import on use

    sc = config.scheduler_config
    runner = ModelRunner(
        config.model_config,
        config.cache_config,
        max_num_seqs=sc.max_num_seqs,
        max_num_batched_tokens=sc.max_num_batched_tokens,
        device=device,
        lora_config=config.lora_config,
        speculative_config=config.speculative_config,
    )
    runner.load_model()
    return runner


class FakeExecutor(Executor):
    """The deterministic FakeModelRunner; sizes come from EngineConfig.fake_runner and cache_config."""

    def _make_runner(self) -> _Runner:
        cc = self.config.cache_config
        fake = self.config.fake_runner
        if self.config.model_config.max_model_len is not None:
            fake = dataclasses.replace(fake, max_model_len=self.config.model_config.max_model_len)
        time.sleep(fake.startup_delay_s)
        return FakeModelRunner(fake, block_size=cc.block_size, num_blocks=cc.num_gpu_blocks_override)
