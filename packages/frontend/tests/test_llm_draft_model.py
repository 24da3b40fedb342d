"""Draft-model speculative decoding end to end (speculative_config {"model": ...}): the offline `LLM` on the tiny
random Llama of test_llm_spec_decode.py, with a draft model built here (another architecture's shapes: one layer,
wider heads, one key/value head), gives the same tokens, finish reasons, text and logprobs as without speculation
for every kind of request there (greedy, seeded, penalized, stop tokens, grammars), with async scheduling on and
off and under preemption; a draft model equal to the target has every greedy draft accepted, so the draft's own
KV cache (its layers in the shared paged pool) and its positions are right."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_llm_spec_decode import (
    ENGINE,
    _params,
    _prompts,
    _run,
    assert_same_outputs,
    build_cycle_model,
    check_preemption,
    tokens_and_stats,
)

from treadle_frontend import LLM
from treadle_model_runner import SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    return build_cycle_model(tmp_path_factory.mktemp("tiny_llama_target"))


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory, model: tuple[Path, list[int]]) -> Path:
    """One layer, head size 32 (the target's is 16), one key/value head; its unembedding favours the target's
    successor of the input token, so many drafts are right and some are not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, successor = model
    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=400, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    draft_model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        head = draft_model.lm_head.weight
        head.copy_(torch.randn_like(head) * 0.2)
        head[successor] += draft_model.model.embed_tokens.weight * 4.0
    path = tmp_path_factory.mktemp("tiny_llama_draft")
    draft_model.save_pretrained(path, safe_serialization=True)
    return path


def _spec(path: Path, k: int = 4) -> dict[str, Any]:
    return {"model": str(path), "num_speculative_tokens": k}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_same_output_with_a_draft_model(
    model: tuple[Path, list[int]], draft: Path, async_scheduling: bool
) -> None:
    _, successor = model
    stop_token = successor[successor[successor[_prompts(successor)[4]["prompt_token_ids"][-1]]]]
    params = _params(stop_token)
    plain, _ = _run(model, params)
    spec, stats = _run(model, params, speculative_config=_spec(draft), async_scheduling=async_scheduling)
    assert stats.spec_num_accepted_tokens > 40, stats
    assert stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # some drafts were also rejected
    assert stats.spec_num_accepted_tokens == sum(stats.spec_num_accepted_tokens_per_pos)
    assert_same_outputs(plain, spec)


def test_the_target_as_its_own_draft_has_every_greedy_draft_accepted(model: tuple[Path, list[int]]) -> None:
    """The draft computes the target's own greedy continuation only if its KV (pass 0 over each step's tokens,
    passes 1..k at the drafts' positions, lookahead slots) is exact: one wrong entry and drafts get rejected."""
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)] * 7
    plain, _ = _run(model, params)
    spec, stats = _run(model, params, speculative_config=_spec(model[0], k=5))
    # each request: its prefill samples token 1, then 6 steps of 5 drafts + 1 (36 tokens) and one of 2 + 1; a
    # step short of drafts (a draft with no slot: no lookahead allocated past a block's end) would add steps
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens) == (7 * 7, 7 * (6 * 5 + 2)), stats
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens, stats
    assert_same_outputs(plain, spec)


def test_preemption_with_a_draft_model(model: tuple[Path, list[int]], draft: Path) -> None:
    """17 blocks of 16 tokens for seven requests of 5 to 8 blocks each, and lookahead slots besides: requests
    are preempted (target and draft KV recomputed) and reply as without speculation."""
    stats = check_preemption(model, _spec(draft))
    assert stats.spec_num_accepted_tokens > 0, stats


def test_a_draft_model_too_short_for_max_model_len_is_refused(
    model: tuple[Path, list[int]], draft: Path, tmp_path: Path
) -> None:
    short = tmp_path / "short_draft"
    short.mkdir()
    for f in draft.iterdir():
        (short / f.name).symlink_to(f)
    (short / "config.json").unlink()
    config = json.loads((draft / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    with pytest.raises(ValueError, match=r"speculative_config model .*max_position_embeddings \(128\)"):
        LLM(str(model[0]), **ENGINE, speculative_config=_spec(short))


def test_a_draft_model_with_another_vocabulary_is_refused(
    model: tuple[Path, list[int]], draft: Path, tmp_path: Path
) -> None:
    """Sizes within the padding of one family (here 400 against 400 + 128) run; beyond it, another tokenizer."""
    config = json.loads((draft / "config.json").read_text())
    for extra in (128, 129):
        other = tmp_path / f"vocab_{extra}"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**config, "vocab_size": 400 + extra}))
        options: dict[str, Any] = {**ENGINE, "load_format": "dummy", "speculative_config": _spec(other)}
        if extra == 128:
            LLM(str(model[0]), **options).shutdown()
            continue
        with pytest.raises(
            ValueError, match=r"vocabulary of 529 tokens and the target 400: a draft model must share"
        ):
            LLM(str(model[0]), **options)


def test_a_draft_tensor_parallel_size_other_than_the_targets_is_refused(
    model: tuple[Path, list[int]],
) -> None:
    spec = {**_spec(model[0]), "draft_tensor_parallel_size": 2}
    with pytest.raises(
        ValueError, match=r"draft_tensor_parallel_size 2: .* must equal tensor_parallel_size \(1\)"
    ):
        LLM(str(model[0]), **ENGINE, speculative_config=spec)
    LLM(str(model[0]), **ENGINE, speculative_config={**spec, "draft_tensor_parallel_size": 1}).shutdown()


def test_own_draft_on_a_context_sensitive_model(tmp_path: Path) -> None:
    """A plain random Llama (no favoured successors: each token depends on the whole context), as its own draft:
    every greedy draft is accepted only if every draft KV entry a pass reads is the target's, position for
    position (a stale entry at one position flips some of these argmaxes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    prompts: list[Any] = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 1 for j in range(3 + 9 * i)]}
                          for i in range(6)]  # fmt: skip
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    plain, _ = tokens_and_stats(tmp_path, prompts, greedy)
    spec_tokens, stats = tokens_and_stats(tmp_path, prompts, greedy, _spec(tmp_path, k=4))
    assert spec_tokens == plain
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 150, stats
    # prefix-cache hits: blocks computed for the first batch serve the second, the draft's KV in them too
    llm = LLM(str(tmp_path), **ENGINE, speculative_config=_spec(tmp_path, k=4))
    try:
        continued = [
            {"prompt_token_ids": p["prompt_token_ids"] + out[:40]}
            for p, out in zip(prompts, plain, strict=True)
        ]
        first = [o.outputs[0].token_ids for o in llm.generate(continued, greedy, use_tqdm=False)]
        again = [o.outputs[0].token_ids for o in llm.generate(continued, greedy, use_tqdm=False)]
        stats = llm.client.get_stats()  # type: ignore[attr-defined]
    finally:
        llm.shutdown()
    assert again == first and stats.prefix_cache_hits > 200, stats
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens, stats


def test_draft_model_under_tensor_parallelism(model: tuple[Path, list[int]]) -> None:
    """Two tensor-parallel ranks (gloo): each holds its shard of the target and of the draft (here the target
    itself), both in the shared paged pool; the replies equal one device's without speculation and every greedy
    draft is accepted."""
    prompts = _prompts(model[1])
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain, _ = tokens_and_stats(model[0], prompts, greedy)
    spec_tokens, stats = tokens_and_stats(
        model[0], prompts, greedy, _spec(model[0], k=3), tensor_parallel_size=2
    )
    assert spec_tokens == plain
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 100, stats
