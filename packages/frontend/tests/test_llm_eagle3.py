"""EAGLE-3 speculative decoding end to end (speculative_config {"method": "eagle3", "model": ...}): the offline `LLM`
with the real scheduler (its lookahead slots for the runner's drafter, chunked prefills, preemption) on a tiny random
Llama of six layers gives the same tokens, finish reasons, text and logprobs as without speculation, with async
scheduling on and off, for a random EAGLE-3 head (a draft vocabulary of half the target's, mapped through d2t); a
prefix hit computes its last block again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_llm_spec_decode import ENGINE, _params, _prompts, _run, assert_same_outputs, check_preemption
from tiny_assets import build_tokenizer_dir

from treadle_frontend import LLM
from treadle_model_runner import SamplingParams

VOCAB, HIDDEN = 400, 64


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """Six layers (EAGLE-3 taps layers 2, 3 and 3); the unembedding favours a successor of the current token in
    short random cycles, as test_llm_spec_decode.py's target."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = build_tokenizer_dir(tmp_path_factory.mktemp("eagle3_target"))
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    target = LlamaForCausalLM(config).eval()
    order = (torch.randperm(VOCAB - 3) + 3).tolist()
    successor = list(range(VOCAB))
    for i in range(0, VOCAB - 3, 6):
        cycle = order[i : i + 6]
        for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            successor[a] = b
    with torch.no_grad():
        head = target.lm_head.weight
        head.copy_(torch.randn_like(head) * 0.2)
        head[successor] += target.model.embed_tokens.weight * 10.0
    target.save_pretrained(path, safe_serialization=True)
    return path, successor


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-layer EAGLE-3 head in the EAGLE repo's layout; draft id i is target id 2 i + 1."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("eagle3_head")
    h, inter, q, kv, draft_vocab = HIDDEN, 96, HIDDEN, HIDDEN // 2, VOCAB // 2
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": h, "intermediate_size": inter, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 2048,
        "vocab_size": VOCAB, "draft_vocab_size": draft_vocab, "tie_word_embeddings": False,
    }  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    shapes = {
        "fc.weight": (h, 3 * HIDDEN), "midlayer.self_attn.q_proj.weight": (q, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * h), "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q), "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h), "midlayer.mlp.down_proj.weight": (h, inter),
        "lm_head.weight": (draft_vocab, h),
    }  # fmt: skip
    tensors = {name: torch.randn(*shape, generator=gen) * 0.2 for name, shape in shapes.items()}
    for norm in (
        "midlayer.input_layernorm",
        "midlayer.hidden_norm",
        "midlayer.post_attention_layernorm",
        "norm",
    ):
        tensors[f"{norm}.weight"] = 1.0 + torch.randn(h, generator=gen) * 0.1
    tensors["d2t"] = torch.arange(draft_vocab) + 1
    tensors["t2d"] = torch.zeros(VOCAB, dtype=torch.bool)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _spec(head: Path, k: int = 3) -> dict[str, Any]:
    return {"method": "eagle3", "model": str(head), "num_speculative_tokens": k}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_same_output_with_eagle3(model: tuple[Path, list[int]], head: Path, async_scheduling: bool) -> None:
    _, successor = model
    stop_token = successor[successor[successor[_prompts(successor)[4]["prompt_token_ids"][-1]]]]
    params = _params(stop_token)
    plain, _ = _run(model, params)
    spec, stats = _run(model, params, speculative_config=_spec(head), async_scheduling=async_scheduling)
    assert stats.spec_num_draft_tokens > 100, stats
    assert stats.spec_num_accepted_tokens == sum(stats.spec_num_accepted_tokens_per_pos)
    assert_same_outputs(plain, spec)


def test_preemption_with_eagle3(model: tuple[Path, list[int]], head: Path) -> None:
    """Requests preempted (target and head KV recomputed) reply as without speculation."""
    stats = check_preemption(model, _spec(head))
    assert stats.spec_num_draft_tokens > 0, stats


def test_a_prefix_hit_computes_its_last_block_again(model: tuple[Path, list[int]], head: Path) -> None:
    """Under EAGLE-3 a prefix hit leaves its last block to be computed again (the head's KV at the block's last
    position pairs it with the next token, this request's): 40 tokens in blocks of 16 hit 16 tokens, not 32."""
    prompt: list[Any] = [{"prompt_token_ids": [(5 * j) % 390 + 3 for j in range(40)]}]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    hits = {}
    for name, options in (("plain", {}), ("eagle3", {"speculative_config": _spec(head)})):
        llm = LLM(str(model[0]), **ENGINE, **options)
        try:
            first = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
            again = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
            hits[name] = llm.client.get_stats().prefix_cache_hits  # type: ignore[attr-defined]
        finally:
            llm.shutdown()
        assert again == first
    assert hits == {"plain": 32, "eagle3": 16}
