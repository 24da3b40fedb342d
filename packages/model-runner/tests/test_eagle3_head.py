"""EAGLE-3 in the runner against a plain float64 reference (eagle3_reference.py, independent of treadle's modules):
every pass of the head (pass 0 over prefill chunks, over a verification's accepted tokens, and the drafting passes)
gives the reference's outputs and drafts. The reference takes the target's features from HF transformers' own
hidden states at vLLM's taps (2, L // 2, L - 3), pairs the token at p + 1 with the features at p, and runs the rows
causally, so this checks the taps, the token / hidden-state shift, the head's KV in the paged pool, fc, the layer,
the final norm and the draft -> target vocabulary mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from eagle3_fixtures import head_config, random_head, save_head, save_speculators_head
from eagle3_reference import aux_layers, head_logits, head_rows, target_features, to_target
from test_runner_fakes import FakeScheduler, make_runner, save_llama

from treadle_model_runner import SamplingParams, SpeculativeConfig

VOCAB, LAYERS, K = 128, 8, 3


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, dict[str, Any], dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("eagle3_head")
    target = save_llama(root / "target", 5, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256)  # fmt: skip
    # a draft vocabulary of half the target's: draft id i is target id 2 i + 1 (d2t)
    config = head_config(VOCAB, VOCAB // 2)
    tensors = random_head(config, 64, seed=1)
    return target, save_head(root / "head", config, tensors), config, tensors


def _reference(
    target: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], ids: list[int], k: int
) -> tuple[torch.Tensor, list[int]]:
    """(outputs [N - 1 + k - 1, H] of rows 0 .. N - 2 fed the target's features, then of the drafting rows; the k
    greedy drafts) for the tokens `ids` (N of them), in float64."""
    import transformers as tf

    hf = tf.LlamaForCausalLM.from_pretrained(target, torch_dtype=torch.float64).eval()
    w = {n: t.to(torch.float64) if t.is_floating_point() else t for n, t in tensors.items()}
    seq = torch.tensor(ids)
    features = target_features(hf, seq[None, :-1], aux_layers(LAYERS))[0]  # [N - 1, 3H]
    embedding = hf.model.embed_tokens.weight.detach()
    embeds, hidden = embedding[seq[1:]], features @ w["fc.weight"].T
    drafts: list[int] = []
    with torch.no_grad():
        for _ in range(k):
            positions = torch.arange(len(embeds))
            out = head_rows(w, config, embeds, hidden, positions)
            draft = int(to_target(w, head_logits(w, config, out[-1]).argmax()))
            drafts.append(draft)
            # the next drafting row: the draft with the head's own output
            embeds = torch.cat([embeds, embedding[draft][None]])
            hidden = torch.cat([hidden, out[-1:]])
    return out, drafts


def _recording(runner: Any) -> list[torch.Tensor]:
    """Every output of the head's forward from now on."""
    calls: list[torch.Tensor] = []
    head = runner.drafter.model
    forward = head.forward

    def recorded(*args: torch.Tensor) -> torch.Tensor:
        out = forward(*args)
        calls.append(out.detach().to(torch.float64).clone())
        return out

    head.forward = recorded
    return calls


def test_every_pass_matches_the_reference(
    models: tuple[Path, Path, dict[str, Any], dict[str, torch.Tensor]],
) -> None:
    target, head, config, tensors = models
    spec = SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=K)
    runner = make_runner(target, speculative_config=spec)
    assert runner.drafter is not None and runner.drafter.model.__class__.__name__ == "Eagle3LlamaForCausalLM"
    calls = _recording(runner)
    sched = FakeScheduler(runner)
    sched.lookahead = K
    gen = torch.Generator().manual_seed(0)
    prompts = {"a": torch.randint(0, VOCAB, (13,), generator=gen).tolist(),
               "b": torch.randint(0, VOCAB, (6,), generator=gen).tolist()}  # fmt: skip
    for req_id, prompt in prompts.items():
        sched.add(req_id, prompt, SamplingParams(temperature=0.0), max_tokens=12)
    # a's prompt in two chunks, b's whole beside a's second: pass 0 over both, then the drafting passes
    out = sched.step({"a": 8})
    assert out.draft_token_ids == {} and len(calls) == 1 and calls[0].shape[0] == 8
    out = sched.step({"a": 5, "b": 6})
    # pass 0 over 5 + 6 rows, then passes 1 and 2: a row each
    assert len(calls) == 1 + K and calls[1].shape[0] == 11
    for row, (req_id, prompt) in enumerate(prompts.items()):
        ids = prompt + sched.requests[req_id].output
        ref, drafts = _reference(target, config, tensors, ids, K)
        assert out.draft_token_ids[req_id] == drafts, req_id
        got = calls[1][:5] if req_id == "a" else calls[1][5:]
        if req_id == "a":
            got = torch.cat([calls[0], got])
        drafting = torch.stack([calls[2][row], calls[3][row]])
        torch.testing.assert_close(torch.cat([got, drafting]), ref, atol=2e-4, rtol=2e-4)
    # verification: a keeps some drafts (a wrong one stops it), b none; pass 0 then covers each row's accepted
    # positions only, with the target's features, and drafts again from the new sample
    verify = {"a": [*out.draft_token_ids["a"][:1], (out.draft_token_ids["a"][1] + 1) % VOCAB],
              "b": [(out.draft_token_ids["b"][0] + 1) % VOCAB]}  # fmt: skip
    before = len(calls)
    out = sched.step({r: 1 + len(d) for r, d in verify.items()}, verify)
    for req_id, prompt in prompts.items():
        ids = prompt + sched.requests[req_id].output
        ref, drafts = _reference(target, config, tensors, ids, K)
        assert out.draft_token_ids[req_id] == drafts, req_id
    pass_zero = calls[before]
    kept = {r: len(out.sampled_token_ids[out.req_id_to_index[r]]) for r in verify}
    assert pass_zero.shape[0] == sum(kept.values())
    ref_a, _ = _reference(target, config, tensors, prompts["a"] + sched.requests["a"].output, K)
    n_a = len(prompts["a"]) + len(sched.requests["a"].output)
    torch.testing.assert_close(
        pass_zero[: kept["a"]], ref_a[n_a - 1 - kept["a"] : n_a - 1], atol=2e-4, rtol=2e-4
    )


def test_a_speculators_checkpoint_matches_the_reference(
    models: tuple[Path, Path, dict[str, Any], dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """The same head in the speculators format, whose default norm_before_residual (the normed hidden state joins
    the residual stream) the reference follows too."""
    target, _, config, tensors = models
    head = save_speculators_head(tmp_path / "speculators", config, tensors)
    runner = make_runner(target, speculative_config=SpeculativeConfig(method="eagle3", model=str(head),
                                                                      num_speculative_tokens=K))  # fmt: skip
    calls = _recording(runner)
    sched = FakeScheduler(runner)
    sched.lookahead = K
    prompt = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(5)).tolist()
    sched.add("a", prompt, SamplingParams(temperature=0.0), max_tokens=8)
    out = sched.step({"a": len(prompt)})
    ref, drafts = _reference(target, {**config, "norm_before_residual": True}, tensors,
                             prompt + sched.requests["a"].output, K)  # fmt: skip
    assert out.draft_token_ids["a"] == drafts
    torch.testing.assert_close(torch.cat(calls), ref, atol=2e-4, rtol=2e-4)
    _, plain = _reference(target, config, tensors, prompt + sched.requests["a"].output, K)
    assert plain != drafts  # the flag matters for this head
