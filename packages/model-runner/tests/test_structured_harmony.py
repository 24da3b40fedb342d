"""gpt-oss's harmony replies under structured outputs (reasoning "harmony"): the grammar is held off until the
reply writes the header that opens its final message, a run of several tokens (`<|channel|>`, `final` split in
two, `<|message|>`), then constrains, and only a stop token follows the complete value; a forced header
(is_header_forced, a forced tool call's) is written token by token from the reply's first, or after an analysis
message, then the grammar.
Masks on a raw vocabulary whose markers are special tokens, and whole replies from the runner's tiny Llama."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from test_runner_fakes import FakeScheduler
from test_runner_structured import _runner, _text, llama  # noqa: F401 (the module's model fixture)

from treadle_model_runner import SamplingParams
from treadle_model_runner.runner.request_state import RequestState
from treadle_model_runner.runner.structured import StructuredOutputs
from treadle_model_runner.structured_outputs import StructuredOutputsParams as S

RETURN, CHANNEL, MESSAGE, END, START, FIN, AL, ANALYSIS = range(95, 103)
# ids 0-94 the characters ' '..'~', then <|return|> (EOS), the markers, "fin", "al", "analysis"
VOCAB = 103
A, B, C = 65, 66, 67  # 'a', 'b', 'c'
FINAL_HEADER = (CHANNEL, FIN, AL, MESSAGE)  # `<|channel|>final<|message|>`, `final` in two tokens
ANYTHING = set(range(VOCAB))


def _structured() -> StructuredOutputs:
    xgr = pytest.importorskip("xgrammar")
    # the markers are special (empty in a raw vocabulary): no grammar ever allows them
    vocab = [*(chr(32 + i) for i in range(95)), "", "", "", "", "", "fin", "al", "analysis"]
    structured = StructuredOutputs(Path("/no/tokenizer"), VOCAB, {RETURN})
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[RETURN])
    structured._compiler = xgr.GrammarCompiler(info)
    return structured


def _allowed(structured: StructuredOutputs, state: RequestState) -> set[int]:
    logits = torch.zeros(1, VOCAB)
    structured.mask([state], logits)
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def _state(so: S, outputs: list[int]) -> RequestState:
    return RequestState("r", [1, 2], SamplingParams(structured_outputs=so), ([],), 2, list(outputs))


def test_the_grammar_waits_for_the_final_header() -> None:
    structured = _structured()
    so = S(regex="[a-c]{2}", reasoning="harmony", reasoning_end_ids=FINAL_HEADER)
    analysis = [CHANNEL, ANALYSIS, MESSAGE, 40, 41, END, START, 70]
    state = _state(so, [])
    # one state across the steps, as in the runner: free through the analysis message and a partial header
    steps = [
        ([], ANYTHING),
        (analysis, ANYTHING),
        ([*analysis, CHANNEL, FIN, MESSAGE], ANYTHING),  # `fin` alone is not `final`
        ([*analysis, CHANNEL, FIN, MESSAGE, START, CHANNEL, FIN, AL], ANYTHING),
        ([*analysis, CHANNEL, FIN, MESSAGE, START, *FINAL_HEADER], {A, B, C}),
        ([*analysis, CHANNEL, FIN, MESSAGE, START, *FINAL_HEADER, B], {A, B, C}),
        ([*analysis, CHANNEL, FIN, MESSAGE, START, *FINAL_HEADER, B, C], {RETURN}),
    ]
    for outputs, allowed in steps:
        state.output_token_ids = list(outputs)
        assert _allowed(structured, state) == allowed, outputs
    assert state.grammar is not False and not state.grammar_ended
    # a reply that opens with the final message (no analysis): the grammar right after its header
    assert _allowed(structured, _state(so, list(FINAL_HEADER))) == {A, B, C}


def test_a_forced_header_then_the_grammar() -> None:
    structured = _structured()
    header = (CHANNEL, 35, 36, MESSAGE)
    so = S(regex="[a-c]{2}", reasoning="harmony", reasoning_end_ids=header, is_header_forced=True)
    state = _state(so, [])
    for outputs, allowed in (([], {CHANNEL}), ([CHANNEL], {35}), ([CHANNEL, 35, 36], {MESSAGE}),
                             ([*header], {A, B, C}), ([*header, A, A], {RETURN})):  # fmt: skip
        state.output_token_ids = list(outputs)
        assert _allowed(structured, state) == allowed, outputs


def test_a_forced_header_after_an_analysis_message() -> None:
    """The analysis comes first, free but for the stop token (the reply must reach the call); the header's ids
    written inside it start nothing; its end forces `<|start|>assistant` (70 stands for `assistant`) and the
    header, then the grammar."""
    structured = _structured()
    header, opening = (CHANNEL, 35, 36, MESSAGE), (CHANNEL, ANALYSIS, MESSAGE)
    so = S(regex="[a-c]{2}", reasoning="harmony", reasoning_end_ids=header, is_header_forced=True,
           analysis_open_ids=opening, analysis_close_ids=(END, START, 70))  # fmt: skip
    body = [*opening, 40, *header, 41]
    state = _state(so, [])
    steps = [
        ([], {CHANNEL}),
        ([CHANNEL], {35, ANALYSIS}),  # the header's or the analysis' second token
        ([CHANNEL, ANALYSIS], {MESSAGE}),
        (list(opening), ANYTHING - {RETURN}),
        (body, ANYTHING - {RETURN}),
        ([*body, END], {START}),
        ([*body, END, START], {70}),
        ([*body, END, START, 70, CHANNEL, 35], {36}),
        ([*body, END, START, 70, *header], {A, B, C}),
        ([*body, END, START, 70, *header, C, A], {RETURN}),
    ]
    for outputs, allowed in steps:
        state.output_token_ids = list(outputs)
        assert _allowed(structured, state) == allowed, outputs
    # or no analysis: the header from the first token, as without analysis ids
    assert _allowed(structured, _state(so, [CHANNEL, 35])) == {36}
    assert _allowed(structured, _state(so, list(header))) == {A, B, C}


def test_the_harmony_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="reasoning_end_ids must be a non-empty"):
        S(regex="a", reasoning="harmony")
    with pytest.raises(ValueError, match="reasoning_end_ids must be a non-empty"):
        S(regex="a", reasoning="harmony", reasoning_end_ids=())
    with pytest.raises(ValueError, match="not think_start_id / think_end_id"):
        S(regex="a", reasoning="harmony", reasoning_end_ids=(1,), think_end_id=2)
    with pytest.raises(ValueError, match="are for reasoning harmony, not 'qwen3'"):
        S(regex="a", reasoning="qwen3", think_start_id=1, think_end_id=2, reasoning_end_ids=(3,))
    with pytest.raises(ValueError, match="are for reasoning harmony, not None"):
        S(regex="a", is_header_forced=True)
    harmony: dict[str, Any] = {"regex": "a", "reasoning": "harmony", "reasoning_end_ids": (1,)}
    with pytest.raises(ValueError, match="analysis_open_ids and analysis_close_ids go together"):
        S(**harmony, analysis_open_ids=(2,), analysis_close_ids=(3,))
    with pytest.raises(ValueError, match="analysis_open_ids and analysis_close_ids go together"):
        S(**harmony, is_header_forced=True, analysis_open_ids=(2,))
    # a JSON round trip gives a list: kept as the tuple the runner compares with
    ids: Any = [1, 2]
    assert S(regex="a", reasoning="harmony", reasoning_end_ids=ids).reasoning_end_ids == (1, 2)


def test_runner_replies_write_the_forced_header_then_follow_the_grammar(llama: Path) -> None:  # noqa: F811
    """The tiny Llama's raw 96-character vocabulary: the header `@fn:`, then a regex, then EOS, greedy and
    sampled, with a preemption mid-reply (the header and the grammar resume from the outputs)."""
    runner = _runner(llama, "cpu")
    sched = FakeScheduler(runner, seed=3)  # type: ignore[arg-type]
    header = tuple(ord(c) - 32 for c in "@fn:")
    so = S(regex="[a-c]{3}-[0-9]{2}", reasoning="harmony", reasoning_end_ids=header, is_header_forced=True)
    sched.add("greedy", [3, 4, 5], SamplingParams(temperature=0.0, structured_outputs=so), 30)
    sched.add("sampled", [7, 8], SamplingParams(temperature=1.0, seed=5, structured_outputs=so), 30)
    for _ in range(3):
        sched.run_step(budget=64)
    sched.preempt("sampled")
    out = sched.run(budget=64)
    for name in ("greedy", "sampled"):
        assert re.fullmatch("@fn:[a-c]{3}-[0-9]{2}", _text(out[name])), _text(out[name])
