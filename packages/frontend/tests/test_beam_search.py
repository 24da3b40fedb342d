"""LLM.beam_search against a beam search written here straight over HF transformers' fp32 logits of the same
weights (a full forward of the whole sequence each step, no cache): the same sequences, in the same order, with
cum_logprobs within 1e-4. The reference follows vLLM's rules: 2 * beam_width candidates per beam each step, a
candidate ending in EOS is finished (its EOS kept in the tokens) unless ignore_eos, the beam_width best others by
score go on, and finished and live beams are ranked together at the end by cum_logprob / len ** length_penalty
(len counting the prompt, not a final EOS). The tiny random Llama's EOS row is swapped with a token its greedy
path picks (beam_model.py), so EOS is the likely next token a few steps in and the finished-beam path runs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from beam_model import EOS, PROMPTS, build_model_dir

_FORWARDS: dict[tuple[int, ...], torch.Tensor] = {}  # the searches below revisit sequences: run each once


def _next_logprobs(model: Any, tokens: tuple[int, ...]) -> torch.Tensor:
    """log_softmax of the fp32 logits after `tokens`, from a forward over the whole sequence."""
    if tokens not in _FORWARDS:
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1].float()
        _FORWARDS[tokens] = torch.log_softmax(logits, dim=-1)
    return _FORWARDS[tokens]


def reference(
    model: Any, prompt: list[int], width: int, max_tokens: int, ignore_eos: bool, length_penalty: float
) -> list[tuple[list[int], float]]:
    """vLLM's beam search over full-sequence HF forwards: [(tokens incl. the prompt, cum_logprob)], best first."""

    def score(seq: tuple[list[int], float]) -> float:
        tokens, cum = seq
        return cum / (len(tokens) - (tokens[-1] == EOS)) ** length_penalty

    beams: list[tuple[list[int], float]] = [(list(prompt), 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in beams:
            top = _next_logprobs(model, tuple(tokens)).topk(2 * width)
            for lp, tok in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                seq = ([*tokens, tok], cum + lp)
                (finished if tok == EOS and not ignore_eos else candidates).append(seq)
        beams = sorted(candidates, key=score, reverse=True)[:width]
        if not beams:
            break
    return sorted(finished + beams, key=score, reverse=True)[:width]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from treadle_frontend import LLM

    path = tmp_path_factory.mktemp("beam_llama")
    model = build_model_dir(path)
    llm = LLM(str(path), kv_cache_space=0.05, dtype="float32")
    yield model, llm
    llm.shutdown()


def _check(
    got: Any, want: list[tuple[list[int], float]], llm: Any, prompt: list[int], ignore_eos: bool
) -> None:
    assert [s.tokens for s in got.sequences] == [tokens for tokens, _ in want]
    for seq, (tokens, cum) in zip(got.sequences, want, strict=True):
        assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
        ended = tokens[-1] == EOS and not ignore_eos
        assert (seq.finish_reason, seq.stop_reason) == (("stop", EOS) if ended else ("length", None))
        assert seq.text == llm.get_tokenizer().decode(tokens)  # vLLM's LLM: prompt and EOS decoded too
        generated = tokens[len(prompt) :]
        assert len(seq.logprobs) == len(generated)  # per step, that step's candidates (the token among them)
        assert sum(step[tok].logprob for step, tok in zip(seq.logprobs, generated, strict=True)) == (
            pytest.approx(seq.cum_logprob)
        )


@pytest.mark.parametrize(
    ("width", "ignore_eos", "length_penalty"),
    [
        (1, False, 1.0),
        (3, False, 1.0),
        (4, False, 1.0),
        (3, False, 0.3),
        (4, False, 2.5),
        (1, True, 0.0),
        (3, True, 1.0),
    ],
)
def test_matches_reference(
    tiny: tuple[Any, Any], width: int, ignore_eos: bool, length_penalty: float
) -> None:
    from treadle_frontend import BeamSearchParams

    model, llm = tiny
    params = BeamSearchParams(width, max_tokens=7, ignore_eos=ignore_eos, length_penalty=length_penalty)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert len(outs) == len(PROMPTS)
    for out, prompt in zip(outs, PROMPTS, strict=True):
        assert len(out.sequences) == width
        _check(out, reference(model, prompt, width, 7, ignore_eos, length_penalty), llm, prompt, ignore_eos)
    sequences = [(s, len(p)) for out, p in zip(outs, PROMPTS, strict=True) for s in out.sequences]
    if ignore_eos:  # EOS is an ordinary token: every beam runs its max_tokens, some through EOS
        assert all(len(s.tokens) == n + 7 and s.finish_reason == "length" for s, n in sequences)
        assert width > 1 or EOS in outs[0].sequences[0].tokens[len(PROMPTS[0]) :]  # greedy goes through EOS
    elif length_penalty <= 1.0:  # the finished-beam path ran (a long-favouring penalty may rank them last)
        assert any(s.finish_reason == "stop" and len(s.tokens) < n + 7 for s, n in sequences)


def test_width_one_is_greedy(tiny: tuple[Any, Any]) -> None:
    from treadle_frontend import BeamSearchParams, SamplingParams

    _, llm = tiny
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=7), use_tqdm=False)
    beams = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], BeamSearchParams(1, max_tokens=7))
    for g, b, prompt in zip(greedy, beams, PROMPTS, strict=True):
        assert b.sequences[0].tokens == prompt + list(g.outputs[0].token_ids)
    assert beams[0].sequences[0].tokens[-1] == EOS  # the first prompt's greedy path ends with EOS


def test_concurrency_limit_and_prompt_forms(tiny: tuple[Any, Any]) -> None:
    """Prompts as text and token dicts; any concurrency_limit gives the same result as none; the engine sees
    every live beam of the running prompts in one batch a step."""
    from treadle_frontend import BeamSearchParams

    _, llm = tiny
    params = BeamSearchParams(3, max_tokens=5)
    prompts: list[Any] = ["Hello world", {"prompt": "The capital"}, {"prompt_token_ids": PROMPTS[1]}]
    batches: list[int] = []
    run = llm._run
    llm._run = lambda encoded, *a, **k: batches.append(len(encoded)) or run(encoded, *a, **k)
    try:
        free = llm.beam_search(prompts, params)
        one = batches[:]
        batches.clear()
        limited = llm.beam_search(prompts, params, concurrency_limit=1)
    finally:
        del llm._run
    assert [[s.tokens for s in o.sequences] for o in limited] == [
        [s.tokens for s in o.sequences] for o in free
    ]
    assert one[0] == 3 and max(one) > 3 and max(batches) <= 3  # all prompts at once; one prompt's beams
    tok = llm.get_tokenizer()
    assert free[0].sequences[0].tokens[: len(tok.encode("Hello world"))] == tok.encode("Hello world")
    assert free[0].sequences[0].text.startswith("Hello world")


def test_steps_hit_the_prefix_cache(tiny: tuple[Any, Any]) -> None:
    """The design's premise: a beam's next request finds its earlier full blocks in the prefix cache, so a step
    computes at most a block's worth of tokens per beam, not the whole sequence."""
    from treadle_frontend import BeamSearchParams

    _, llm = tiny
    before = llm.client.get_stats()
    prompt = list(range(10, 50))  # 40 tokens: two full 16-token blocks
    llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(2, max_tokens=5, ignore_eos=True))
    after = llm.client.get_stats()
    # steps 2 to 5 send two beams each, and each finds (at least) the prompt's two full blocks
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 4 * 2 * 32


def test_context_end_and_errors(tiny: tuple[Any, Any]) -> None:
    from treadle_frontend import BeamSearchParams

    _, llm = tiny
    out = llm.beam_search(
        [{"prompt_token_ids": [9] * 62}], BeamSearchParams(2, max_tokens=10, ignore_eos=True)
    )
    assert {len(s.tokens) for s in out[0].sequences} == {64}  # cut where the 64-token context ends
    with pytest.raises(ValueError, match=r"^prompt 1: The prompt is 64 tokens long"):
        llm.beam_search([[5, 6], {"prompt_token_ids": [9] * 64}], BeamSearchParams(2, max_tokens=3))
    with pytest.raises(ValueError, match=r"concurrency_limit must be >= 1"):
        llm.beam_search(["hi"], BeamSearchParams(2, max_tokens=3), concurrency_limit=0)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search(["hi"], object())  # type: ignore[arg-type]
    # 2 * beam_width candidates a step: the engine's max_logprobs (20 by default; -1 = the vocabulary) bounds it
    with pytest.raises(ValueError, match=r"beam_width 11 is too wide.* at most 20 logprobs"):
        llm.beam_search(["hi"], BeamSearchParams(11, max_tokens=3))
    BeamSearchParams(11, max_tokens=3).check_width(-1, 400)
    BeamSearchParams(11, max_tokens=3).check_width(22, 400)
    with pytest.raises(ValueError, match="at most 200 logprobs"):
        BeamSearchParams(101, max_tokens=3).check_width(-1, 200)


def test_pruning_rules() -> None:
    """vLLM's LLM prunes a step by score, its server by cum_logprob: with ignore_eos an EOS-ending candidate's score
    counts one token less, so the two keep different beams (EOS: -1.0 / 3 = -0.33; token 7: -1.05 / 4 = -0.26)."""
    from treadle_frontend.beam_search import BeamSearch, BeamSearchParams
    from treadle_frontend.outputs import Logprob

    params = BeamSearchParams(1, max_tokens=2, ignore_eos=True)
    step = {EOS: Logprob(-1.0, 1), 7: Logprob(-1.05, 2)}
    kept = []
    for by_score in (True, False):
        search = BeamSearch([4, 5, 6], params, EOS, 2, prune_by_score=by_score)
        search.advance([step])
        kept.append(search.beams[0].tokens[-1])
    assert kept == [7, EOS]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"beam_width": 0, "max_tokens": 4}, r"beam_width must be in \[1, inf\], got 0"),
        ({"beam_width": 2.0, "max_tokens": 4}, r"beam_width must be an integer, got 2.0"),
        ({"beam_width": 2, "max_tokens": 0}, r"max_tokens must be in \[1, inf\], got 0"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -1}, r"temperature must be in \[0, inf\], got -1"),
        (
            {"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")},
            "length_penalty must be a finite",
        ),
        ({"beam_width": 2, "max_tokens": 4, "ignore_eos": 1}, "ignore_eos must be true or false, got 1"),
    ],
)
def test_params_validated(fields: dict[str, Any], message: str) -> None:
    from treadle_frontend import BeamSearchParams

    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**fields)


def test_exports() -> None:
    import treadle_frontend
    from treadle_frontend.beam_search import BeamSearchParams

    # the meta-package's re-export: tests/test_exports.py (this package's venv does not hold `treadle`)
    assert treadle_frontend.BeamSearchParams is BeamSearchParams
    assert "BeamSearchParams" in treadle_frontend.__all__
