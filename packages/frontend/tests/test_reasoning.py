"""Reasoning (`--reasoning-parser qwen3|deepseek_r1`): the `<think>` block split off a reply as vLLM's
`reasoning_content`, alone, with tool calls after it, fed whole and in every split, and through the openai SDK
on a server whose fake engine writes a thinking reply (streamed and not); on /v1/messages, thinking blocks."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from frontend_helpers import start_fake_server

from treadle_frontend.server import ServerConfig
from treadle_frontend.server.reply import ReplyParser, parse_whole

CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
CASES = [
    ("qwen3", False, "<think>\nThe user greets.\n</think>\n\nHello!", ("The user greets.\n", "Hello!", [])),
    ("qwen3", False, "  <think>x</think>y", ("x", "y", [])),
    ("qwen3", False, "<think>\n\n</think>\n\nHi", (None, "Hi", [])),  # enable_thinking false: an empty block
    ("qwen3", False, "No block at all. </think> stays", (None, "No block at all. </think> stays", [])),
    ("qwen3", False, "<think>cut off by max_tokens", ("cut off by max_tokens", None, [])),
    ("qwen3", False, "<thin", (None, "<thin", [])),
    ("deepseek_r1", False, "Let me think.\n</think>\n\nAnswer", ("Let me think.\n", "Answer", [])),
    ("deepseek_r1", False, "<think>\nX</think>Y", ("X", "Y", [])),
    ("deepseek_r1", False, "<think><think> x</think>y", ("<think> x", "y", [])),  # one leading tag dropped
    ("deepseek_r1", False, "all reasoning, never closed", ("all reasoning, never closed", None, [])),
    ("qwen3", True, f"<think>plan</think>\n{CALL}", ("plan", None, [("f", {"x": 1})])),
    ("deepseek_r1", True, f"plan</think>\n\nSure.\n{CALL}\n", ("plan", "Sure.", [("f", {"x": 1})])),
    ("qwen3", True, f"{CALL} and text", (None, " and text", [("f", {"x": 1})])),
]


def _summary(reasoning: Any, content: Any, calls: list[Any]) -> tuple[Any, Any, list[Any]]:
    return reasoning, content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("parser", "tools", "text", "expected"), CASES)
def test_whole_reply(parser: str, tools: bool, text: str, expected: Any) -> None:
    assert _summary(*parse_whole(text, parser, tools)) == expected


@pytest.mark.parametrize(("parser", "tools", "text", "expected"), CASES)
def test_any_pieces_give_the_whole_reply(parser: str, tools: bool, text: str, expected: Any) -> None:
    rng = random.Random(len(text))
    splits = [[i] for i in range(len(text) + 1)]
    splits += [sorted(rng.sample(range(len(text)), min(5, len(text)))) for _ in range(40)]
    for cuts in splits:
        bounds = [0, *cuts, len(text)]
        rp = ReplyParser(parser, tools)
        reasoning, content, calls = "", "", []
        pairs = list(itertools.pairwise(bounds))
        for k, (a, b) in enumerate(pairs):
            for piece in rp.feed(text[a:b], final=k == len(pairs) - 1):
                reasoning, content, calls = (
                    reasoning + piece.reasoning,
                    content + piece.content,
                    calls + piece.calls,
                )
        got = (reasoning or None, content or (None if calls or reasoning else content), calls)
        assert _summary(*got) == expected, cuts


def test_config_names_the_parsers() -> None:
    with pytest.raises(ValueError, match="not one of: deepseek_r1, openai_gptoss, qwen3"):
        ServerConfig(reasoning_parser="granite")


THINKING = "<think>\nThe user greets me; answer briefly.\n</think>\n\nHello there!"


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer, server_options={"reasoning_parser": "qwen3"})
    handle.engine.script = tokenizer.encode(THINKING, add_special_tokens=False)
    with srv:
        yield handle


def test_chat_reasoning_content(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", _strict_response_validation=True)
    messages = [{"role": "user", "content": "Hi"}]
    done = client.chat.completions.create(model="tiny", messages=messages)
    message = done.choices[0].message
    assert message.content == "Hello there!" and done.choices[0].finish_reason == "stop"
    assert getattr(message, "reasoning_content", None) == "The user greets me; answer briefly.\n"
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="tiny", messages=messages, stream=True):
        for ch in chunk.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
    assert (reasoning, content) == ("The user greets me; answer briefly.\n", "Hello there!")


def test_messages_thinking_blocks(server: Any) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    kw: dict[str, Any] = {"model": "tiny", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
    expected = [("thinking", "The user greets me; answer briefly.\n"), ("text", "Hello there!")]
    m = client.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **kw)
    assert [(b.type, b.thinking if b.type == "thinking" else b.text) for b in m.content] == expected
    assert m.stop_reason == "end_turn"
    with client.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [(b.type, b.thinking if b.type == "thinking" else b.text) for b in final.content] == expected
    starts = [(e.index, e.content_block.type) for e in events if e.type == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text")]
    # an earlier turn's thinking sent back is dropped, as Anthropic drops it
    turn = [{"type": "thinking", "thinking": "long private musing", "signature": ""},
            {"type": "text", "text": "Hello there!"}]  # fmt: skip
    with_thinking = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": turn},
                     {"role": "user", "content": "Bye"}]  # fmt: skip
    without = [*with_thinking[:1], {"role": "assistant", "content": turn[1:]}, with_thinking[2]]
    count = client.messages.count_tokens
    assert (
        count(model="tiny", messages=with_thinking).input_tokens
        == count(model="tiny", messages=without).input_tokens
    )


def test_structured_outputs_wait_for_the_reasoning_block() -> None:
    """With a reasoning parser, a constraint is told the block's tag ids (the engine holds it off until the block
    ends); a tokenizer without the tags leaves it as it was."""
    from treadle_frontend.server.structured import after_reasoning
    from treadle_model_runner import StructuredOutputsParams

    class Vocab:
        def __init__(self, vocab: dict[str, int]) -> None:
            self.vocab = vocab

        def get_vocab(self) -> dict[str, int]:
            return self.vocab

    so = StructuredOutputsParams(json_object=True)
    tags = Vocab({"<think>": 7, "</think>": 8, "a": 1})
    got = after_reasoning(so, "qwen3", tags)
    assert (got.reasoning, got.think_start_id, got.think_end_id, got.json_object) == ("qwen3", 7, 8, True)
    assert after_reasoning(so, "deepseek_r1", Vocab({"</think>": 8})).think_end_id == 8
    assert after_reasoning(so, "qwen3", Vocab({"</think>": 8})) is so  # no opening tag to allow
    assert after_reasoning(so, None, tags) is so and after_reasoning(so, "qwen3", None) is so
