"""Test helpers (no tests here): a tiny fake scheduler that drives a ModelRunner, and tiny HF checkpoints.

FakeScheduler hands out blocks from a shuffled free list (so block tables are non-contiguous), sends each
request in full once and then only diffs, and either follows an explicit plan {req_id: tokens} per step or
schedules like the real engine (running requests first: decode 1 token, prefill chunks under a budget).
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner import (
    CacheConfig,
    CachedRequestData,
    ModelConfig,
    ModelRunnerOutput,
    NewRequestData,
    SamplingParams,
    SchedulerOutput,
)
from treadle_model_runner.outputs import AsyncModelRunnerOutput
from treadle_model_runner.runner import ModelRunner


@dataclass
class FakeRequest:
    req_id: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    output: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[list[int]] = field(default_factory=list)  # per group
    sent: bool = False
    lora_request: Any = None  # its LoRA adapter (None: the base model)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_tokens


class FakeScheduler:
    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner = runner
        config = runner.kv_cache_config
        assert config is not None
        self.block_size = config.block_size
        self.num_groups = len(config.groups)
        self.free = list(range(1, config.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.requests: dict[str, FakeRequest] = {}
        self.finished: set[str] = set()
        self.outputs: list[ModelRunnerOutput] = []
        self.done_outputs: dict[str, list[int]] = {}  # finished request -> generated tokens
        self.preempted: set[str] = set()  # preempted since the last step
        self.deferred_steps = 0  # steps the runner returned before their tokens reached the host
        # slots allocated past each step's tokens (the engine's lookahead for a runner's drafter's passes)
        self.lookahead = 0

    def add(
        self,
        req_id: str,
        prompt: list[int],
        params: SamplingParams | None = None,
        max_tokens: int = 8,
        lora_request: Any = None,
    ) -> None:
        params = params or SamplingParams(temperature=0.0)
        self.requests[req_id] = FakeRequest(
            req_id, list(prompt), params, max_tokens, blocks=[[] for _ in range(self.num_groups)],
            lora_request=lora_request,
        )  # fmt: skip

    def step(self, plan: dict[str, int], drafts: dict[str, list[int]] | None = None) -> ModelRunnerOutput:
        """Run one step computing plan[req_id] tokens of each named request. `drafts`: draft tokens a decoding
        request verifies (plan[req_id] = 1 + their number); it keeps what the runner returns."""
        drafts = drafts or {}
        new, cached = [], CachedRequestData()
        for req_id, n in plan.items():
            req = self.requests[req_id]
            num_drafts = len(drafts.get(req_id, ()))
            assert req.num_computed + n <= req.num_tokens + num_drafts, (
                f"{req_id}: scheduling past known tokens"
            )
            need = -(-(req.num_computed + n + self.lookahead) // self.block_size)
            added = []
            for g in range(self.num_groups):
                extra = [self.free.pop() for _ in range(need - len(req.blocks[g]))]
                req.blocks[g].extend(extra)
                added.append(extra)
            if not req.sent:
                req.sent = True
                if req.lora_request is not None:  # admitted: the engine's scheduler holds its adapter then
                    self.runner.hold_lora(req_id, req.lora_request)
                new.append(NewRequestData(req_id, list(req.prompt), req.params, tuple(list(b) for b in req.blocks),
                                          req.num_computed, list(req.output), req.lora_request))  # fmt: skip
            else:
                cached.req_ids.append(req_id)
                cached.new_block_ids.append(tuple(added))
                cached.num_computed_tokens.append(req.num_computed)
        so = SchedulerOutput(new, cached, dict(plan), sum(plan.values()), set(self.finished), set(self.preempted),
                             {r: list(d) for r, d in drafts.items()})  # fmt: skip
        self.finished.clear()
        self.preempted.clear()
        out = self.runner.execute(so)
        if isinstance(out, AsyncModelRunnerOutput):  # runner.async_output: the tokens land after the return
            self.deferred_steps += 1
            out = out.get_output()
        for req_id, n in plan.items():
            req = self.requests[req_id]
            req.num_computed += n
            tokens = out.sampled_token_ids[out.req_id_to_index[req_id]]
            if drafts.get(req_id):
                # the last token and the kept drafts are computed now, the token after them is new
                assert 1 <= len(tokens) <= 1 + len(drafts[req_id]), (
                    f"{req_id} verified its drafts into {tokens}"
                )
                req.num_computed += len(tokens) - n
                req.output.extend(tokens)
            elif req.num_computed >= req.num_tokens:
                assert len(tokens) == 1, f"{req_id} reached its last token but sampled {tokens}"
                req.output.extend(tokens)
            else:
                assert tokens == [], f"{req_id} sampled during a partial prefill"
            if req.done:
                self.finish(req_id)
        self.outputs.append(out)
        return out

    def preempt(self, req_id: str) -> None:
        """Free the request's blocks; it is resent in full (with its outputs) and recomputed when scheduled."""
        req = self.requests[req_id]
        for blocks in req.blocks:
            self.free.extend(blocks)
        req.blocks = [[] for _ in req.blocks]
        req.num_computed, req.sent = 0, False
        self.preempted.add(req_id)

    def finish(self, req_id: str) -> None:
        req = self.requests.pop(req_id)
        for blocks in req.blocks:
            self.free.extend(blocks)
        self.finished.add(req_id)
        self.done_outputs[req_id] = req.output

    def run(self, budget: int, max_seqs: int = 64) -> dict[str, list[int]]:
        """Schedule like the engine until every request is done; returns req_id -> generated tokens."""
        while self.requests:
            self.run_step(budget, max_seqs)
        return self.done_outputs

    def run_step(self, budget: int, max_seqs: int = 64) -> None:
        """One step as the engine would schedule it: every unfinished request's next tokens, within the budget."""
        plan: dict[str, int] = {}
        left = budget
        for req in list(self.requests.values())[:max_seqs]:
            n = min(req.num_tokens - req.num_computed, left)
            if n > 0:
                plan[req.req_id] = n
                left -= n
        self.step(plan)


def save_tiny_model(hf_model: Any, path: Path) -> Path:
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


def make_runner(model_dir: Path, max_num_seqs: int = 16, max_num_batched_tokens: int = 64,
                block_size: int = 4, num_blocks: int = 256, kv_cache_dtype: str = "auto", device: str = "cpu",
                **model_kwargs: Any) -> ModelRunner:  # fmt: skip
    lora_config = model_kwargs.pop("lora_config", None)  # a LoRAConfig: serve adapters
    speculative_config = model_kwargs.pop("speculative_config", None)  # a SpeculativeConfig: verify drafts
    model_kwargs = {"dtype": "float32", "attention_backend": "torch", **model_kwargs}
    model_config = ModelConfig(model=str(model_dir), **model_kwargs)
    cache_config = CacheConfig(
        block_size=block_size, num_gpu_blocks_override=num_blocks, kv_cache_dtype=kv_cache_dtype
    )
    runner = ModelRunner(model_config, cache_config, max_num_seqs, max_num_batched_tokens, device=device,
                         lora_config=lora_config, speculative_config=speculative_config)  # fmt: skip
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


def record_hidden(runner: ModelRunner) -> list[torch.Tensor]:
    """Make the runner keep a copy of every step's hidden states [num_tokens, hidden] (real tokens only)."""
    hidden: list[torch.Tensor] = []
    forward = runner._forward

    def recording_forward(inputs: Any) -> torch.Tensor:
        out = forward(inputs)
        hidden.append(out[: inputs.num_tokens].clone())
        return out

    runner._forward = recording_forward  # type: ignore[method-assign]
    return hidden


def count_piecewise_replays(runner: ModelRunner, graphs: Any = None) -> list[int]:
    """The bucket of every piecewise-graph replay from now on (none when the runner has no piecewise graphs), or
    of `graphs` (the mixed graphs, runner/batch_graphs.py: the same buckets)."""
    replays: list[int] = []
    graphs = graphs if graphs is not None else runner.piecewise
    if graphs is not None:
        assert graphs.sizes == [16, 32, 64] and all(map(graphs.has, (16, 32, 64)))
        replay = graphs.replay
        graphs.replay = lambda size: (replays.append(size), replay(size))[1]  # type: ignore[method-assign]
    return replays


def save_llama(directory: Path, seed: int, **config: Any) -> Path:
    """A tiny random Llama (every weight perturbed, ``std`` 0.15) saved to ``directory`` as an HF model;
    ``config``: LlamaConfig fields (no BOS / EOS token unless given)."""
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**{"eos_token_id": None, "bos_token_id": None, **config})).eval()
    perturb_(hf, seed=seed, std=0.15)
    hf.save_pretrained(directory, safe_serialization=True)
    return directory


def perturb_(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Give every parameter (norms and biases included) random values, so no weight is left at its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def run_interpreted(script: str, *args: str) -> str:
    """Run ``script`` in a fresh Python under Triton's interpreter (``TRITON_INTERPRET`` must be set before triton
    is imported), with these test modules importable; returns its stdout, failing the test on a non-zero exit."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def release_gpu_runner(runner: ModelRunner) -> None:
    """Drop a CUDA runner's graphs and hand the allocator's cached memory back to the card. The runner's own memory
    goes only once no name holds it: a caller that needs it gone drops its reference (`del runner`) and collects."""
    runner.release_graphs()
    gc.collect()
    torch.cuda.empty_cache()


def check_graph_decode_equals_eager(make: Callable[[bool], ModelRunner], vocab_size: int) -> None:
    """A CUDA runner from `make(eager)`: five prompts decoded with graphs give eager's tokens, and hidden states
    within bf16 rounding of eager's."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 17, 3, 40)]
    results = []
    for eager in (True, False):
        runner = make(eager)
        assert (runner.graphs is None) == eager
        sched = FakeScheduler(runner)
        hidden = record_hidden(runner)
        for i, p in enumerate(prompts):
            sched.add(f"r{i}", p, max_tokens=16 + i)
        results.append((sched.run(budget=64), [h.float().cpu() for h in hidden]))
        release_gpu_runner(runner)
    (eager_tokens, eager_hidden), (graph_tokens, graph_hidden) = results
    assert graph_tokens == eager_tokens
    for h_eager, h_graph in zip(eager_hidden, graph_hidden, strict=True):
        torch.testing.assert_close(h_graph, h_eager, atol=2e-2, rtol=2e-2)
