"""Test helpers (no tests here): an EngineCore with two tensor-parallel ranks on CPU (gloo), LoRA on and async
scheduling, run in a process of its own, on a tiny random Llama with PEFT-format adapters written here.

Why a process: a worker that fails ends its engine's process (tp_executor.py's monitor), which must not be pytest.
`run_engine(scenario, ...)` spawns it, builds the engine there and returns what `scenario(engine, *args)` returned,
or says how the engine died. Rank 0's steps may be slowed at their start (`delay_s`: its runner's `execute` sleeps
first, as a busy device makes it start late), so its step thread releases and refreshes adapters after the engine
thread's next LoRA calls, while a worker sees both in the order they were sent.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from safetensors.torch import save_file

from treadle_engine_core.config import EngineConfig, SchedulerConfig
from treadle_engine_core.core import EngineCore
from treadle_engine_core.messages import EngineCoreRequest
from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams
from treadle_model_runner.config import LoRAConfig
from treadle_model_runner.lora import LoRARequest

HF_CONFIG = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "eos_token_id": 1,
             "bos_token_id": None, "tie_word_embeddings": False}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(root: Path) -> Path:
    """A tiny random Llama (two key/value heads: one on each rank), sharpened so greedy tokens have no near-ties."""
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(root / "model", safe_serialization=True)
    return root / "model"


def write_adapter(directory: Path, seed: int, r: int = 8, alpha: float = 16) -> Path:
    """A random PEFT LoRA adapter on every projection of the tiny Llama: A [r, in], B [out, r], std 0.1."""
    hidden, inter = HF_CONFIG["hidden_size"], HF_CONFIG["intermediate_size"]
    kv = HF_CONFIG["num_key_value_heads"] * hidden // HF_CONFIG["num_attention_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(HF_CONFIG["num_hidden_layers"]):
        for name, (in_features, out_features) in shapes.items():
            parent = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_features, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * 0.1
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": TARGETS, "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def engine_config(model: Path, max_cpu_loras: int) -> EngineConfig:
    two_ranks = ModelConfig(
        model=str(model), dtype="float32", attention_backend="torch", max_model_len=64, tensor_parallel_size=2
    )
    return EngineConfig(
        model_config=two_ranks,
        cache_config=CacheConfig(block_size=4, num_gpu_blocks_override=64),
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, async_scheduling=True),
        lora_config=LoRAConfig(enable_lora=True, max_loras=1, max_cpu_loras=max_cpu_loras, max_lora_rank=8),
    )


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    finished: bool = False


class Driver:
    """Requests in, steps run, each request's outcome collected (in the engine's process)."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.outcomes: dict[str, Outcome] = {}

    def add(self, rid: str, prompt: list[int], lora: LoRARequest | None, max_tokens: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(EngineCoreRequest(rid, prompt, params, time.time(), lora_request=lora))
        self.outcomes[rid] = Outcome()

    def step(self) -> None:
        for out in self.engine.step().outputs:
            got = self.outcomes[out.request_id]
            got.tokens.extend(out.new_token_ids)
            got.error = got.error or out.error
            got.finished = got.finished or out.finished

    def run(self, check: Callable[[], None] = lambda: None) -> None:
        """Step until nothing is left, calling `check` after every step."""
        while self.engine.has_work:
            self.step()
            check()

    def loras_by_rank(self) -> list[list[int]]:
        return self.engine.executor.loras_by_rank()  # type: ignore[attr-defined, no-any-return]


def _engine_main(scenario: Callable[..., Any], model: Path, max_cpu_loras: int, delay_s: float, seed: int,
                 args: tuple[Any, ...], results: Any) -> None:  # fmt: skip
    try:
        if delay_s:
            from treadle_model_runner.runner import ModelRunner

            execute, pause = ModelRunner.execute, random.Random(seed)

            # rank 0's only: the workers are processes of their own
            def late(self: ModelRunner, so: Any) -> Any:
                time.sleep(pause.uniform(delay_s / 2, delay_s))
                return execute(self, so)

            ModelRunner.execute = late  # type: ignore[method-assign]
        engine = EngineCore(engine_config(model, max_cpu_loras))
        try:
            results.put(("ok", scenario(Driver(engine), *args)))
        finally:
            engine.shutdown()
    except BaseException:
        results.put(("error", traceback.format_exc()))


def run_engine(scenario: Callable[..., Any], model: Path, *args: Any, max_cpu_loras: int = 2,
               delay_s: float = 0.0, seed: int = 0, timeout_s: float = 240) -> Any:  # fmt: skip
    """`scenario(driver, *args)`'s result, run against a fresh two-rank engine in a process of its own; AssertionError
    naming the cause when the scenario raised or the engine's process ended without a result."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    args = (scenario, model, max_cpu_loras, delay_s, seed, args, results)
    proc = ctx.Process(target=_engine_main, args=args)
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status, value = results.get(timeout=1)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise AssertionError(
                        f"the engine's process died (exit code {proc.exitcode}) before the scenario ended"
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"the scenario did not end within {timeout_s} s") from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert status == "ok", value
    return value
