"""EAGLE-3 serving on CPU: EAGLE-3 heads trained here (200 Adam steps on eagle3_reference.py's math) to predict a
tiny target's own greedy continuations from its hidden states are saved as EAGLE-3 checkpoints and served: their
drafts are mostly accepted, an untrained head's almost never; and with any head every request's tokens are those
of the run without speculation (greedy, seeded sampling, penalties; prefills chunked beside verifications), since
drafts only decide how many tokens a step keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from eagle3_fixtures import head_config, random_head, save_head, serve
from eagle3_reference import aux_layers, target_features, train_head
from test_runner_fakes import make_runner

from treadle_model_runner import SamplingParams, SpeculativeConfig

VOCAB, LAYERS, HIDDEN, K = 128, 8, 64, 3
PROMPT, CONTINUATION = 4, 16


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The target: random layers, its unembedding favouring a successor of the current token (a random
    permutation), so nearly all its greedy tokens follow from the last one. Heads: trained on the target's greedy
    continuations of random prompts and its hidden states at vLLM's taps; "hidden-only" never sees the tokens (its
    input_layernorm is zero), so it drafts from the target's hidden states alone; "untrained" is random."""
    import transformers as tf

    root = tmp_path_factory.mktemp("eagle3_serving")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)  # fmt: skip
    hf = tf.LlamaForCausalLM(config).eval()
    successor = torch.randperm(VOCAB)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(2.0)
        hf.lm_head.weight.copy_(torch.randn_like(hf.lm_head.weight) * 0.02)
        hf.lm_head.weight[successor] += hf.model.embed_tokens.weight * 60.0
    hf.save_pretrained(root / "target", safe_serialization=True)
    paths = {"target": root / "target"}
    prompts = torch.randint(0, VOCAB, (64, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, pad_token_id=0,
                          max_new_tokens=CONTINUATION, min_new_tokens=CONTINUATION)  # fmt: skip
    features = target_features(hf, ids, aux_layers(LAYERS))
    head = head_config(VOCAB, VOCAB)
    untrained = random_head(head, HIDDEN, seed=0, std=0.05)
    untrained["d2t"].zero_()
    paths["untrained"] = save_head(root / "untrained", head, untrained)
    embedding = hf.model.embed_tokens.weight.detach()
    for name, embeds in (("trained", embedding), ("hidden-only", torch.zeros_like(embedding))):
        weights = {k: v.clone() for k, v in untrained.items()}
        weights["lm_head.weight"] /= 5
        train_head(weights, head, embeds, ids, features, PROMPT, steps=200)
        if name == "hidden-only":
            weights["midlayer.input_layernorm.weight"].zero_()
        paths[name] = save_head(root / name, head, weights)
    return paths


def _held_out(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (PROMPT,), generator=gen).tolist() for _ in range(n)]


def _runner(target: Path, head: Path | None) -> Any:
    spec = SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=K) if head else None
    return make_runner(target, speculative_config=spec, max_num_batched_tokens=32)


def test_trained_heads_have_their_drafts_accepted(models: dict[str, Path]) -> None:
    """Drafts kept per verification (of up to 3), measured: trained 2.04, hidden-only 1.32, untrained 0.02. Broken
    on purpose, the trained head falls to 0.40 reading the token at p instead of p + 1; the hidden-only head to 0.04
    with the target's hidden states one position late, 1.04 tapping each layer's output instead of its input, 0.74
    with the taps in reverse order. (One tap one layer off leaves it at 1.26: neighbouring residual streams of this
    target carry nearly the same features; test_eagle3_head.py catches that against its reference.)"""
    prompts = _held_out(16, seed=1)
    greedy = [SamplingParams(temperature=0.0)] * len(prompts)
    plain = serve(_runner(models["target"], None), prompts, greedy, CONTINUATION, budget=32)
    served = {
        name: serve(_runner(models["target"], models[name]), prompts, greedy, CONTINUATION, budget=32)
        for name in ("trained", "hidden-only", "untrained")
    }
    assert all(s.outputs == plain.outputs for s in served.values())
    assert served["trained"].mean_accepted > 1.5, served["trained"]
    assert served["hidden-only"].mean_accepted > 1.15, served["hidden-only"]
    assert served["untrained"].mean_accepted < 0.1, served["untrained"]
    # fewer steps for the same tokens
    assert served["trained"].num_verifications < served["untrained"].num_verifications


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_outputs_equal_those_without_speculation(models: dict[str, Path], which: str) -> None:
    """Mixed requests, prompts longer than the step budget (chunked prefills beside verifications)."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (4, 45, 9, 70, 5, 17)]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=11, top_k=40),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.3),
        SamplingParams(temperature=1.0, seed=5, top_p=0.9),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.7, seed=3, presence_penalty=0.5, min_p=0.05),
    ]
    plain = serve(_runner(models["target"], None), prompts, params, 20, budget=24)
    spec = serve(_runner(models["target"], models[which]), prompts, params, 20, budget=24)
    assert spec.outputs == plain.outputs
    assert spec.num_verifications > 20 and spec.num_draft_tokens > spec.num_accepted, spec
    if which == "trained":
        assert spec.num_accepted > 10, spec
