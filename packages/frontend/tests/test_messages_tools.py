"""Tool use on /v1/messages through the real anthropic SDK, on a server started with the tool-call flags (a
fake engine writes test_tool_calls.REPLY: some text, then two hermes-format calls): tool_use blocks after the
text and stop_reason tool_use, the same blocks streamed, tool history reaching the template, and the errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from frontend_helpers import start_fake_server
from test_tool_calls import REPLY

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ASK = [{"role": "user", "content": "Weather in Paris and Zürich?"}]
EXPECTED = [
    ("text", "Let me check both."),
    ("get_weather", {"city": "Paris"}),
    ("get_weather", {"city": "Zürich"}),
]


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    srv, handle = start_fake_server(tokenizer, server_options=options)
    handle.engine.script = tokenizer.encode(REPLY, add_special_tokens=False)
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def _blocks(content: Any) -> list[tuple[str, Any]]:
    return [(b.type, b.text) if b.type == "text" else (b.name, b.input) for b in content]


def test_reply_with_tool_use_blocks(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="tiny", max_tokens=200, tools=[WEATHER], messages=ASK)
    assert m.stop_reason == "tool_use" and _blocks(m.content) == EXPECTED
    ids = [b.id for b in m.content if b.type == "tool_use"]
    assert len(set(ids)) == 2 and all(i.startswith("toolu_") for i in ids)


def test_streamed_tool_use_blocks(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="tiny", max_tokens=200, tools=[WEATHER], messages=ASK) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and _blocks(final.content) == EXPECTED
    starts = [e.index for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == stops == [0, 1, 2]
    deltas = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    # each call's input streams as it is written
    for index, (_, args) in ((1, EXPECTED[1]), (2, EXPECTED[2])):
        parts = [e.delta.partial_json for e in deltas if e.index == index]  # type: ignore[union-attr]
        assert len(parts) > 2 and json.loads("".join(parts)) == args


@pytest.mark.parametrize(
    ("written", "expected"), [('"city": "Pa', {}), ('"city": "Paris"', {"city": "Paris"})]
)
def test_a_call_cut_by_max_tokens(
    client: anthropic.Anthropic, server: Any, tokenizer: Any, written: str, expected: dict[str, Any]
) -> None:
    ids = server.engine.script
    cut = next(n for n in range(len(ids)) if written in tokenizer.decode(ids[:n]))
    m = client.messages.create(model="tiny", max_tokens=cut, tools=[WEATHER], messages=ASK)
    assert m.stop_reason == "max_tokens" and [b.type for b in m.content] == ["text", "tool_use"]
    with client.messages.stream(model="tiny", max_tokens=cut, tools=[WEATHER], messages=ASK) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and [b.type for b in final.content] == ["text", "tool_use"]
    # the input written so far (complete values), whole or streamed (as the SDK reads partial JSON)
    assert m.content[1].input == final.content[1].input == expected  # type: ignore[union-attr]


def test_a_reply_that_opens_with_a_call_streams_no_empty_text_block(tokenizer: Any) -> None:
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    srv, handle = start_fake_server(tokenizer, server_options=options)
    handle.engine.script = tokenizer.encode(REPLY[REPLY.index("<tool_call>") :], add_special_tokens=False)
    with srv:
        client = anthropic.Anthropic(base_url=handle.url, api_key="x", max_retries=0)
        whole = client.messages.create(model="tiny", max_tokens=200, tools=[WEATHER], messages=ASK)
        with client.messages.stream(model="tiny", max_tokens=200, tools=[WEATHER], messages=ASK) as stream:
            starts = [e.index for e in stream if e.type == "content_block_start"]
            final = stream.get_final_message()
    assert [b.type for b in whole.content] == [b.type for b in final.content] == ["tool_use", "tool_use"]
    assert starts == [0, 1] and final.stop_reason == whole.stop_reason == "tool_use"


def test_tool_history_reaches_the_template(client: anthropic.Anthropic) -> None:
    def count(result: str) -> int:
        turns = [
            *ASK,
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": result}]},
        ]  # fmt: skip
        return client.messages.count_tokens(model="tiny", tools=[WEATHER], messages=turns).input_tokens

    assert count("18 degrees Celsius and sunny all day") > count("18 C")
    reply = client.messages.create(
        model="tiny",
        max_tokens=200,
        tools=[WEATHER],
        messages=[*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                         "name": "get_weather", "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                "content": [{"type": "text", "text": "18 C"}]}]}],
    )  # fmt: skip
    assert reply.stop_reason == "tool_use"


def test_tool_choice_none_replies_with_text(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model="tiny", max_tokens=200, tools=[WEATHER], tool_choice={"type": "none"}, messages=ASK
    )
    assert m.stop_reason == "end_turn" and _blocks(m.content) == [("text", REPLY)]


BAD = [
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tool_choice": {"type": "tool", "name": "get_time"}}, "tool_choice: no tool named 'get_time' in tools"),
    ({"tool_choice": {"type": "required"}}, "tool_choice: 'required' is not one of auto, none, any, tool"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "1"}]}]},
     "messages.0.content[0]: content blocks of type 'tool_result' are not supported in a assistant turn"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [{"type": "image"}]}]}]},
     "messages.0.content[0].content[0]: tool results are text here"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_tool_requests_are_named(server: Any, change: dict[str, Any], message: str) -> None:
    body = {"model": "tiny", "max_tokens": 2, "tools": [WEATHER], "messages": ASK, **change}
    r = httpx.post(server.url + "/v1/messages", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


TIME = {
    "name": "get_time",
    "description": "Time in a city",
    "input_schema": {"type": "object", "properties": {}},
}
FORCED = [  # (tool_choice, the reply constrained decoding writes)
    ({"type": "any"}, '[{"name":"get_weather","parameters":{"city":"Paris"}}]'),
    ({"type": "tool", "name": "get_weather"}, '{"city":"Paris"}'),
]


@pytest.mark.parametrize(("tool_choice", "reply"), FORCED)
def test_a_forced_call_cut_by_max_tokens(tokenizer: Any, tool_choice: dict[str, Any], reply: str) -> None:
    """Anthropic's forced tool_choice cut by max_tokens, at every token: stop_reason max_tokens and only tool_use
    blocks, whole and streamed. `tool` names its call whatever was written; `any` has a call once its name is
    written whole, and no content before (never the JSON as text); the input is what was written whole so far."""
    srv, handle = start_fake_server(tokenizer)  # a forced call needs no tool-call flags
    ids = tokenizer.encode(reply, add_special_tokens=False)
    handle.engine.script = ids
    with srv:
        client = anthropic.Anthropic(base_url=handle.url, api_key="x", max_retries=0)
        for cut in range(1, len(ids)):
            written = tokenizer.decode(ids[:cut])
            named = tool_choice["type"] == "tool" or '"name":"get_weather"' in written
            want = [("get_weather", {"city": "Paris"} if '"Paris"' in written else {})] if named else []
            kw: dict[str, Any] = dict(model="tiny", max_tokens=cut, tools=[WEATHER, TIME], messages=ASK,
                                      tool_choice=tool_choice)  # fmt: skip
            whole = client.messages.create(**kw)
            with client.messages.stream(**kw) as stream:
                streamed = stream.get_final_message()
            for m in (whole, streamed):
                assert m.stop_reason == "max_tokens" and _blocks(m.content) == want, (written, m.content)
