"""Speculative decoding on a GPU with CUDA graphs (marked gpu): plain decode steps replay the one-token-per-request
decode graphs, steps with drafts never do (they take the piecewise / one-request prefill graphs or run eagerly),
and the tokens are those of the run without drafts.

float32: exactly (greedy, seeded top-k / top-p, penalties, logprobs within 1e-4). bfloat16: the decode graph and
the multi-token path round differently, so a near tie may go the other way; the replies must agree until the first
difference, and that difference must be a near tie of the run without drafts (its two candidates' scores within
0.1: raw logits for greedy, logits / T minus the log of the seeded noise for a seeded sample)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from spec_decode_driver import PATTERN, Reference, drafts_for, reference, speculate
from test_runner_fakes import FakeScheduler, release_gpu_runner, save_llama

from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams, SpeculativeConfig
from treadle_model_runner.runner import ModelRunner
from treadle_model_runner.sample.gumbel import seeded_uniform

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 128
PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 12, 13], [40, 41, 42, 43], [90, 5, 77, 23, 23, 61, 8, 100, 3, 2, 9]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_spec_gpu"), 7, vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)  # fmt: skip


def _gpu_runner(path: Path, dtype: str) -> tuple[ModelRunner, list[tuple[bool, int]]]:
    """A CUDA runner with its graphs, and a log of (step had drafts, decode-graph replays in it) per step."""
    config = ModelConfig(str(path), dtype=dtype, attention_backend="triton")
    runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=128), 8, 64, "cuda",
                         speculative_config=SpeculativeConfig(num_speculative_tokens=5))  # fmt: skip
    runner.load_model()
    runner.initialize_kv_cache()
    assert runner.graphs is not None and runner.graphs.has(1)
    log: list[tuple[bool, int]] = []
    replays = [0]
    replay, execute = runner.graphs.replay, runner.execute

    def counting_replay(size: int) -> torch.Tensor:
        replays[0] += 1
        return replay(size)

    def logging_execute(so: Any) -> Any:
        before = replays[0]
        out = execute(so)
        log.append((any(so.scheduled_spec_decode_tokens.values()), replays[0] - before))
        return out

    runner.graphs.replay = counting_replay  # type: ignore[method-assign]
    runner.execute = logging_execute  # type: ignore[method-assign]
    return runner, log


def _check_routing(log: list[tuple[bool, int]]) -> None:
    assert any(drafts for drafts, _ in log), "no step verified drafts"
    assert all(n == 0 for drafts, n in log if drafts), "a step with drafts replayed a decode graph"
    assert sum(n for drafts, n in log if not drafts) > 0, (
        "the plain decode steps did not replay the decode graphs"
    )


FP32_PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=42),
    SamplingParams(
        temperature=0.9, seed=9, repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=0.8
    ),
    SamplingParams(temperature=0.7, top_p=0.95, seed=3, logprobs=4),
]


def test_float32_drafts_equal_the_graph_decoded_run(llama: Path) -> None:
    runner, log = _gpu_runner(llama, "float32")
    sched = FakeScheduler(runner)
    for i, params in enumerate(FP32_PARAMS):
        ref = reference(sched, f"ref{i}", PROMPTS[i % len(PROMPTS)], params, 40)
        speculate(sched, f"spec{i}", ref, params, VOCAB, tol=1e-4)
    _check_routing(log)
    release_gpu_runner(runner)


def _score_gap(ref: Reference, p: int, a: int, b: int, params: SamplingParams) -> float:
    """How far the run without drafts was from choosing b over a at output index p."""
    lp = ref.logprobs[p]
    assert lp is not None
    values = dict(zip(lp.token_ids[1:], lp.logprobs[1:], strict=True))  # the whole vocabulary
    if params.is_greedy:
        return values[a] - values[b]
    assert params.seed is not None
    seed = params.seed & (2**64 - 1)
    position = torch.tensor([len(ref.prompt) + p])
    u = seeded_uniform(torch.tensor([seed & 0xFFFFFFFF]), torch.tensor([seed >> 32]), position, VOCAB)[0]

    def log_noise(t: int) -> float:  # the sampler's score of t is logit / T - log E_t, E_t = -log U_t
        return math.log(-math.log(float(u[t])))

    return (values[a] - values[b]) / params.temperature - (log_noise(a) - log_noise(b))


def _speculate_until_a_near_tie(
    sched: FakeScheduler, req_id: str, ref: Reference, params: SamplingParams
) -> int:
    """Like spec_decode_driver.speculate, tolerating one bf16 near tie (then it stops); returns tokens compared."""
    sched.add(req_id, ref.prompt, params, max_tokens=len(ref.tokens))
    out = sched.step({req_id: len(ref.prompt)})
    got = out.sampled_token_ids[out.req_id_to_index[req_id]]
    for k, wrong in PATTERN * 10:
        expected = ref.tokens[: len(got)]
        if got != expected:
            p = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
            assert abs(_score_gap(ref, p, expected[p], got[p], params)) < 0.1, (p, got, expected)
            if req_id in sched.requests:
                sched.finish(req_id)
            return p
        if len(got) >= len(ref.tokens):
            return len(got)
        drafts, _ = drafts_for(ref, len(got), min(k, len(ref.tokens) - len(got) - 1), wrong, VOCAB)
        out = sched.step({req_id: 1 + len(drafts)}, {req_id: drafts})
        got = got + out.sampled_token_ids[out.req_id_to_index[req_id]]
    raise AssertionError("the pattern ran out")


def test_bfloat16_drafts_follow_the_graph_decoded_run(llama: Path) -> None:
    runner, log = _gpu_runner(llama, "bfloat16")
    sched = FakeScheduler(runner)
    compared = 0
    for i, params in enumerate([SamplingParams(temperature=0.0, logprobs=-1),
                                SamplingParams(temperature=0.9, seed=77, logprobs=-1)]):  # fmt: skip
        for j, prompt in enumerate(PROMPTS):
            ref = reference(sched, f"ref{i}-{j}", prompt, params, 32)
            compared += _speculate_until_a_near_tie(sched, f"spec{i}-{j}", ref, params)
    assert compared >= 100, compared  # most of the 192 tokens agreed before any near tie
    _check_routing(log)
    release_gpu_runner(runner)
