"""Structured outputs under speculative decoding. The grammar masks of a request verifying drafts: its row j is what
`mask` gives without drafts once d1..dj are outputs, up to the first draft the grammar refuses (later rows are
left free: verification stops there), and the request's matcher and outputs are as before afterwards; with
reasoning blocks that open or close inside the drafts, harmony headers (held off for, or forced), and past the
grammar's end. Then the runner end to end: a tiny Llama over a raw one-character vocabulary replies to regex, JSON
and choice constraints with drafts (right, wrong, and refused by the grammar) exactly as it does without them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from spec_decode_driver import reference, speculate
from test_runner_fakes import FakeScheduler, make_runner, save_llama

from treadle_model_runner import SamplingParams
from treadle_model_runner.runner.request_state import RequestState
from treadle_model_runner.runner.structured import StructuredOutputs
from treadle_model_runner.structured_outputs import StructuredOutputsParams as S

EOS, THINK, END_THINK = 95, 96, 97
A, B, C, X = 65, 66, 67, 88  # 'a', 'b', 'c', 'x'


def _raw_structured(vocab_size: int = 98) -> StructuredOutputs:
    """A raw vocabulary: ids 0-94 the characters ' '..'~', 95 EOS (then 96 <think>, 97 </think>)."""
    xgr = pytest.importorskip("xgrammar")
    vocab = [*(chr(32 + i) for i in range(95)), "", "<think>", "</think>"][:vocab_size]
    structured = StructuredOutputs(Path("/no/tokenizer"), vocab_size, {EOS})
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[EOS])
    structured._compiler = xgr.GrammarCompiler(info)
    return structured


def _state(so: S, outputs: list[int]) -> RequestState:
    return RequestState("r", [1, 2], SamplingParams(structured_outputs=so), ([],), 2, list(outputs))


def _allowed_rows(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


CASES = [
    (S(regex="[a-c]{3}-[0-9]{2}"), [A], [B, C, 13, 17]),  # 'b' 'c' '-' '1' all allowed
    (S(regex="[a-c]{3}-[0-9]{2}"), [], [A, X, B]),  # 'x' refused: rows after it are free
    (S(regex="[a-c]{2}"), [A], [B, EOS, EOS, EOS]),  # past the grammar's end only EOS
    (S(regex="[a-c]{2}", reasoning="deepseek_r1", think_end_id=END_THINK), [40], [41, END_THINK, A, X, B]),
    (S(regex="[a-c]{2}", reasoning="qwen3", think_start_id=THINK, think_end_id=END_THINK), [],
     [THINK, 40, END_THINK, C, A, EOS]),
    (S(regex="[a-c]{2}", reasoning="qwen3", think_start_id=THINK, think_end_id=END_THINK), [], [B, THINK, A]),
    # harmony: the hold-off ends inside the drafts at a run of ids (96, 41, 97 stand for a final header), and a
    # forced header (one token a row) refuses the draft that leaves it
    (S(regex="[a-c]{2}", reasoning="harmony", reasoning_end_ids=(THINK, 41, END_THINK)), [40, THINK],
     [41, 40, THINK, 41, END_THINK, A, X, B]),
    (S(regex="[a-c]{2}", reasoning="harmony", reasoning_end_ids=(THINK, 41, END_THINK), is_header_forced=True),
     [THINK], [41, END_THINK, B, C, EOS]),
    (S(regex="[a-c]{2}", reasoning="harmony", reasoning_end_ids=(THINK, 41, END_THINK), is_header_forced=True),
     [], [THINK, 50, A]),
    (S(regex="[a-c]{2}", reasoning="harmony", reasoning_end_ids=(THINK, 41, END_THINK), is_header_forced=True,
       analysis_open_ids=(40,), analysis_close_ids=(43, 44)), [40, 50], [EOS, 43, 44, THINK, 41, END_THINK, A]),
]  # fmt: skip


@pytest.mark.parametrize(("so", "outputs", "drafts"), CASES)
def test_draft_rows_are_masked_as_if_the_drafts_were_outputs(
    so: S, outputs: list[int], drafts: list[int]
) -> None:
    structured = _raw_structured()
    state = _state(so, outputs)
    plain = RequestState("p", [1], SamplingParams(), ([],), 1)
    logits = torch.zeros(1 + len(drafts) + 1, 98)
    structured.mask([state, plain], logits, [drafts, []])
    got = _allowed_rows(logits)
    assert got[-1] == set(range(98))  # the unconstrained request's row is untouched
    assert state.output_token_ids == outputs  # the drafts did not stick
    refused = False
    for j in range(len(drafts) + 1):
        if refused:
            assert got[j] == set(range(98)), j  # verification stopped before this row: left free
            continue
        alone = torch.zeros(1, 98)
        _raw_structured().mask([_state(so, outputs + drafts[:j])], alone)
        assert got[j] == _allowed_rows(alone)[0], j
        refused = j < len(drafts) and drafts[j] not in got[j]
    # the request's own matcher is where the outputs left it: the next step masks as a fresh one would
    state.output_token_ids.append(drafts[0])
    after, fresh = torch.zeros(1, 98), torch.zeros(1, 98)
    structured.mask([state], after)
    _raw_structured().mask([_state(so, outputs + drafts[:1])], fresh)
    assert _allowed_rows(after) == _allowed_rows(fresh)


VOCAB = 96  # the model's vocabulary: the characters and EOS


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_spec_structured"), 5, vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=EOS)  # fmt: skip


def _runner(path: Path) -> Any:
    runner = make_runner(path, 8, 64, block_size=4, num_blocks=256)
    runner.structured = _raw_structured(VOCAB)
    return runner


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
          "b": {"enum": ["x", "y"]}}, "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
CONSTRAINTS = {
    "regex": S(regex="[a-c]{3}-[0-9]{2}"),
    "json": S(json=SCHEMA, disable_any_whitespace=True),
    "choice": S(choice=["north", "south"]),
}


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_constrained_replies_with_drafts_equal_the_plain_run(llama: Path, name: str, kind: str) -> None:
    so = CONSTRAINTS[name]
    temperature, seed = (0.0, None) if kind == "greedy" else (1.0, 11)
    params = SamplingParams(temperature=temperature, seed=seed, structured_outputs=so)
    sched = FakeScheduler(_runner(llama))
    ref = reference(sched, "ref", [3, 4, 5, 6], params, 24)
    assert EOS in ref.tokens  # the reply completes, then only EOS may follow: drafts run past the end too
    run = speculate(sched, "spec", ref, params, VOCAB)
    assert run.num_kept >= 8 and run.num_refused >= 3
