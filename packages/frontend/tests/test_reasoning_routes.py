"""A thinking reply (`--reasoning-parser qwen3`) on the routes beyond plain chat, through the real SDKs with strict
validation: /v1/responses returns the block as a `reasoning` item before the message (streamed as
reasoning_text events) and counts its tokens; a forced tool call after a reasoning block keeps the reasoning
and becomes the call on chat completions, /v1/messages and /v1/responses, streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from frontend_helpers import openai_client, start_fake_server, streamed_tool_calls

THOUGHT = "The user greets me; answer briefly.\n"
THINKING = f"<think>\n{THOUGHT}</think>\n\nHello there!"
ARGS = {"city": "Paris"}
FORCED = f"<think>\n{THOUGHT}</think>\n\n" + json.dumps(ARGS, separators=(",", ":"))
TOOL = {"name": "weather", "description": "Weather now", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer, server_options={"reasoning_parser": "qwen3"})
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai_client(server.url)


def _script(server: Any, tokenizer: Any, text: str) -> list[int]:
    server.engine.script = ids = tokenizer.encode(text, add_special_tokens=False)
    return ids


def _tokens_through_end_tag(tokenizer: Any, ids: list[int]) -> int:
    """The reasoning tokens, counted the slow way: the first prefix whose text holds `</think>`."""
    return next(k for k in range(1, len(ids) + 1) if "</think>" in tokenizer.decode(ids[:k]))


def test_responses_reasoning_item(client: openai.OpenAI, server: Any, tokenizer: Any) -> None:
    ids = _script(server, tokenizer, THINKING)
    try:
        done = client.responses.create(model="tiny", input="Hi")
        events = list(client.responses.create(model="tiny", input="Hi", stream=True))
        # a reasoning item sent back with the next turn is accepted and not shown to the model again
        again = client.responses.create(
            model="tiny", input=[{"role": "user", "content": "Hi"}, done.output[0].model_dump()]
        )
    finally:
        server.engine.script = None
    assert [item.type for item in done.output] == ["reasoning", "message"]
    thought = done.output[0]
    assert thought.type == "reasoning" and [(c.type, c.text) for c in thought.content or []] == [
        ("reasoning_text", THOUGHT)
    ]
    assert done.output_text == "Hello there!" and done.status == "completed"
    assert done.usage and done.usage.output_tokens == len(ids) + 1  # the script, then the fake engine's EOS
    expected = _tokens_through_end_tag(tokenizer, ids)
    assert 0 < expected < len(ids) and done.usage.output_tokens_details.reasoning_tokens == expected
    assert again.status == "completed" and again.usage and again.usage.input_tokens == done.usage.input_tokens

    kinds = [e.type for e in events]
    first_text = kinds.index("response.output_text.delta")
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta"]  # fmt: skip
    closing = ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done"]
    end = kinds.index("response.reasoning_text.done")
    assert kinds[end : end + 3] == closing and end < first_text
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")  # type: ignore[union-attr]
    assert deltas == THOUGHT
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert [item.type for item in final.output] == [
        "reasoning",
        "message",
    ] and final.output_text == "Hello there!"
    assert final.usage and final.usage.output_tokens_details.reasoning_tokens == expected


def test_responses_reply_cut_inside_its_reasoning(client: openai.OpenAI, server: Any, tokenizer: Any) -> None:
    ids = _script(server, tokenizer, THINKING)
    cut = _tokens_through_end_tag(tokenizer, ids) - 2  # stops before the block closes
    try:
        done = client.responses.create(model="tiny", input="Hi", max_output_tokens=cut)
        events = list(client.responses.create(model="tiny", input="Hi", max_output_tokens=cut, stream=True))
    finally:
        server.engine.script = None
    for response in (done, events[-1].response):  # type: ignore[union-attr]
        assert response.status == "incomplete" and [item.type for item in response.output] == ["reasoning"]
        assert response.output[0].status == "incomplete" and response.output_text == ""
        assert response.usage and response.usage.output_tokens_details.reasoning_tokens == cut


def test_forced_call_after_reasoning(client: openai.OpenAI, server: Any, tokenizer: Any) -> None:
    _script(server, tokenizer, FORCED)
    tools = [{"type": "function", "function": TOOL}]
    named = {"type": "function", "function": {"name": "weather"}}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    anth = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    anth_kw: dict[str, Any] = {"model": "tiny", "max_tokens": 100, "messages": messages,
                               "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
                               "tool_choice": {"type": "tool", "name": "weather"}}  # fmt: skip
    resp_kw: dict[str, Any] = {"model": "tiny", "input": "Weather in Paris?", "tools": [{"type": "function", **TOOL}],
                               "tool_choice": {"type": "function", "name": "weather"}}  # fmt: skip
    try:
        chat = client.chat.completions.create(model="tiny", messages=messages, tools=tools, tool_choice=named)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=tools,
                                                     tool_choice=named, stream=True))  # fmt: skip
        message = anth.messages.create(**anth_kw)
        with anth.messages.stream(**anth_kw) as stream:
            streamed = stream.get_final_message()
        response = client.responses.create(**resp_kw)
        resp_events = list(client.responses.create(**resp_kw, stream=True))
    finally:
        server.engine.script = None
    reply = chat.choices[0].message
    assert getattr(reply, "reasoning_content", None) == THOUGHT and reply.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.tool_calls or []] == [
        ("weather", ARGS)
    ]
    deltas = [ch.delta for chunk in chunks for ch in chunk.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
    assert not "".join(d.content or "" for d in deltas)
    calls, _ = streamed_tool_calls(chunks)
    assert [(name, json.loads(args)) for name, args in calls.values()] == [("weather", ARGS)]
    for m in (message, streamed):
        assert [b.type for b in m.content] == ["thinking", "tool_use"]
        assert m.content[0].thinking == THOUGHT and m.content[1].input == ARGS  # type: ignore[union-attr]
    for r in (response, resp_events[-1].response):  # type: ignore[union-attr]
        assert [item.type for item in r.output] == ["reasoning", "function_call"]
        assert json.loads(r.output[1].arguments) == ARGS  # type: ignore[union-attr]


def test_forced_chat_call_cut_inside_the_reasoning(
    client: openai.OpenAI, server: Any, tokenizer: Any
) -> None:
    """max_tokens spent inside the reasoning block: the reasoning written so far, no content, and still the named
    call (vLLM returns a forced named call whatever was written), with no arguments; finish_reason length."""
    ids = _script(server, tokenizer, FORCED)
    cut = _tokens_through_end_tag(tokenizer, ids) // 2
    kw: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], max_tokens=cut,
                              tools=[{"type": "function", "function": TOOL}],
                              tool_choice={"type": "function", "function": {"name": "weather"}})  # fmt: skip
    try:
        whole = client.chat.completions.create(**kw).choices[0]
        chunks = list(client.chat.completions.create(stream=True, **kw))
    finally:
        server.engine.script = None
    thought = tokenizer.decode(ids[:cut]).removeprefix("<think>\n")
    reply = whole.message
    got = [(c.function.name, c.function.arguments) for c in reply.tool_calls or []]
    assert (whole.finish_reason, reply.content, got) == ("length", None, [("weather", "")])
    assert getattr(reply, "reasoning_content", None) == thought
    deltas = [ch.delta for chunk in chunks for ch in chunk.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thought
    assert not "".join(d.content or "" for d in deltas)
    assert list(streamed_tool_calls(chunks)[0].values()) == [("weather", "")]
    assert [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason] == ["length"]
