"""Structured outputs inside the runner: a tiny random Llama whose 96 token ids are given a raw vocabulary (one
printable character each, id 95 the EOS), so a regex or JSON constraint can be checked on the tokens alone. With
the grammar masks, greedy and seeded sampled replies always match, a preempted request resumes its grammar from
its outputs, and unconstrained requests in the same batch are untouched. On CPU, and on a GPU in bf16 with CUDA
graphs (marked gpu)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_runner_fakes import FakeScheduler, make_runner, save_llama

from treadle_model_runner import SamplingParams, StructuredOutputsParams

VOCAB = 96
EOS = 95
CHARS = [chr(32 + i) for i in range(EOS)]  # ' ' .. '~': token i is the character chr(32 + i)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_structured"), 5, vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=EOS)  # fmt: skip


def _runner(path: Path, device: str) -> object:
    xgr = pytest.importorskip("xgrammar")
    kwargs = (
        {"device": device, "dtype": "bfloat16", "attention_backend": "triton"} if device == "cuda" else {}
    )
    runner = make_runner(path, 8, 64, block_size=4, num_blocks=256, **kwargs)  # type: ignore[arg-type]
    info = xgr.TokenizerInfo(
        [*CHARS, ""], vocab_type=xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[EOS]
    )
    runner.structured._compiler = xgr.GrammarCompiler(info)  # the raw vocabulary instead of an HF tokenizer
    return runner


def _text(tokens: list[int]) -> str:
    end = tokens.index(EOS) if EOS in tokens else len(tokens)
    assert all(t == EOS for t in tokens[end:]), "only EOS may follow a complete reply"
    return "".join(CHARS[t] for t in tokens[:end])


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]  # fmt: skip


def _run_constrained(llama: Path, device: str, async_output: bool) -> tuple[dict[str, list[int]], int]:
    """Constrained and plain requests with a preemption mid-reply: each request's tokens, and how many steps the
    runner returned before their tokens reached the host (async output: the grammar catches up as it samples)."""
    runner = _runner(llama, device)
    runner.async_output = async_output  # type: ignore[attr-defined]
    sched = FakeScheduler(runner, seed=1)  # type: ignore[arg-type]
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
    constraints = {
        "regex": StructuredOutputsParams(regex="[a-c]{3}-[0-9]{2}"),
        "json": StructuredOutputsParams(json=schema, disable_any_whitespace=True),
        "choice": StructuredOutputsParams(choice=["north", "south"]),
    }
    for name, so in constraints.items():
        sched.add(f"{name}-greedy", [3, 4, 5, 6], SamplingParams(temperature=0.0, structured_outputs=so), 40)
        sched.add(
            f"{name}-sampled", [7, 8], SamplingParams(temperature=1.0, seed=11, structured_outputs=so), 40
        )
    sched.add("plain", [3, 4, 5, 6], SamplingParams(temperature=0.0), 12)
    for _ in range(
        6
    ):  # a few steps, then preempt one constrained request mid-reply: it resumes from its outputs
        sched.run_step(budget=64)
    sched.preempt("json-sampled")
    return sched.run(budget=64), sched.deferred_steps


@pytest.mark.parametrize("device", DEVICES)
def test_replies_follow_their_grammar(llama: Path, device: str) -> None:
    out, deferred = _run_constrained(llama, device, async_output=True)
    assert deferred > 10, "steps with constrained rows should not wait for their tokens before returning"
    for kind in ("greedy", "sampled"):
        assert re.fullmatch("[a-c]{3}-[0-9]{2}", _text(out[f"regex-{kind}"]))
        value = json.loads(_text(out[f"json-{kind}"]))
        assert set(value) == {"a", "b"} and isinstance(value["a"], int) and value["b"] in ("x", "y")
        assert _text(out[f"choice-{kind}"]) in ("north", "south")
    free = make_runner(llama, 8, 64, block_size=4, num_blocks=256, **(
        {"device": "cuda", "dtype": "bfloat16", "attention_backend": "triton"} if device == "cuda" else {}))  # fmt: skip
    alone = FakeScheduler(free, seed=1)
    alone.add("plain", [3, 4, 5, 6], SamplingParams(temperature=0.0), 12)
    assert alone.run(budget=64)["plain"] == out["plain"]  # the masks never touch other rows
    # the same tokens when every step waits for its tokens (the grammar never saw a placeholder)
    assert _run_constrained(llama, device, async_output=False) == (out, 0)
