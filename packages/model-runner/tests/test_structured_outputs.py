"""StructuredOutputsParams (the constraint a request carries) and the runner's grammar masks on CPU.

The masks are checked against the real embedded model's tokenizer (SmolLM2): after each token of a valid JSON
text only tokens the grammar allows stay finite, EOS is the only token once the value is complete, and the
masked greedy choice of random logits always keeps the text a valid prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from treadle_model_runner import SamplingParams
from treadle_model_runner.runner.request_state import RequestState
from treadle_model_runner.runner.structured import StructuredOutputs
from treadle_model_runner.structured_outputs import StructuredOutputsParams as S


def test_exactly_one_constraint_and_named_errors() -> None:
    with pytest.raises(ValueError, match="set exactly one of"):
        S()
    with pytest.raises(ValueError, match="set exactly one of"):
        S(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice: a non-empty list"):
        S(choice=[])
    for kind in ("grammar", "regex", "json"):  # not text: named, before xgrammar's binding sees it
        with pytest.raises(ValueError, match=rf"structured_outputs\.{kind}: a string is required, got int"):
            S(**{kind: 123})
    with pytest.raises(ValueError, match=r"structured_outputs\.json: Unsupported type"):
        S(json={"type": "nonsense"}).build()
    with pytest.raises(ValueError, match=r"structured_outputs\.regex: Regex parsing error"):
        S(regex="(ab").build()
    assert S(json={"type": "object"}).json == '{"type": "object"}' and S(choice=["a", "b"]).kind == "choice"
    assert S(json_object=True).key() != S(json_object=True, disable_any_whitespace=True).key()


@pytest.mark.parametrize(
    ("params", "accepted", "refused"),
    [
        # a choice is written as it is: outside the BMP (JSON would escape it as two surrogates), quotes,
        # backslashes and line breaks
        (S(choice=["😀 yes", "no"]), ["😀 yes", "no"], ["😀", "yes"]),
        (S(choice=['a "q" \\ b', "x\ny\tz"]), ['a "q" \\ b', "x\ny\tz"], ["a", "x"]),
        # json_object is an object (OpenAI's and vLLM's rule), with or without whitespace between tokens
        (S(json_object=True), ['{"a": [1]}', "{}"], ["[1]", "[]", "3", '"s"']),
        (S(json_object=True, disable_any_whitespace=True), ['{"a": [1]}'], ["[1]", "3"]),
    ],
)
def test_what_a_grammar_accepts(params: S, accepted: list[str], refused: list[str]) -> None:
    from xgrammar.testing import _is_grammar_accept_string as accepts

    grammar = params.build()
    assert [accepts(grammar, text) for text in accepted + refused] == [True] * len(accepted) + [False] * len(
        refused
    )


def test_sampling_params_take_a_dict_and_steps_stay_deferrable() -> None:
    params = SamplingParams(structured_outputs={"regex": "[0-9]+"})  # type: ignore[arg-type]
    # the grammar catches up with the previous step's tokens as the step samples (test_runner_structured.py)
    assert isinstance(params.structured_outputs, S) and not params.needs_host_tokens
    assert params.clone().structured_outputs == params.structured_outputs


@pytest.fixture(scope="module")
def smollm2() -> tuple[StructuredOutputs, object]:
    from transformers import AutoTokenizer

    from treadle_model_runner.loader import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return StructuredOutputs(path, 49152, {tokenizer.eos_token_id}), tokenizer


def _state(so: S, outputs: list[int]) -> RequestState:
    return RequestState("r", [1, 2], SamplingParams(structured_outputs=so), ([],), 2, list(outputs))


def test_masks_follow_a_json_value(smollm2: tuple[StructuredOutputs, object]) -> None:
    structured, tokenizer = smollm2
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    text_ids = tokenizer.encode('{"n": 42}', add_special_tokens=False)  # type: ignore[attr-defined]
    state = _state(S(json=schema), [])
    plain = RequestState("p", [1], SamplingParams(), ([],), 1)
    for i, token in enumerate(text_ids):
        logits = torch.zeros(2, 49152)
        structured.mask([state, plain], logits)
        assert torch.isfinite(logits[0, token]), (i, token)  # the next token of a valid text is allowed
        assert torch.isfinite(logits[1]).all()  # an unconstrained row is untouched
        assert int(torch.isfinite(logits[0]).sum()) < 49152
        state.output_token_ids.append(token)
    logits = torch.zeros(1, 49152)
    structured.mask([state], logits)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]  # type: ignore[attr-defined]


def test_masked_random_choices_stay_valid(smollm2: tuple[StructuredOutputs, object]) -> None:
    structured, tokenizer = smollm2
    gen = torch.Generator().manual_seed(0)
    state = _state(
        S(json={"type": "array", "items": {"type": "boolean"}, "maxItems": 3}, disable_any_whitespace=True),
        [],
    )
    for _ in range(40):
        logits = torch.randn(1, 49152, generator=gen)
        structured.mask([state], logits)
        token = int(logits[0].argmax())
        if token == tokenizer.eos_token_id:  # type: ignore[attr-defined]
            break
        state.output_token_ids.append(token)
    value = json.loads(tokenizer.decode(state.output_token_ids))  # type: ignore[attr-defined]
    assert isinstance(value, list) and len(value) <= 3 and all(isinstance(v, bool) for v in value)


def _raw_structured() -> StructuredOutputs:
    """A raw 98-token vocabulary: ids 0-94 the characters ' '..'~', 95 EOS, 96 <think>, 97 </think>."""
    xgr = pytest.importorskip("xgrammar")
    vocab = [*(chr(32 + i) for i in range(95)), "", "<think>", "</think>"]
    structured = StructuredOutputs(Path("/no/tokenizer"), 98, {95})
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=98, stop_token_ids=[95])
    structured._compiler = xgr.GrammarCompiler(info)
    return structured


def _allowed(structured: StructuredOutputs, so: S, outputs: list[int]) -> set[int]:
    logits = torch.zeros(1, 98)
    structured.mask([_state(so, outputs)], logits)
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


A, B, C = 65, 66, 67  # 'a', 'b', 'c'


def test_the_constraint_waits_for_the_reasoning_block() -> None:
    structured = _raw_structured()
    r1 = S(regex="[a-c]{2}", reasoning="deepseek_r1", think_end_id=97)
    assert _allowed(structured, r1, []) == set(range(98))  # the reply starts inside the block: free
    assert _allowed(structured, r1, [40, 41]) == set(range(98))
    assert _allowed(structured, r1, [40, 97]) == {A, B, C}  # the block closed: the grammar from here
    assert _allowed(structured, r1, [40, 97, A]) == {A, B, C}
    assert _allowed(structured, r1, [40, 97, A, B]) == {95}
    qwen = S(regex="[a-c]{2}", reasoning="qwen3", think_start_id=96, think_end_id=97)
    assert _allowed(structured, qwen, []) == {A, B, C, 96}  # the grammar, or open a block
    assert _allowed(structured, qwen, [96, 40]) == set(range(98))
    assert _allowed(structured, qwen, [96, 40, 97]) == {A, B, C}
    assert _allowed(structured, qwen, [B]) == {A, B, C}  # no block: the grammar from the first token
    with pytest.raises(ValueError, match=r"structured_outputs\.reasoning"):
        S(regex="a", reasoning="qwen3", think_end_id=97)


def test_a_matcher_built_before_the_block_opened_resumes_after_it() -> None:
    structured = _raw_structured()
    state = _state(S(regex="[a-c]{2}", reasoning="qwen3", think_start_id=96, think_end_id=97), [])
    for outputs, allowed in (([], {A, B, C, 96}), ([96], set(range(98))), ([96, 97], {A, B, C}),
                             ([96, 97, C], {A, B, C}), ([96, 97, C, A], {95})):  # fmt: skip
        state.output_token_ids = list(outputs)
        logits = torch.zeros(1, 98)
        structured.mask([state], logits)  # one state across the steps, as in the runner
        assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == allowed, outputs


def test_one_step_advances_every_row_whatever_its_stage(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mask calls over rows at different stages, stepped together as the runner does: rows with one new token, a
    row catching up on three, rows past their stop token (ignore_eos), a row whose token left the grammar
    (unconstrained from then on) and an unconstrained request."""
    structured = _raw_structured()
    xgr = pytest.importorskip("xgrammar")
    ended_asked: list[int] = []
    is_terminated = xgr.GrammarMatcher.is_terminated

    def counted(matcher: object) -> bool:
        ended_asked.append(1)
        return is_terminated(matcher)

    monkeypatch.setattr(xgr.GrammarMatcher, "is_terminated", counted)
    so, anything = S(regex="[a-c]{3}"), set(range(98))
    rows = [_state(so, []), _state(so, [A]), _state(so, [A, B, C]), _state(so, [A])]
    plain = RequestState("p", [1], SamplingParams(), ([],), 1)
    structured.mask([*rows, plain], torch.zeros(5, 98))  # builds the matchers; row 2 catches up on 3 tokens
    steps = [  # per step: the token each row receives, then what each row allows next
        ([A, B, 95, 40], [{A, B, C}, {A, B, C}, {95}, anything]),
        ([B, C, 7, A], [{A, B, C}, {95}, {95}, anything]),
        ([C, 95, 9, B], [{95}, {95}, {95}, anything]),
    ]
    for tokens, allowed in steps:
        for state, token in zip(rows, tokens, strict=True):
            state.output_token_ids.append(token)
        logits = torch.zeros(5, 98)
        structured.mask([*rows, plain], logits)
        for j, want in enumerate(allowed):
            assert set(torch.isfinite(logits[j]).nonzero().flatten().tolist()) == want, (tokens, j)
        assert torch.isfinite(logits[4]).all()
    assert [r.grammar_ended for r in rows[:3]] == [False, True, True]
    assert [r.grammar_accepted for r in rows[:3]] == [3, 4, 6]
    assert rows[3].grammar is False and "token 40 is outside its grammar" in caplog.text
    assert len(ended_asked) == 2  # only after the stop tokens rows 1 and 2 accepted
