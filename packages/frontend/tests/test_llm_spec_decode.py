"""End to end with the real model runner: the offline `LLM` on a tiny random Llama (built and saved here, nothing
downloaded) gives the same tokens, finish reasons, text and logprobs with `speculative_config` (n-gram drafts,
verified by the runner) as without, for greedy, seeded-sampled and penalized requests on repetitive prompts, with
stop tokens and max_tokens cutting accepted runs and under a regex; and drafts were accepted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_assets import build_tokenizer_dir

from treadle_frontend import LLM
from treadle_model_runner import SamplingParams, StructuredOutputsParams

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
FOX = "(the |quick |brown |fox |dog |lazy )+"
# float32 also on a GPU: bfloat16 may break a near tie differently in a step with drafts than in a decode step
ENGINE: dict[str, Any] = {
    "max_model_len": 512,
    "kv_cache_space": 0.05,
    "max_num_batched_tokens": 256,
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    return build_cycle_model(tmp_path_factory.mktemp("tiny_llama_spec"))


def build_cycle_model(directory: Path) -> tuple[Path, list[int]]:
    """Random layers; the unembedding favours, after token t, its successor in short random cycles (6 tokens), by
    about 0.75 of the probability: replies repeat, so n-gram drafts get accepted, and sampling still strays."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = build_tokenizer_dir(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=400, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    order = (torch.randperm(397) + 3).tolist()  # the specials 0-2 stay out of the cycles
    successor = list(range(400))
    for i in range(0, 397, 6):
        cycle = order[i : i + 6]
        for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            successor[a] = b
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.copy_(torch.randn_like(head) * 0.2)
        head[successor] += embed * 10.0
    model.save_pretrained(path, safe_serialization=True)
    return path, successor


def _prompts(successor: list[int]) -> list[Any]:
    loops = [{"prompt_token_ids": [5 + i, 17, 33, 90, 41, 7 + 3 * i] * 6} for i in range(3)]
    cycle = [10]
    for _ in range(19):
        cycle.append(successor[cycle[-1]])
    # the last prompt already holds the cycle its reply follows: drafts are right from the first decode step
    fox = "the quick brown fox jumps over the lazy dog, " * 4
    return [*loops, fox, {"prompt_token_ids": cycle}, fox, "Hello world! " * 5]


def _params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=11, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=37, repetition_penalty=1.3, frequency_penalty=0.2),
        SamplingParams(
            temperature=0.7, seed=5, max_tokens=45, logprobs=1, presence_penalty=0.3, min_tokens=4
        ),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_token]),
        # under a grammar: the runner masks each draft position with the grammar advanced over the drafts before it
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=FOX)),
        SamplingParams(
            temperature=0.8, seed=3, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=FOX)
        ),
    ]


def _run(
    model: tuple[Path, list[int]], params: list[SamplingParams], **options: Any
) -> tuple[list[Any], Any]:
    path, successor = model
    llm = LLM(str(path), **ENGINE, **options)
    try:
        outs = llm.generate(_prompts(successor), params, use_tqdm=False)
        stats = llm.client.get_stats()  # type: ignore[attr-defined]
    finally:
        llm.shutdown()
    return [o.outputs[0] for o in outs], stats


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_same_output_with_and_without_speculation(
    model: tuple[Path, list[int]], async_scheduling: bool
) -> None:
    """async_scheduling: the speculative engine schedules ahead only while nothing is to be drafted (core.py)."""
    _, successor = model
    cycle_end = _prompts(successor)[4]["prompt_token_ids"][-1]
    # the greedy reply to the last prompt continues its cycle: stop at the reply's third token, which one
    # verification step returns among accepted drafts (and drops the drafts after it)
    stop_token = successor[successor[successor[cycle_end]]]
    params = _params(stop_token)
    plain, plain_stats = _run(model, params)
    spec, stats = _run(model, params, speculative_config=SPEC, async_scheduling=async_scheduling)
    assert plain_stats.spec_num_drafts == 0
    assert stats.spec_num_accepted_tokens > 20, stats
    assert stats.spec_num_accepted_tokens == sum(stats.spec_num_accepted_tokens_per_pos)
    assert stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # some drafts were also rejected
    assert plain[4].finish_reason == "stop" and len(plain[4].token_ids) == 3
    for reply in plain[5:]:  # cut by max_tokens: whole words, then the start of one
        tail = re.fullmatch(f"({FOX})*(.*)", reply.text, re.S)
        assert tail is not None and any(w.startswith(tail[3]) for w in FOX[1:-2].split("|")), reply.text
    assert_same_outputs(plain, spec)


def assert_same_outputs(plain: list[Any], spec: list[Any]) -> None:
    """Per request: the same tokens, text, finish and stop reasons; logprobs with the same top tokens, values
    within 1e-4."""
    for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
        assert b.token_ids == a.token_ids, f"request {i}"
        assert (b.text, b.finish_reason, b.stop_reason) == (a.text, a.finish_reason, a.stop_reason), i
        assert (a.logprobs is None) == (b.logprobs is None)
        for pos_a, pos_b in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert list(pos_a) == list(pos_b), f"request {i}: top tokens differ"
            assert [e.logprob for e in pos_b.values()] == pytest.approx(
                [e.logprob for e in pos_a.values()], abs=1e-4
            )


def test_preemption_with_drafts_on_the_real_runner(model: tuple[Path, list[int]]) -> None:
    """A KV cache of 16 blocks of 16 tokens for seven requests of 5 to 8 blocks each: requests verifying
    drafts are preempted (their KV recomputed) and still reply as without drafts."""
    stats = check_preemption(model, SPEC)
    assert stats.spec_num_accepted_tokens > 0, stats


def tokens_and_stats(
    path: Path, prompts: list[Any], params: Any, spec: Any = None, **options: Any
) -> tuple[list[list[int]], Any]:
    """Each request's tokens and the engine's stats, from an `LLM` with ENGINE overridden by `options`."""
    llm = LLM(str(path), **{**ENGINE, **options}, **({"speculative_config": spec} if spec else {}))
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], llm.client.get_stats()  # type: ignore[attr-defined]
    finally:
        llm.shutdown()


def check_preemption(model: tuple[Path, list[int]], spec: Any) -> Any:
    """17 blocks of 16 tokens for seven requests of 5 to 8 blocks each, greedy and seeded: with `spec` the
    requests are preempted and reply as without it; returns the speculative engine's stats."""
    params = [SamplingParams(temperature=0.0, max_tokens=45, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=7, max_tokens=45, ignore_eos=True)]  # fmt: skip
    options: dict[str, Any] = {"num_gpu_blocks_override": 17, "block_size": 16, "max_model_len": 256}
    prompts = _prompts(model[1])[:5] + _prompts(model[1])[:2]
    per_request = [params[i % 2] for i in range(7)]
    plain, _ = tokens_and_stats(model[0], prompts, per_request, **options)
    spec_tokens, stats = tokens_and_stats(model[0], prompts, per_request, spec, **options)
    assert spec_tokens == plain
    assert stats.num_preemptions > 0, stats
    return stats
