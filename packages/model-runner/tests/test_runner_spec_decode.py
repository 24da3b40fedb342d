"""Speculative decoding in the runner: a request fed draft tokens, some right and some wrong, returns exactly the
tokens of its run without drafts, cut where the contract says (each draft kept while it equals the sample at its
position, then that sample), with the same logprobs. Greedy and seeded sampled requests with top-k / top-p /
min-p, penalties, min_tokens, logit bias and bad words; mixed batches; async output; contract violations.
On CPU in float32; on a GPU with CUDA graphs (marked gpu, test_runner_spec_decode_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spec_decode_driver import reference, speculate
from test_runner_fakes import FakeScheduler, make_runner, save_llama

from treadle_model_runner import (
    CacheConfig,
    ModelConfig,
    ModelRunnerOutput,
    SamplingParams,
    SpeculativeConfig,
)
from treadle_model_runner.runner import ModelRunner
from treadle_model_runner.runner.profile import max_logits_rows

VOCAB = 128
EOS = 3
PROMPT = [11, 12, 13, 14, 15, 16, 17, 12, 13]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_spec"), 7, vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)  # fmt: skip


PARAMS = {
    "greedy": SamplingParams(temperature=0.0),
    "seeded": SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=42),
    "seeded-min-p": SamplingParams(temperature=1.2, min_p=0.05, seed=5),
    # strong penalties, so a runner that left the drafts out of the counts samples something else
    "greedy-penalties": SamplingParams(
        temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=1.0
    ),
    "seeded-penalties": SamplingParams(
        temperature=0.9, top_k=40, seed=9, repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=0.8
    ),
    "logprobs": SamplingParams(temperature=0.7, top_p=0.95, seed=3, logprobs=4),
    "greedy-logprobs": SamplingParams(temperature=0.0, logprobs=2, presence_penalty=0.5),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_drafts_keep_the_tokens_and_logprobs_of_the_plain_run(llama: Path, name: str) -> None:
    params = PARAMS[name]
    sched = FakeScheduler(make_runner(llama, max_num_batched_tokens=64))
    ref = reference(sched, "ref", PROMPT, params, 40)
    run = speculate(sched, "spec", ref, params, VOCAB)
    assert run.num_kept >= 15 and run.num_refused >= 5  # the steps really kept and refused drafts


def test_min_tokens_logit_bias_and_bad_words_follow_the_drafts(llama: Path) -> None:
    """EOS is banned until min_tokens outputs, counting kept drafts; a biased EOS wins soon after. A two-token bad
    word's last token is banned right after its first token, also when that first token is a draft."""
    base = dict(temperature=0.8, seed=21, stop_token_ids=[EOS], min_tokens=9, logit_bias={EOS: 3.0, 40: 1.5})
    sched = FakeScheduler(make_runner(llama))
    free = reference(sched, "free", PROMPT, SamplingParams(**base), 30).tokens  # type: ignore[arg-type]
    # a pair the unconstrained run samples becomes a bad word: the constrained run must avoid it
    p = next(i for i in range(3, len(free)) if free[i] != EOS and free[i - 1] != EOS)
    params = SamplingParams(**base, bad_words_token_ids=[[free[p - 1], free[p]]])  # type: ignore[arg-type]
    ref = reference(sched, "ref", PROMPT, params, 30)
    assert EOS not in ref.tokens[:9] and EOS in ref.tokens[9:14], ref.tokens  # min_tokens, then the bias
    assert ref.tokens[: p + 1] != free[: p + 1]  # the bad word changed the reply
    run = speculate(sched, "spec", ref, params, VOCAB)
    assert run.num_kept >= 10


def test_mixed_batch_prefills_and_plain_decodes_alongside(llama: Path) -> None:
    """Requests with drafts share steps with plain decodes and with prefills (one chunked); each request's tokens
    are those it gets alone."""
    runner = make_runner(llama, max_num_batched_tokens=64)
    sched = FakeScheduler(runner)
    gen = torch.Generator().manual_seed(3)
    prompts = {
        f"p{i}": torch.randint(0, VOCAB, (n,), generator=gen).tolist() for i, n in enumerate((5, 30, 7))
    }
    plain = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=8, logprobs=1),
             SamplingParams(temperature=0.6, seed=2, frequency_penalty=0.5)]  # fmt: skip
    refs = {
        r: reference(sched, f"ref-{r}", p, plain[i], 12).tokens for i, (r, p) in enumerate(prompts.items())
    }
    spec_params = PARAMS["seeded-penalties"]
    spec_ref = reference(sched, "ref-spec", PROMPT, spec_params, 30)
    waiting = list(prompts)

    def others() -> dict[str, int]:
        plan = {r: 1 for r, req in sched.requests.items() if r.startswith("p") and req.num_computed > 0}
        if waiting and len(sched.outputs) % 3 == 0:  # a new request now and then: its prefill rides along
            req_id = waiting.pop(0)
            sched.add(req_id, prompts[req_id], plain[int(req_id[1])], max_tokens=12)
        for r, req in sched.requests.items():
            if r.startswith("p") and req.num_computed < req.num_tokens - 1:
                plan[r] = min(req.num_tokens - req.num_computed, 16)  # a prefill chunk of at most 16
        return plan

    speculate(sched, "spec", spec_ref, spec_params, VOCAB, others)
    while any(r.startswith("p") for r in sched.requests) or waiting:
        sched.step(others())
    assert {r: sched.done_outputs[r] for r in prompts} == refs


def test_async_output_returns_a_step_with_drafts_synchronously(llama: Path) -> None:
    runner = make_runner(llama)
    sched = FakeScheduler(runner)
    params = PARAMS["seeded"]
    ref = reference(sched, "ref", PROMPT, params, 24)
    runner.async_output = True
    deferred_before = sched.deferred_steps
    speculate(sched, "spec", ref, params, VOCAB)
    assert sched.deferred_steps - deferred_before <= 2  # at most the prefill and a last draftless decode
    sched.add("plain", PROMPT, params, max_tokens=4)
    sched.run(budget=64)
    assert sched.done_outputs["plain"] == ref.tokens[:4] and sched.deferred_steps > deferred_before


def test_contract_violations_are_refused(llama: Path) -> None:
    runner = make_runner(llama)
    sched = FakeScheduler(runner)
    sched.add("r", PROMPT, SamplingParams(temperature=0.0), max_tokens=10)
    with pytest.raises(ValueError, match="must be decoding"):  # drafts on a prefill
        sched.step({"r": len(PROMPT) + 2}, {"r": [1, 2]})
    sched = FakeScheduler(make_runner(llama))
    sched.add("r", PROMPT, SamplingParams(temperature=0.0), max_tokens=10)
    sched.step({"r": len(PROMPT)})
    with pytest.raises(ValueError, match="must be decoding"):  # 1 + len(drafts) tokens, not fewer
        sched.step({"r": 2}, {"r": [1, 2]})
    sched = FakeScheduler(make_runner(llama))
    sched.add("r", PROMPT, SamplingParams(temperature=0.0), max_tokens=10)
    sched.step({"r": len(PROMPT)})
    with pytest.raises(ValueError, match="outside"):
        sched.step({"r": 3}, {"r": [1, VOCAB]})


def test_step_with_drafts_returns_one_to_k_plus_one_tokens(llama: Path) -> None:
    """The output's shape: every draft wrong gives one token, every draft right k + 1."""
    sched = FakeScheduler(make_runner(llama))
    ref = reference(sched, "ref", PROMPT, SamplingParams(temperature=0.0), 12)
    sched.add("r", PROMPT, SamplingParams(temperature=0.0), max_tokens=12)
    sched.step({"r": len(PROMPT)})
    wrong = [(t + 1) % VOCAB for t in ref.tokens[1:4]]
    out = sched.step({"r": 4}, {"r": wrong})
    assert isinstance(out, ModelRunnerOutput) and out.sampled_token_ids == [ref.tokens[1:2]]
    out = sched.step({"r": 5}, {"r": ref.tokens[2:6]})
    assert out.sampled_token_ids == [ref.tokens[2:7]]


def test_memory_profile_samples_the_draft_rows(llama: Path) -> None:
    """The GPU memory profile samples as many logits rows as a step with drafts can: (1 + k) a request, within the
    token budget."""
    model_config = ModelConfig(str(llama), dtype="float32", attention_backend="torch")
    cache_config = CacheConfig(block_size=4, num_gpu_blocks_override=64)
    for k, rows in ((None, 8), (3, 32), (20, 64)):
        spec = SpeculativeConfig(num_speculative_tokens=k) if k else None
        runner = ModelRunner(model_config, cache_config, 8, 64, "cpu", speculative_config=spec)
        assert max_logits_rows(runner) == rows
