"""LoRA adapters against PEFT (CPU, fp32) on tiny random Llama and Qwen3 models, driven through the ModelRunner.

One batch mixes the base model and two adapters (one on all seven projections at rank 8, one rsLoRA adapter on
q, v and down only at rank 4): every scheduled position's logits, prefill chunks and decode steps alike, are within
1e-4 of PEFT's with that request's adapter, and greedy continuations equal PEFT's `generate`. With one slot the
adapters take turns in it. Adapters the model cannot run are refused with the file and the problem named.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from lora_fixtures import PeftReference, save_adapter
from safetensors.torch import load_file, save_file
from spec_decode_driver import reference, speculate
from test_models import COMMON  # the tiny HF configs the model tests build
from test_models import _phi3_config as phi3_config
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden

from treadle_model_runner import SamplingParams
from treadle_model_runner.config import LoRAConfig
from treadle_model_runner.lora import LoRARequest

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Tiny:
    path: Path  # the base model, HF format
    hf: Any
    adapters: dict[str, Path]
    requests: dict[str, LoRARequest]
    peft: PeftReference

    def lora(self, name: str | None) -> LoRARequest | None:
        return None if name is None else self.requests[name]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    # the base weights from a fixed seed, not from whatever state the global RNG is in: greedy parity with PEFT
    # holds only where no step's top two logits are closer than the runner-PEFT difference (measured <= 5e-6)
    torch.manual_seed(0)
    if request.param == "llama":
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True))
    else:
        hf = tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=16))
    perturb_(hf.eval(), seed=1, std=0.15)
    root = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(root / "base", safe_serialization=True)
    partial = ["q_proj", "v_proj", "down_proj"]
    adapters = {
        "a": save_adapter(hf, root / "a", seed=2, r=8, alpha=16, targets=ALL_TARGETS),
        "b": save_adapter(hf, root / "b", seed=3, r=4, alpha=6, targets=partial, use_rslora=True),
    }
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    return Tiny(root / "base", hf, adapters, requests, PeftReference(hf, adapters))


def _lora_runner(tiny: Tiny, max_loras: int, **kwargs: Any) -> Any:
    return make_runner(tiny.path, lora_config=LoRAConfig(enable_lora=True, max_loras=max_loras, max_lora_rank=8),
                       **kwargs)  # fmt: skip


def test_mixed_batch_of_base_and_two_adapters_matches_peft(tiny: Tiny) -> None:
    runner = _lora_runner(tiny, max_loras=2)
    gen = torch.Generator().manual_seed(7)
    adapter_of = {"base": None, "a1": "a", "b1": "b", "a2": "a", "b2": "b"}
    lengths = {"base": 9, "a1": 7, "b1": 11, "a2": 20, "b2": 5}
    sched = FakeScheduler(runner, seed=3)
    for rid, adapter in adapter_of.items():
        prompt = torch.randint(1, 160, (lengths[rid],), generator=gen).tolist()
        sched.add(rid, prompt, max_tokens=6, lora_request=tiny.lora(adapter))
    prompts = {rid: list(r.prompt) for rid, r in sched.requests.items()}
    hidden = record_hidden(runner)
    plan = {"base": 9, "a1": 7, "b1": 11, "a2": 12, "b2": 5}  # a2's prompt in two chunks
    num_checked = 0
    while sched.requests:
        before = {rid: (list(r.prompt + r.output), r.num_computed) for rid, r in sched.requests.items()}
        out = sched.step(plan)
        with torch.no_grad():
            logits = runner._require_model().compute_logits(hidden[-1]).float()
        start = 0
        for rid in out.req_ids:
            tokens, computed = before[rid]
            n = plan[rid]
            ref = tiny.peft.logits(adapter_of[rid], tokens[: computed + n])[computed : computed + n]
            torch.testing.assert_close(logits[start : start + n], ref, atol=1e-4, rtol=0,
                                       msg=lambda m, r=rid: f"{r}: {m}")  # fmt: skip
            start += n
            num_checked += n
        plan = {rid: r.num_tokens - r.num_computed for rid, r in sched.requests.items()}
    assert num_checked == sum(lengths.values()) + 5 * 5
    for rid, adapter in adapter_of.items():
        assert sched.done_outputs[rid] == tiny.peft.greedy(adapter, prompts[rid], 6), rid
    # the adapters really change the model: no two of base, a, b agree on the same prompt
    prompt = prompts["base"]
    outs = [tiny.peft.logits(adapter, prompt) for adapter in (None, "a", "b")]
    assert all((x - y).abs().max() > 1e-2 for i, x in enumerate(outs) for y in outs[i + 1 :])


def test_adapters_take_turns_in_one_slot(tiny: Tiny) -> None:
    runner = _lora_runner(tiny, max_loras=1)
    gen = torch.Generator().manual_seed(11)
    order = [("x1", "a"), ("x2", "b"), ("x3", None), ("x4", "a")]
    prompts = {rid: torch.randint(1, 160, (6,), generator=gen).tolist() for rid, _ in order}
    sched = FakeScheduler(runner, seed=5)
    for rid, adapter in order:  # one adapter at a time: the slot is reloaded each time the adapter changes
        sched.add(rid, prompts[rid], max_tokens=5, lora_request=tiny.lora(adapter))
        assert sched.run(budget=16)[rid] == tiny.peft.greedy(adapter, prompts[rid], 5), rid
    assert runner.lora is not None and runner.lora.slot_ids == [1]


def test_an_in_place_reload_serves_the_new_weights_from_the_next_step(tiny: Tiny) -> None:
    """vLLM's load_inplace: the id keeps its slot's place but the slot gets the new directory's weights."""
    runner = _lora_runner(tiny, max_loras=1)
    prompt = torch.randint(1, 160, (7,), generator=torch.Generator().manual_seed(13)).tolist()
    sched = FakeScheduler(runner, seed=5)
    sched.add("x1", prompt, max_tokens=5, lora_request=tiny.lora("a"))
    assert sched.run(budget=16)["x1"] == tiny.peft.greedy("a", prompt, 5)
    moved = LoRARequest("a", 1, str(tiny.adapters["b"]))  # same id, b's weights now
    with pytest.raises(ValueError, match="lora_int_id 1 already names adapter 'a'"):
        runner.add_lora(moved)
    assert runner.add_lora(moved, load_inplace=True) is True
    sched.add("x2", prompt, max_tokens=5, lora_request=moved)
    assert sched.run(budget=16)["x2"] == tiny.peft.greedy("b", prompt, 5)


# ---- adapters that cannot run ---------------------------------------------------------------------------------
def _copy(tiny: Tiny, tmp_path: Path, name: str = "a") -> Path:
    return Path(shutil.copytree(tiny.adapters[name], tmp_path / "adapter"))


def _edit_config(path: Path, **changes: Any) -> None:
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


def _edit_weights(path: Path, fn: Any) -> None:
    weights_file = path / "adapter_model.safetensors"
    save_file(fn(load_file(weights_file)), weights_file)


def _rename_first(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    key = next(k for k in tensors if old in k)
    return {
        (k.replace(old, new) if k.startswith(key.rsplit(".lora_", 1)[0]) else k): v
        for k, v in tensors.items()
    }


BAD_ADAPTERS = {
    "no_config": (lambda p: (p / "adapter_config.json").unlink(), r"adapter_config\.json does not exist"),
    "no_weights": (lambda p: (p / "adapter_model.safetensors").unlink(), r"adapter_model\.safetensors does not exist"),
    "rank_too_high": (lambda p: _edit_config(p, r=16, lora_alpha=32),
                      r"adapter_config\.json: LoRA rank 16 is greater than max_lora_rank 8"),
    "unknown_target": (lambda p: _edit_config(p, target_modules=["q_proj", "fc_in"]),
                       r"adapter_config\.json: target module 'fc_in' is not supported"),
    "module_model_lacks": (lambda p: _edit_weights(p, lambda t: _rename_first(t, "q_proj", "c_attn")),
                           r"adapter_model\.safetensors: tensor .*c_attn.* adapts module '.*c_attn', which .* does "
                           r"not have"),
    "wrong_shape": (lambda p: _edit_weights(p, lambda t: {k: (v[:, :32].contiguous() if "q_proj.lora_A" in k else v)
                                                          for k, v in t.items()}),
                    r"adapter_model\.safetensors: module '.*q_proj' has lora_A \(8, 32\) .* expected \(8, 64\)"),
    "dora": (lambda p: _edit_config(p, use_dora=True), r"adapter_config\.json: use_dora = True is not supported"),
}  # fmt: skip


def test_drafts_under_adapters_keep_the_plain_run_tokens(tiny: Tiny) -> None:
    """A request verifying drafts under an adapter, while requests under the other adapter or the base model decode
    in the same steps: each keeps the tokens of its run without drafts (the adapters' token mask covers the draft
    positions)."""
    sched = FakeScheduler(_lora_runner(tiny, max_loras=2), seed=5)
    gen = torch.Generator().manual_seed(8)
    pairs = [("a", "b"), ("b", None), (None, "a")]  # (adapter with drafts, adapter decoding alongside)
    for i, (spec, plain) in enumerate(pairs):
        prompt, other = (torch.randint(1, 160, (n,), generator=gen).tolist() for n in (9, 6))
        ref = reference(sched, f"ref{i}", prompt, SamplingParams(temperature=0.0), 24, tiny.lora(spec))
        want = reference(sched, f"ref-plain{i}", other, SamplingParams(temperature=0.0), 12, tiny.lora(plain))
        sched.add(f"plain{i}", other, max_tokens=12, lora_request=tiny.lora(plain))

        def alongside(rid: str = f"plain{i}", n: int = len(other)) -> dict[str, int]:
            req = sched.requests.get(rid)
            return {} if req is None else {rid: n if req.num_computed == 0 else 1}

        speculate(
            sched,
            f"spec{i}",
            ref,
            SamplingParams(temperature=0.0),
            160,
            alongside,
            lora_request=tiny.lora(spec),
        )
        while f"plain{i}" in sched.requests:
            sched.step(alongside())
        assert sched.done_outputs[f"plain{i}"] == want.tokens


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_refused_with_the_file_and_the_problem(tiny: Tiny, tmp_path: Path, case: str) -> None:
    runner = _lora_runner(tiny, max_loras=1)
    path = _copy(tiny, tmp_path)
    damage, message = BAD_ADAPTERS[case]
    damage(path)
    with pytest.raises(ValueError, match=message):
        runner.add_lora(LoRARequest("bad", 7, str(path)))
    assert runner.add_lora(tiny.requests["a"]) is True and runner.list_loras() == [1]


def test_lora_requests_need_enable_lora(tiny: Tiny) -> None:
    runner = make_runner(tiny.path)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        runner.add_lora(tiny.requests["a"])
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("zero", 0, "/nowhere")
    with pytest.raises(ValueError, match="max_cpu_loras \\(1\\) must be >= max_loras \\(2\\)"):
        LoRAConfig(enable_lora=True, max_loras=2, max_cpu_loras=1)


# arch -> (model class, its config, adapter a's targets, adapter b's): Phi-4-mini-like adapters on the stacked
# qkv_proj / gate_up_proj its checkpoint holds whole
GRAPH_MODELS = {
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**COMMON), ALL_TARGETS, ["q_proj", "down_proj"]),
    "phi4_mini": (tf.Phi3ForCausalLM, lambda: phi3_config("phi4_mini"),
                  ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["qkv_proj", "down_proj"]),
}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", list(GRAPH_MODELS))
def test_cuda_graphs_replay_a_mixed_adapter_batch_as_eager_runs_it(tmp_path: Path, arch: str) -> None:
    """fp32, Triton attention: decode steps replay the decode graphs and prefills the mixed ones, with the
    adapters' slots and the token mask read from their persistent buffers; tokens and hidden states equal eager's.
    Both LoRA variants replay: the one with the adapters' path in steps where a row runs an adapter, the one without
    (fused norm and activation back) in steps of base-model rows only, before and after adapter steps."""
    from lora_fixtures import write_adapter

    from treadle_model_runner import CacheConfig, ModelConfig
    from treadle_model_runner.runner import ModelRunner
    from treadle_model_runner.runner.lora_graphs import LoRAVariants

    cls, make_config, targets_a, targets_b = GRAPH_MODELS[arch]
    config = make_config()
    hf = cls(config)
    perturb_(hf.eval(), seed=4, std=0.15)
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    lora = {"a": LoRARequest("a", 1, str(write_adapter(tmp_path / "a", config, 1, 8, 16, targets_a))),
            "b": LoRARequest("b", 2, str(write_adapter(tmp_path / "b", config, 2, 4, 8, targets_b)))}  # fmt: skip
    gen = torch.Generator().manual_seed(9)
    # phase 1 mixes base rows and both adapters, two base requests outliving the others (decode steps of base
    # rows only, with adapters still in their slots); phase 2 is base rows only (prefill and decode); phase 3 an
    # adapter again
    phases = [
        [(5, None, 12), (40, "a", 12), (17, "b", 12), (3, "a", 12), (60, "b", 12), (11, None, 24), (8, "a", 12),
         (6, None, 24)],
        [(30, None, 10), (3, None, 10)],
        [(20, "b", 8)],
    ]  # fmt: skip
    prompts = [[torch.randint(1, 160, (n,), generator=gen).tolist() for n, _, _ in phase] for phase in phases]
    results = []
    for eager in (True, False):
        model_config = ModelConfig(str(tmp_path / "base"), dtype="float32", attention_backend="triton",
                                   enforce_eager=eager)  # fmt: skip
        runner = ModelRunner(model_config, CacheConfig(block_size=16, num_gpu_blocks_override=64), 8, 64, "cuda",
                             lora_config=LoRAConfig(enable_lora=True, max_loras=2, max_lora_rank=8))  # fmt: skip
        runner.load_model()
        runner.initialize_kv_cache()
        assert runner.add_lora(lora["a"]) and runner.lora is not None  # host copies: page-locked, model dtype
        weights = list(runner.lora.cache.adapters[1].modules.values())
        assert all(t.is_pinned() and t.dtype == runner.dtype for w in weights for t in (w.lora_a, w.lora_b))
        replays: dict[str, list[int]] = {}
        if not eager:
            assert runner.mixed_graphs is not None
            for kind, graphs in (("decode", runner.graphs), ("mixed", runner.mixed_graphs.graphs)):
                assert isinstance(graphs, LoRAVariants), graphs
                for variant, captured in (("with", graphs.with_adapters), ("without", graphs.without)):
                    log = replays.setdefault(f"{kind} {variant}", [])
                    replay = captured.replay
                    captured.replay = lambda size, r=replay, log=log: (log.append(size), r(size))[1]  # type: ignore[method-assign]
        hidden = record_hidden(runner)
        tokens: dict[str, list[int]] = {}
        for p, (phase, phase_prompts) in enumerate(zip(phases, prompts, strict=True)):
            sched = FakeScheduler(runner, seed=2 + p)
            for i, ((_, adapter, max_tokens), prompt) in enumerate(zip(phase, phase_prompts, strict=True)):
                sched.add(
                    f"p{p}r{i}",
                    prompt,
                    max_tokens=max_tokens,
                    lora_request=lora[adapter] if adapter else None,
                )
            tokens |= sched.run(budget=64)
        results.append((tokens, [h.cpu() for h in hidden]))
        assert eager or all(replays.values()), {k: len(v) for k, v in replays.items()}
    (tokens, hidden), (graph_tokens, graph_hidden) = results
    assert graph_tokens == tokens
    for h, h_graph in zip(hidden, graph_hidden, strict=True):
        torch.testing.assert_close(h_graph, h, atol=1e-4, rtol=1e-4)
