"""Parity with HF transformers (CPU, fp32) on tiny random configs, driven through the ModelRunner.

For Llama (llama3 rope scaling), Mistral (sliding window), Qwen2 (qkv bias, tied embeddings), Qwen3 (q/k norm), Gemma3 (sliding +
global layers with a window small enough to matter, linear-scaled global rope, softcapping) and Gemma2 (the same with
attention scores soft-capped): one step mixing a
fresh prefill, a chunked prefill continuing on cached blocks and several decodes gives per-position logits
within 1e-4 of HF, and greedy 32-token continuations equal HF `generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden

COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)


def _config(arch: str) -> Any:
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
        return tf.LlamaConfig(
            **COMMON, rope_parameters=rope, attention_bias=True, mlp_bias=True
        ), tf.LlamaForCausalLM
    if arch == "mistral":  # sliding window over every layer, short enough to matter
        return tf.MistralConfig(**COMMON, head_dim=16, sliding_window=7), tf.MistralForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=True), tf.Qwen2ForCausalLM
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=16), tf.Qwen3ForCausalLM
    if arch == "gemma3":
        rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}  # fmt: skip
        config = tf.Gemma3TextConfig(
            **COMMON, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, final_logit_softcapping=20.0, rope_parameters=rope,
        )  # fmt: skip
        return config, tf.Gemma3ForCausalLM
    if arch == "gemma2":  # attention scores soft-capped low enough to bite, one rope, no q/k norms
        config = tf.Gemma2Config(
            **COMMON, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=20.0,
        )  # fmt: skip
        return config, tf.Gemma2ForCausalLM
    raise AssertionError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma2"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    config, cls = _config(request.param)
    torch.manual_seed(ARCHS.index(request.param))
    hf = cls(config).eval()
    perturb_(hf, seed=1, std=0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def _hf_logits(hf: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def test_mixed_batch_logits_match_hf(tiny: tuple[Any, Path]) -> None:
    hf, path = tiny
    runner = make_runner(path)
    gen = torch.Generator().manual_seed(7)
    prompts = {name: torch.randint(1, 160, (n,), generator=gen).tolist()
               for name, n in {"chunked": 23, "b": 5, "c": 7, "d": 9, "fresh": 11}.items()}  # fmt: skip
    sched = FakeScheduler(runner, seed=3)
    for name, prompt in prompts.items():
        sched.add(name, prompt, max_tokens=4)
    sched.step({"chunked": 10, "b": 5, "c": 7, "d": 9})

    hidden = record_hidden(runner)
    before = {name: (list(r.prompt + r.output), r.num_computed) for name, r in sched.requests.items()}
    plan = {"chunked": 13, "fresh": 11, "b": 1, "c": 1, "d": 1}
    out = sched.step(plan)
    with torch.no_grad():
        logits = runner._require_model().compute_logits(hidden[0]).float()

    start = 0
    for req_id in out.req_ids:
        tokens, computed = before[req_id]
        n = plan[req_id]
        ref = _hf_logits(hf, tokens[: computed + n])[computed : computed + n]
        got = logits[start : start + n]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=lambda m, r=req_id: f"{r}: {m}")
        assert out.sampled_token_ids[out.req_id_to_index[req_id]] == [int(ref[-1].argmax())]
        start += n


def test_greedy_continuations_match_hf_generate(tiny: tuple[Any, Path]) -> None:
    hf, path = tiny
    runner = make_runner(path, max_num_batched_tokens=16)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 160, (n,), generator=gen).tolist() for n in (3, 12, 30)]
    sched = FakeScheduler(runner, seed=5)
    for i, prompt in enumerate(prompts):
        sched.add(f"r{i}", prompt, max_tokens=32)
    got = sched.run(budget=16)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
        assert got[f"r{i}"] == ref, f"prompt {i}: treadle {got[f'r{i}']} != HF {ref}"
