"""gpt-oss's harmony format on /v1/chat/completions through the openai SDK (strict validation): a model whose
config says gpt_oss gets the harmony parser by itself; the fake engine writes scripted token ids (markers as
special tokens, words and an emoji split over several tokens). Reasoning and answer, a preamble and a tool call,
streamed and not, in one token per step and three; `reasoning_effort` reaching the template (400 for others);
a tool-call turn and its result going back through the template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from frontend_helpers import openai_client, streamed_tool_calls
from harmony_assets import (
    ANALYSIS,
    ANSWER,
    CALL,
    FINAL,
    MARKERS,
    PREAMBLE,
    THOUGHT,
    build_harmony_tokenizer,
    start_harmony_server,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_harmony_tokenizer(tmp_path_factory.mktemp("harmony_tok"))


@pytest.fixture(scope="module")
def server(harmony_tokenizer: Any) -> Iterator[Any]:
    # no --reasoning-parser: the model's type picks harmony; calls need the flags, as in vLLM
    srv, handle = start_harmony_server(
        harmony_tokenizer, enable_auto_tool_choice=True, tool_call_parser="openai"
    )
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai_client(server.url)


def _stream(client: openai.OpenAI, **kw: Any) -> tuple[list[Any], str, str, list[str | None]]:
    """(chunks, reasoning, content, finish reasons) of a streamed chat; no delta holds marker text or U+FFFD."""
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **kw))
    deltas = [ch.delta for chunk in chunks for ch in chunk.choices]
    texts = [getattr(d, "reasoning_content", None) or "" for d in deltas] + [d.content or "" for d in deltas]
    assert not any("<|" in t or "\ufffd" in t for t in texts)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
    return chunks, reasoning, "".join(d.content or "" for d in deltas), finish


def test_the_markers_are_special_tokens(harmony_tokenizer: Any) -> None:
    """The premise: decoded the default way, a reply loses its markers; the text is split over many tokens."""
    ids = harmony_tokenizer.encode(ANALYSIS + FINAL, add_special_tokens=False)
    assert set(harmony_tokenizer.convert_tokens_to_ids(MARKERS)) & set(ids)
    assert "<|" not in harmony_tokenizer.decode(ids, skip_special_tokens=True)
    assert len(harmony_tokenizer.encode("😀", add_special_tokens=False)) > 1


@pytest.mark.parametrize("tokens_per_step", [1, 3])
def test_reasoning_and_answer(client: openai.OpenAI, server: Any, tokens_per_step: int) -> None:
    server.script(ANALYSIS + FINAL)
    server.engine.tokens_per_step = tokens_per_step
    try:
        done = client.chat.completions.create(model="tiny", messages=ASK)
        chunks, reasoning, content, finish = _stream(client, messages=ASK)
    finally:
        server.engine.tokens_per_step, server.engine.script = 1, None
    message = done.choices[0].message
    assert (message.content, getattr(message, "reasoning_content", None)) == (ANSWER, THOUGHT)
    assert done.choices[0].finish_reason == "stop" and not message.tool_calls
    assert (reasoning, content, finish) == (THOUGHT, ANSWER, ["stop"])
    pieces = [
        ch.delta for chunk in chunks for ch in chunk.choices if getattr(ch.delta, "reasoning_content", None)
    ]
    assert len(pieces) > 3  # the reasoning streams as it is written


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call(client: openai.OpenAI, server: Any, harmony_tokenizer: Any, stream: bool) -> None:
    """A call on the commentary channel (after reasoning and a preamble, which is content) is a tool call; the
    reply ends at `<|call|>`, a stop token (gpt-oss's generation_config makes it an EOS)."""
    server.script(ANALYSIS + PREAMBLE + CALL)
    call_id = harmony_tokenizer.convert_tokens_to_ids("<|call|>")
    kw: dict[str, Any] = dict(messages=ASK, tools=[WEATHER], extra_body={"stop_token_ids": [call_id]})
    try:
        if stream:
            chunks, reasoning, content, finish = _stream(client, **kw)
            calls, num_arg_pieces = streamed_tool_calls(chunks)
            got = [(name, json.loads(args)) for name, args in calls.values()]
            assert num_arg_pieces > 2  # the arguments stream as they are written
        else:
            choice = client.chat.completions.create(model="tiny", **kw).choices[0]
            reasoning, content = getattr(choice.message, "reasoning_content", None), choice.message.content
            got = [
                (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []
            ]
            assert all(c.id and c.type == "function" for c in choice.message.tool_calls or [])
            finish = [choice.finish_reason]
    finally:
        server.engine.script = None
    assert (reasoning, content, got, finish) == (
        THOUGHT, "Checking the weather.", [("get_weather", {"city": "Paris"})], ["tool_calls"]
    )  # fmt: skip


def test_tool_choice_none_reads_no_call(client: openai.OpenAI, server: Any) -> None:
    """Calls not read: the call's message is dropped, never content (nor its markers)."""
    server.script(ANALYSIS + CALL)
    try:
        reply = client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none"
        )
        choice = reply.choices[0]
    finally:
        server.engine.script = None
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (None, [], "stop")
    assert getattr(choice.message, "reasoning_content", None) == THOUGHT


def test_reasoning_effort_reaches_the_template(client: openai.OpenAI, server: Any) -> None:
    server.script(FINAL)
    try:
        for effort in ("low", "medium", "high"):
            reply = client.chat.completions.create(model="tiny", messages=ASK, reasoning_effort=effort)
            assert reply.choices[0].message.content == ANSWER
            assert f"<|start|>system<|message|>Reasoning: {effort}<|end|>" in server.last_prompt()
        client.chat.completions.create(model="tiny", messages=ASK)
        assert "Reasoning: medium<|end|>" in server.last_prompt()  # the template's default
        sent, bad = len(server.prompts), "extreme"
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=ASK, reasoning_effort=bad)  # type: ignore[arg-type]
    finally:
        server.engine.script = None
    assert err.value.status_code == 400 and len(server.prompts) == sent
    body: Any = err.value.body
    assert (
        body["param"] == "reasoning_effort" and "'extreme' is not one of low, medium, high" in body["message"]
    )


def test_a_tool_call_turn_goes_back_through_the_template(client: openai.OpenAI, server: Any) -> None:
    """The assistant's call (arguments sent as a JSON string, its reasoning as reasoning_content) and the tool's
    result render as the template expects: arguments as an object, the reasoning as the turn's thinking."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": THOUGHT},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    server.script(FINAL)
    try:
        reply = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER])
    finally:
        server.engine.script = None
    assert reply.choices[0].message.content == ANSWER and reply.choices[0].finish_reason == "stop"
    expected = (
        f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"{\\"temp\\": 21}"<|end|>'
        "<|start|>assistant"
    )
    assert server.last_prompt().endswith(expected)
