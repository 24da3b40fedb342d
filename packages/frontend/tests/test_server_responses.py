"""/v1/responses (OpenAI's Responses API, text) through the real openai SDK with strict validation: a reply, its
usage and status (completed, or incomplete at max_output_tokens), the streamed events in order with their
sequence numbers, and the 400s for what is not served."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import openai_client, start_fake_server


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer)
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai_client(server.url)


def test_reply_usage_and_status(client: openai.OpenAI, server: Any, tokenizer: Any) -> None:
    cut = client.responses.create(model="tiny", input="Hello there", max_output_tokens=5)
    assert (
        cut.status == "incomplete"
        and cut.incomplete_details
        and cut.incomplete_details.reason == "max_output_tokens"
    )
    assert cut.output_text and cut.usage and cut.usage.output_tokens == 5 and cut.usage.total_tokens > 5
    server.engine.script = tokenizer.encode("A short answer.", add_special_tokens=False)
    try:
        done = client.responses.create(
            model="tiny",
            instructions="Be brief.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Answer?"}],
        )  # fmt: skip
    finally:
        server.engine.script = None
    assert (
        done.status == "completed"
        and done.output_text == "A short answer."
        and done.incomplete_details is None
    )
    assert done.output[0].type == "message" and done.instructions == "Be brief."


def test_streamed_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="tiny", input="Hello", max_output_tokens=6, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # fmt: skip
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.usage is not None and final.usage.output_tokens == 6


@pytest.mark.parametrize(("change", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),  # accepted, but dropped: nothing to answer
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])  # fmt: skip
def test_what_is_not_served_is_a_400(server: Any, change: dict[str, Any], param: str) -> None:
    body = {"model": "tiny", "input": "Hi", **change}
    r = httpx.post(server.url + "/v1/responses", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_read_from_the_reply(tokenizer: Any, stream: bool) -> None:
    """With the tool-call flags, calls the reply writes are function_call items after its text, streamed as
    items of their own; the calls and their outputs go back as input items."""
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    srv, handle = start_fake_server(tokenizer, server_options=options)
    reply = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    handle.engine.script = tokenizer.encode(reply, add_special_tokens=False)
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    history = [{"role": "user", "content": "Weather?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "21 C"}]  # fmt: skip
    with srv:
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key="x", _strict_response_validation=True)
        if stream:
            events = list(client.responses.create(model="tiny", input=history, tools=[tool], stream=True))
            kinds = [e.type for e in events]
            assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
            parts = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
            assert len(parts) > 2 and json.loads("".join(parts)) == {"city": "Paris"}  # streamed as written
            added = [e.item for e in events if e.type == "response.output_item.added"]  # type: ignore[union-attr]
            assert added[-1].type == "function_call" and added[-1].name == "get_weather"
            assert added[-1].arguments == ""  # the arguments come in the delta events
            done = events[-1].response  # type: ignore[union-attr]
        else:
            done = client.responses.create(model="tiny", input=history, tools=[tool])
    assert [o.type for o in done.output] == ["message", "function_call"] and done.output_text == "Checking."
    call = done.output[1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_output_tokens(tokenizer: Any, stream: bool) -> None:
    """The reply ends inside a call's arguments: the response and the function_call item are incomplete, the
    arguments as far as they got."""
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    srv, handle = start_fake_server(tokenizer, server_options=options)
    reply = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call>'
    ids = tokenizer.encode(reply, add_special_tokens=False)
    handle.engine.script = ids
    cut = next(n for n in range(len(ids)) if '"city": "Pa' in tokenizer.decode(ids[:n]))
    written = tokenizer.decode(ids[:cut])
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    kw: dict[str, Any] = {"model": "tiny", "input": "Weather?", "tools": [tool], "max_output_tokens": cut}
    with srv:
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key="x", _strict_response_validation=True)
        if stream:
            events = list(client.responses.create(stream=True, **kw))
            assert events[-1].type == "response.incomplete"
            done = events[-1].response  # type: ignore[union-attr]
        else:
            done = client.responses.create(**kw)
    assert done.status == "incomplete" and [o.type for o in done.output] == ["function_call"]
    call = done.output[0]
    assert call.type == "function_call" and call.status == "incomplete"
    assert call.arguments == written[written.index('{"city"') :]
