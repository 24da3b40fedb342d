"""EAGLE-3 serving on CPU: an EAGLE-3 head trained here (a few hundred Adam steps on eagle3_reference.py's math)
to predict a tiny target's own greedy continuations from its hidden states is saved as an EAGLE-3 checkpoint and
served: its drafts are mostly accepted, an untrained head's almost never; and with either head every request's
tokens are those of the run without speculation (greedy, seeded sampling, penalties; prefills chunked beside
verifications), since drafts only decide how many tokens a step keeps."""

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
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(target, trained head, untrained head). The target: random layers, its unembedding favouring a successor
    of the current token (a random permutation), so about half of its greedy tokens follow from the last one and
    the rest from the context."""
    import transformers as tf

    root = tmp_path_factory.mktemp("eagle3_serving")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)  # fmt: skip
    hf = tf.LlamaForCausalLM(config).eval()
    successor = torch.randperm(VOCAB)
    with torch.no_grad():
        hf.lm_head.weight.copy_(torch.randn_like(hf.lm_head.weight) * 0.02)
        hf.lm_head.weight[successor] += hf.model.embed_tokens.weight * 60.0
    target = root / "target"
    hf.save_pretrained(target, safe_serialization=True)
    # training data: the target's greedy continuations of random prompts, its hidden states at vLLM's taps
    prompts = torch.randint(0, VOCAB, (64, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, pad_token_id=0,
                          max_new_tokens=CONTINUATION, min_new_tokens=CONTINUATION)  # fmt: skip
    features = target_features(hf, ids, aux_layers(LAYERS))
    head = head_config(VOCAB, VOCAB)
    untrained = random_head(head, HIDDEN, seed=0, std=0.05)
    untrained["d2t"].zero_()
    weights = {k: v.clone() for k, v in untrained.items()}
    weights["lm_head.weight"] /= 5
    train_head(weights, head, hf.model.embed_tokens.weight.detach(), ids, features, PROMPT, steps=200)
    return target, save_head(root / "trained", head, weights), save_head(root / "untrained", head, untrained)


def _held_out(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (PROMPT,), generator=gen).tolist() for _ in range(n)]


def _runner(target: Path, head: Path | None) -> Any:
    spec = SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=K) if head else None
    return make_runner(target, speculative_config=spec, max_num_batched_tokens=32)


def test_a_trained_head_has_its_drafts_accepted(models: tuple[Path, Path, Path]) -> None:
    """Measured: the trained head keeps 0.39 drafts per verification (of up to 3), the untrained 0.01; one that
    pairs each token with the wrong position's hidden state, or reads the token at p instead of p + 1, keeps far
    fewer (0.07 for the token off by one)."""
    target, trained, untrained = models
    prompts = _held_out(16, seed=1)
    greedy = [SamplingParams(temperature=0.0)] * len(prompts)
    plain = serve(_runner(target, None), prompts, greedy, CONTINUATION, budget=32)
    good = serve(_runner(target, trained), prompts, greedy, CONTINUATION, budget=32)
    bad = serve(_runner(target, untrained), prompts, greedy, CONTINUATION, budget=32)
    assert good.outputs == plain.outputs and bad.outputs == plain.outputs
    assert good.mean_accepted > 0.25, good
    assert bad.mean_accepted < 0.1, bad
    assert good.num_verifications < bad.num_verifications  # fewer steps for the same tokens


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_outputs_equal_those_without_speculation(models: tuple[Path, Path, Path], which: str) -> None:
    """Mixed requests, prompts longer than the step budget (chunked prefills beside verifications)."""
    target, trained, untrained = models
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
    plain = serve(_runner(target, None), prompts, params, 20, budget=24)
    spec = serve(
        _runner(target, trained if which == "trained" else untrained), prompts, params, 20, budget=24
    )
    assert spec.outputs == plain.outputs
    assert spec.num_verifications > 20 and spec.num_draft_tokens > spec.num_accepted, spec
    if which == "trained":
        assert spec.num_accepted > 10, spec
