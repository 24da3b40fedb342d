"""vLLM's whole-vocabulary logprobs (`logprobs=-1`, `prompt_logprobs=-1`), the engine's `max_logprobs` and
`detokenize=False`, offline on a tiny random Llama with real saved weights: every position holds all V tokens, each
value the float32 log-softmax HF transformers computes for the same weights; the same through the engine process
(msgspec messages, async output); requests over max_logprobs fail in vLLM's words; detokenize=False gives the
same token ids and no text."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_helpers import LLAMA, ROOT

from treadle import LLM, SamplingParams
from treadle_engine_core.messages import EngineCoreRequest

sys.path.insert(0, str(ROOT / "packages" / "frontend" / "tests"))
from tiny_assets import build_tokenizer_dir

ENGINE: dict[str, Any] = {"max_model_len": 128, "kv_cache_space": 0.05, "dtype": "float32"}
VOCAB = LLAMA["vocab_size"]
PROMPT = [5, 17, 33, 60, 8, 120]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The e2e tests' tiny Llama with random weights saved as safetensors, beside the tiny BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build_tokenizer_dir(tmp_path_factory.mktemp("tiny_llama_weights"))
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "architectures"})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # sharper logits: greedy ties are unlikely
    hf.save_pretrained(model, safe_serialization=True)
    (model / "config.json").write_text(json.dumps(LLAMA))
    return model


@pytest.fixture(scope="module")
def hf_logprobs(tiny: Path) -> Any:
    """ids -> [len(ids), V] float64 log-softmax of HF's float32 logits for the sequence."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = hf(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits.double(), dim=-1)

    return run


@pytest.fixture(scope="module")
def llm(tiny: Path) -> Any:
    engine = LLM(str(tiny), max_logprobs=-1, **ENGINE)
    yield engine
    engine.shutdown()


def _whole_vocab(llm: Any) -> Any:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=-1, prompt_logprobs=-1)
    return llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0]


def _check_position(position: dict[int, Any], want: torch.Tensor, chosen: int) -> None:
    """A whole-vocabulary position: every token once, values = want [V], the chosen token's rank among them."""
    assert sorted(position) == list(range(VOCAB))
    got = torch.tensor([position[t].logprob for t in range(VOCAB)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert position[chosen].rank == int((want >= want[chosen] - 1e-6).sum())
    others = sorted((e.rank, float(want[t])) for t, e in position.items() if t != chosen)
    assert len({r for r, _ in others}) == VOCAB - 1 and all(1 <= r <= VOCAB for r, _ in others)
    assert all(a[1] >= b[1] - 1e-6 for a, b in itertools.pairwise(others))  # ranked by logprob


def test_whole_vocabulary_matches_hf(llm: Any, hf_logprobs: Any) -> None:
    out = _whole_vocab(llm)
    completion = out.outputs[0]
    ids = completion.token_ids
    want = hf_logprobs(PROMPT + ids)
    assert ids == [int(want[len(PROMPT) - 1 + j].argmax()) for j in range(len(ids))]  # greedy: HF's argmax
    assert completion.logprobs is not None and len(completion.logprobs) == len(ids)
    for j, position in enumerate(completion.logprobs):
        assert len(position) == VOCAB
        _check_position(position, want[len(PROMPT) - 1 + j], ids[j])
        assert position[ids[j]].rank == 1 and position[ids[j]].decoded_token is not None
    assert completion.cumulative_logprob == pytest.approx(
        sum(float(want[len(PROMPT) - 1 + j, t]) for j, t in enumerate(ids)), abs=1e-3
    )
    prompt_lps = out.prompt_logprobs
    assert prompt_lps is not None and len(prompt_lps) == len(PROMPT) and prompt_lps[0] is None
    for i in range(1, len(PROMPT)):
        _check_position(prompt_lps[i], want[i - 1], PROMPT[i])


def test_engine_process_and_async_output_carry_the_whole_vocabulary(llm: Any, tiny: Path) -> None:
    """The same request with the engine in its own process (logprobs cross as msgspec messages) and async
    scheduling (a deferred step's logprobs come from their host copies)."""
    want = _whole_vocab(llm)
    other = LLM(str(tiny), engine_process=True, async_scheduling=True, max_logprobs=-1, **ENGINE)
    try:
        got = _whole_vocab(other)
    finally:
        other.shutdown()
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    for lps, ref in (
        (got.outputs[0].logprobs, want.outputs[0].logprobs),
        (got.prompt_logprobs[1:], want.prompt_logprobs[1:]),
    ):
        assert lps is not None and ref is not None and len(lps) == len(ref)
        for pos, ref_pos in zip(lps, ref, strict=True):
            assert len(pos) == VOCAB and pos.keys() == ref_pos.keys()
            assert [e.rank for e in pos.values()] == [e.rank for e in ref_pos.values()]
            assert [e.logprob for e in pos.values()] == pytest.approx(
                [e.logprob for e in ref_pos.values()], abs=1e-5
            )


def test_max_logprobs_limits_in_vllm_words(tiny: Path, llm: Any) -> None:
    with pytest.raises(
        ValueError, match=r"^Requested sample logprobs of 401, which is greater than max allowed: 400"
    ):
        llm.generate([PROMPT], SamplingParams(max_tokens=1, logprobs=401), use_tqdm=False)
    capped = LLM(str(tiny), max_logprobs=25, **ENGINE)  # above vLLM's default of 20
    try:
        params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=25, prompt_logprobs=25)
        out = capped.generate([PROMPT], params, use_tqdm=False)[0]
        assert out.outputs[0].logprobs is not None
        # the top 25, plus the chosen if not in them
        assert all(len(p) in (25, 26) for p in out.outputs[0].logprobs)
        assert out.prompt_logprobs is not None and all(len(p) in (25, 26) for p in out.prompt_logprobs[1:])
        for params, words in (
            (
                SamplingParams(logprobs=26),
                "Requested sample logprobs of 26, which is greater than max allowed: 25",
            ),
            (
                SamplingParams(logprobs=-1),
                "Requested sample logprobs of 400, which is greater than max allowed: 25",
            ),
            (
                SamplingParams(prompt_logprobs=-1),
                "Requested prompt logprobs of 400, which is greater than max allowed: 25",
            ),
        ):
            with pytest.raises(ValueError, match=f"^{words}"):
                capped.generate([PROMPT], params, use_tqdm=False)
        # the engine core holds the same limit, for a request that did not come through the frontend's check
        with pytest.raises(ValueError, match="Requested sample logprobs of 26"):
            request = EngineCoreRequest("direct", PROMPT, SamplingParams(logprobs=26), 0.0)
            capped.client.engine.add_request(request)  # type: ignore[attr-defined]
    finally:
        capped.shutdown()


def test_detokenize_false_gives_the_same_ids_and_no_text(llm: Any) -> None:
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 7}):  # greedy, seeded
        base: dict[str, Any] = dict(max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=1, **kw)
        text_out, ids_out = llm.generate(
            [{"prompt_token_ids": PROMPT}] * 2,
            [SamplingParams(**base), SamplingParams(detokenize=False, **base)],
            use_tqdm=False,
        )
        with_text, ids_only = text_out.outputs[0], ids_out.outputs[0]
        assert ids_only.token_ids == with_text.token_ids and len(ids_only.token_ids) == 8
        tokenizer = llm.get_tokenizer()
        assert with_text.text == tokenizer.decode(with_text.token_ids, skip_special_tokens=True)
        assert ids_only.text == ""
        assert ids_only.logprobs is not None and with_text.logprobs is not None
        for pos, ref in zip(ids_only.logprobs, with_text.logprobs, strict=True):
            assert pos.keys() == ref.keys() and all(e.decoded_token is None for e in pos.values())
            assert [e.logprob for e in pos.values()] == pytest.approx(
                [e.logprob for e in ref.values()], abs=1e-5
            )
            assert all(e.decoded_token is not None for e in ref.values())
        assert ids_out.prompt_logprobs is not None
        assert all(e.decoded_token is None for p in ids_out.prompt_logprobs[1:] for e in p.values())
    with pytest.raises(ValueError, match=r"^stop strings are only supported when detokenize is True\."):
        llm.generate([PROMPT], SamplingParams(stop=["the"], detokenize=False), use_tqdm=False)
