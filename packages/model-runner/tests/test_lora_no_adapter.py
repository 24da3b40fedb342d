"""LoRA enabled, no adapter in the step (CPU, fp32, tiny random Llama): the step runs exactly what an engine without
LoRA runs. Its hidden states are bit-identical to that engine's over prefill chunks, mixed steps and decodes, it
launches no LoRA matmul, and the fused norm + projection and activation + down_proj ops run as often as there;
a step that does run an adapter takes the LoRA path again (its numbers are checked against PEFT in test_lora.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from lora_fixtures import write_adapter
from test_models import COMMON
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden

from treadle_ir import ops
from treadle_model_runner.config import LoRAConfig
from treadle_model_runner.layers.mlp import GatedMLP
from treadle_model_runner.lora import LoRARequest

FUSED = ("add_rms_norm_linear", "act_and_mul_linear")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoRARequest]:
    root = tmp_path_factory.mktemp("no_adapter")
    config = tf.LlamaConfig(**COMMON)
    hf = tf.LlamaForCausalLM(config)
    perturb_(hf.eval(), seed=5, std=0.15)
    hf.save_pretrained(root / "base", safe_serialization=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = write_adapter(root / "a", config, seed=6, r=8, alpha=16, targets=targets)
    return root / "base", LoRARequest("a", 1, str(adapter))


def _count_ops(monkeypatch: pytest.MonkeyPatch, counts: Counter[str], runner: Any) -> None:
    """Count LoRA matmuls (ops.linear on a slot buffer) and the fused ops, from now on."""
    slots = {id(t.slots): t.slots for t in runner.lora.targets.values()} if runner.lora else {}
    lora_weights = {t.data_ptr() for s in slots.values() for t in (s.lora_a, s.lora_b)}
    linear = ops.linear

    def counting_linear(x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
        if weight.data_ptr() in lora_weights:
            counts["lora_matmul"] += 1
        return linear(x, weight, bias)

    monkeypatch.setattr(ops, "linear", counting_linear)

    def counted(name: str, op: Any) -> Any:
        def counting(*args: Any) -> Any:
            counts[name] += 1
            return op(*args)

        return counting

    monkeypatch.setattr(ops, "add_rms_norm_linear", counted("add_rms_norm_linear", ops.add_rms_norm_linear))
    for module in runner.model.modules():  # the MLP holds its fused activation op (layers/mlp.py)
        if isinstance(module, GatedMLP):
            monkeypatch.setattr(
                module, "act_and_mul_linear", counted("act_and_mul_linear", module.act_and_mul_linear)
            )


def _run(runner: Any, prompts: dict[str, list[int]], lora: LoRARequest | None = None) -> dict[str, list[int]]:
    sched = FakeScheduler(runner, seed=3)
    for rid, prompt in prompts.items():
        sched.add(rid, prompt, max_tokens=5, lora_request=lora)
    return sched.run(budget=16)  # chunked prefills, mixed steps, then decodes


def test_steps_without_adapters_run_exactly_what_an_engine_without_lora_runs(
    tiny: tuple[Path, LoRARequest], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, adapter = tiny
    gen = torch.Generator().manual_seed(8)
    prompts = {
        f"r{i}": torch.randint(1, 160, (n,), generator=gen).tolist() for i, n in enumerate((9, 23, 4, 14))
    }
    results = {}
    for enable_lora in (False, True):
        config = LoRAConfig(enable_lora=True, max_loras=2, max_lora_rank=8) if enable_lora else None
        runner = make_runner(path, lora_config=config)
        counts: Counter[str] = Counter()
        _count_ops(monkeypatch, counts, runner)
        hidden = record_hidden(runner)
        results[enable_lora] = (_run(runner, prompts), list(hidden), Counter(counts))
        if enable_lora:  # the next steps run an adapter: the LoRA path comes back
            _run(runner, {"with_adapter": prompts["r0"]}, adapter)
            assert counts["lora_matmul"] > 0
        monkeypatch.undo()
    (tokens, hidden, counts), (lora_tokens, lora_hidden, lora_counts) = results[False], results[True]
    assert lora_tokens == tokens
    assert len(lora_hidden) == len(hidden)
    for step, (h, h_lora) in enumerate(zip(hidden, lora_hidden, strict=True)):
        assert torch.equal(h_lora, h), f"step {step}: max difference {(h_lora - h).abs().max()}"
    assert lora_counts["lora_matmul"] == 0
    assert all(counts[name] > 0 for name in FUSED), counts
    assert {n: lora_counts[n] for n in FUSED} == {n: counts[n] for n in FUSED}


class _FakeGraphs:
    """A graph set that records the LoRA flag it was captured under and replays that."""

    def __init__(self, kind: str, mask: Any, fail: bool = False) -> None:
        self.kind, self.mask, self.fail = kind, mask, fail
        self.sizes = [1, 2, 4]
        self.captured_with: bool | None = None
        self.pool: Any = None
        self.released = False

    @property
    def memory_bytes(self) -> int:
        return 1 << 20

    @property
    def is_captured(self) -> bool:
        return self.captured_with is not None

    def padded_size(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def has(self, size: int) -> bool:
        return size in self.sizes

    def capture(self, pool: Any) -> None:
        self.pool = pool
        if not self.fail:
            self.captured_with = self.mask.has_adapters

    def replay(self, size: int) -> torch.Tensor:
        return torch.tensor([float(bool(self.captured_with))])

    def release(self) -> None:
        self.released = True


def test_lora_graph_variants_capture_each_flag_into_one_pool_and_replay_by_the_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """runner/lora_graphs.py without a GPU: the with-adapters variant is captured under has_adapters true, the other
    under false, both into one pool; replay follows the step's flag; a failed variant releases both."""
    from treadle_model_runner.lora.layer import TokenMask
    from treadle_model_runner.runner import lora_graphs

    pools = iter(range(100))
    monkeypatch.setattr(lora_graphs.torch.cuda, "graph_pool_handle", lambda: next(pools))
    mask = TokenMask(torch.zeros(4, 2))
    made: list[_FakeGraphs] = []

    def new(kind: str, fail: bool = False) -> _FakeGraphs:
        made.append(_FakeGraphs(kind, mask, fail))
        return made[-1]

    captured = lora_graphs.capture_set(mask, new, lambda g, pool: g.capture(pool))
    assert [g.captured_with for g in captured] == [True, False] and captured[0].pool == captured[1].pool
    assert "adapter" in captured[0].kind and "without" in captured[1].kind and mask.has_adapters
    graphs = lora_graphs.as_one_set(captured, mask)
    assert (
        graphs is not None and graphs.memory_bytes == 2 << 20 and graphs.has(4) and graphs.padded_size(3) == 4
    )
    for has_adapters in (False, True, False):
        mask.has_adapters = has_adapters
        assert graphs.replay(2).item() == float(has_adapters)
    made.clear()
    failed = lora_graphs.capture_set(
        mask, lambda kind: new(kind, fail="without" in kind), lambda g, p: g.capture(p)
    )
    assert failed == [] and [g.released for g in made] == [True, True]
    assert (
        lora_graphs.capture_set(None, new, lambda g, pool: g.capture(pool))[0].pool is None
    )  # LoRA off: one set
