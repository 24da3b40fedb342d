"""Constrained decoding on gpt-oss's harmony replies, through the openai SDK (harmony_assets' tokenizer and fake
engine; the fake engine writes scripted replies, so what is checked here is what reaches the engine and how the
reply is read): a JSON response_format or structured_outputs holds off until the final message's header (the
analysis stays reasoning, the JSON is content); a forced named call is an analysis message or none, then its forced
call header and its arguments, and comes back as reasoning and the call; "required" is the same with the final
message's header forced and an array of calls as its JSON (chat, streamed or not, and Anthropic's tool_choice any);
an assistant turn of several calls reaches the template as one message per call, each followed by its result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from frontend_helpers import openai_client, streamed_tool_calls
from harmony_assets import ANALYSIS, THOUGHT, build_harmony_tokenizer, start_harmony_server

from treadle_frontend.server.harmony import ForcedCallHeader
from treadle_frontend.server.harmony_messages import one_call_per_message

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
JSON_REPLY = '{"city": "Paris"}'
FINAL_JSON = f"<|start|>assistant<|channel|>final<|message|>{JSON_REPLY}<|return|>"
CALL_HEADER = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_harmony_tokenizer(tmp_path_factory.mktemp("harmony_tok"))


@pytest.fixture(scope="module")
def server(harmony_tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_harmony_server(
        harmony_tokenizer, enable_auto_tool_choice=True, tool_call_parser="openai"
    )
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai_client(server.url)


def _ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def _called(client: openai.OpenAI, stream: bool, kw: dict[str, Any]) -> tuple[list[Any], list[Any], str, str]:
    """A chat request's (calls as (name, arguments), finish reasons, content, reasoning), streamed or not."""
    if stream:
        chunks = list(client.chat.completions.create(model="tiny", stream=True, **kw))
        calls, _ = streamed_tool_calls(chunks)
        got = [(name, json.loads(arguments)) for name, arguments in calls.values()]
        finish = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
        deltas = [c.delta for chunk in chunks for c in chunk.choices]
        content = "".join(d.content or "" for d in deltas)
        return got, finish, content, "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    reply = client.chat.completions.create(model="tiny", **kw)
    message = reply.choices[0].message
    got = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    reasoning = getattr(message, "reasoning_content", None) or ""
    return got, [reply.choices[0].finish_reason], message.content or "", reasoning


@pytest.mark.parametrize(
    "ask",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}},
        {"response_format": {"type": "json_object"}},
        {"extra_body": {"structured_outputs": {"json": SCHEMA}}},
        {"extra_body": {"guided_json": SCHEMA}},
    ],
)
def test_json_after_the_analysis_is_the_content(
    client: openai.OpenAI, server: Any, harmony_tokenizer: Any, ask: dict[str, Any]
) -> None:
    server.script(ANALYSIS + FINAL_JSON)
    try:
        done = client.chat.completions.create(model="tiny", messages=ASK, **ask)
        chunks = list(client.chat.completions.create(model="tiny", messages=ASK, stream=True, **ask))
    finally:
        server.engine.script = None
    message = done.choices[0].message
    assert (message.content, getattr(message, "reasoning_content", None)) == (JSON_REPLY, THOUGHT)
    deltas = [c.delta for chunk in chunks for c in chunk.choices]
    assert "".join(d.content or "" for d in deltas) == JSON_REPLY
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
    # held off until the final message's header, as this tokenizer writes it
    header = _ids(harmony_tokenizer, "<|channel|>final<|message|>")
    for request in server.requests[-2:]:
        so = request.sampling_params.structured_outputs
        assert (so.reasoning, so.reasoning_end_ids, so.is_header_forced) == ("harmony", header, False)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("analysis", ["", ANALYSIS + "<|start|>assistant"])
def test_a_forced_named_call_is_a_harmony_call(
    client: openai.OpenAI, server: Any, harmony_tokenizer: Any, stream: bool, analysis: str
) -> None:
    """The runner holds the reply to an analysis message or none, then the forced header (the scripted replies
    take both paths): the analysis is reasoning, the header is dropped, the arguments are the call."""
    call_id = harmony_tokenizer.convert_tokens_to_ids("<|call|>")
    server.script(analysis + CALL_HEADER + JSON_REPLY + "<|call|>")
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kw: dict[str, Any] = dict(messages=ASK, tools=[WEATHER], tool_choice=choice,
                              extra_body={"stop_token_ids": [call_id]})  # fmt: skip
    try:
        got, finish, content, reasoning = _called(client, stream, kw)
    finally:
        server.engine.script = None
    thought = THOUGHT if analysis else ""
    assert (got, finish, content, reasoning) == ([("get_weather", {"city": "Paris"})], ["stop"], "", thought)
    so = server.requests[-1].sampling_params.structured_outputs
    header = _ids(harmony_tokenizer, CALL_HEADER)
    assert (so.reasoning, so.is_header_forced, so.reasoning_end_ids) == ("harmony", True, header)
    opening = _ids(harmony_tokenizer, "<|channel|>analysis<|message|>")
    closing = _ids(harmony_tokenizer, "<|end|><|start|>assistant")
    assert (so.analysis_open_ids, so.analysis_close_ids) == (opening, closing)
    assert json.loads(so.json) == WEATHER["function"]["parameters"]  # type: ignore[index]


def test_the_forced_call_reader_splits_the_same_in_any_pieces() -> None:
    reply = ANALYSIS + "<|start|>assistant" + CALL_HEADER + JSON_REPLY
    for size in (1, 2, 5, len(reply)):
        reader = ForcedCallHeader()
        parts = [reader.split(reply[i : i + size]) for i in range(0, len(reply), size)]
        parts.append(reader.split("", final=True))
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (THOUGHT, JSON_REPLY), size
    assert ForcedCallHeader().split(JSON_REPLY, final=True) == ("", JSON_REPLY)  # no markers: all content
    assert ForcedCallHeader().split(CALL_HEADER[:-5], final=True) == ("", "")  # cut in the header: nothing
    # cut in the analysis: what it wrote is reasoning
    assert ForcedCallHeader().split(ANALYSIS[:-3], final=True) == (THOUGHT + "<|en", "")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("analysis", ["", ANALYSIS + "<|start|>assistant"])
def test_a_required_call_is_the_final_message_array(
    client: openai.OpenAI, server: Any, harmony_tokenizer: Any, stream: bool, analysis: str
) -> None:
    """tool_choice "required": an analysis message or none, then the final message's header forced and an array of
    calls constrained to the tools' schemas; the analysis is reasoning, each item a call, finish_reason tool_calls."""
    return_id = harmony_tokenizer.convert_tokens_to_ids("<|return|>")
    calls = [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]
    server.script(analysis + "<|channel|>final<|message|>" + json.dumps(calls) + "<|return|>")
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    kw: dict[str, Any] = dict(messages=ASK, tools=[WEATHER, clock], tool_choice="required",
                              extra_body={"stop_token_ids": [return_id]})  # fmt: skip
    try:
        got, finish, content, reasoning = _called(client, stream, kw)
    finally:
        server.engine.script = None
    expected = [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert (got, finish, content, reasoning) == (expected, ["tool_calls"], "", THOUGHT if analysis else "")
    so = server.requests[-1].sampling_params.structured_outputs
    header = _ids(harmony_tokenizer, "<|channel|>final<|message|>")
    assert (so.reasoning, so.is_header_forced, so.reasoning_end_ids) == ("harmony", True, header)
    schema = json.loads(so.json)
    assert schema["type"] == "array" and schema["minItems"] == 1
    names = sorted(item["properties"]["name"]["enum"][0] for item in schema["items"]["anyOf"])
    assert names == ["get_time", "get_weather"]


def test_anthropic_any_tool_is_a_required_call(server: Any, harmony_tokenizer: Any) -> None:
    """Anthropic's tool_choice {"type": "any"} is "required": the same forced final message, its items tool_use."""
    import anthropic

    server.script(ANALYSIS + "<|start|>assistant<|channel|>final<|message|>"
                  + json.dumps([{"name": "get_weather", "parameters": {"city": "Paris"}}]) + "<|return|>")  # fmt: skip
    tool = {"name": "get_weather", "description": "Weather in a city", "input_schema": SCHEMA}
    client = anthropic.Anthropic(base_url=server.url, api_key="none")
    try:
        reply = client.messages.create(model="tiny", max_tokens=1024, messages=ASK, tools=[tool],
                                       tool_choice={"type": "any"})  # fmt: skip
    finally:
        server.engine.script = None
    blocks = [(b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in reply.content]
    assert blocks[-1] == ("tool_use", "get_weather", {"city": "Paris"}) and reply.stop_reason == "tool_use"
    assert blocks[0][0] == "thinking"
    so = server.requests[-1].sampling_params.structured_outputs
    final_header = _ids(harmony_tokenizer, "<|channel|>final<|message|>")
    assert so.is_header_forced and so.reasoning_end_ids == final_header


def _call(i: int, name: str, city: str) -> dict[str, Any]:
    arguments = json.dumps({"city": city})
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


def test_several_calls_render_one_message_each(client: openai.OpenAI, server: Any) -> None:
    """gpt-oss's template (as the test's) renders an assistant message's first call only, and a result as from
    the last call rendered: each call becomes its own message, its result after it, the first keeping the
    reasoning."""
    calls = [_call(1, "get_weather", "Paris"), _call(2, "get_time", "Rome")]
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "reasoning_content": THOUGHT, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    server.script("<|channel|>final<|message|>Sunny; noon.<|return|>")
    try:
        reply = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER])
    finally:
        server.engine.script = None
    assert reply.choices[0].message.content == "Sunny; noon."
    expected = (
        f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>'
        '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"city": "Rome"}<|call|>'
        '<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>"noon"<|end|>'
        "<|start|>assistant"
    )
    assert server.last_prompt().endswith(expected)


def test_one_call_per_message_pairs_results_by_id_else_by_position() -> None:
    calls = [_call(1, "a", "x"), _call(2, "b", "y")]
    turn = {"role": "assistant", "content": "hm", "thinking": "t", "tool_calls": calls}
    by_id = [turn, {"role": "tool", "tool_call_id": "call_2", "content": "B"},
             {"role": "tool", "tool_call_id": "call_1", "content": "A"}, {"role": "user", "content": "u"}]  # fmt: skip
    got = one_call_per_message(by_id)
    assert [(m["role"], m.get("content"), [c["id"] for c in m.get("tool_calls", [])]) for m in got] == [
        ("assistant", "hm", ["call_1"]), ("tool", "A", []), ("assistant", None, ["call_2"]), ("tool", "B", []),
        ("user", "u", []),
    ]  # fmt: skip
    assert "thinking" not in got[2]
    unnamed = [turn, {"role": "tool", "content": "first"}, {"role": "tool", "content": "second"}]
    assert [m.get("content") for m in one_call_per_message(unnamed)] == ["hm", "first", None, "second"]
    single = [{"role": "assistant", "tool_calls": calls[:1]}, {"role": "tool", "content": "r"}]
    assert one_call_per_message(single) == single
