"""Tool calls in Qwen3-Coder's XML format (`--tool-call-parser qwen3_coder`): the parser alone, fed whole and in
every split into two pieces (and many into three), values typed by the tool's schema; and the chat and messages
routes through the openai / anthropic SDKs (a fake engine writes the reply), streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from frontend_helpers import check_in_any_pieces, start_fake_server, streamed_tool_calls

from treadle_frontend.server.call_xml import tool_schemas
from treadle_frontend.server.reply import tool_stream

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"},
                   "ok": {"type": "boolean"}, "tags": {"type": "array"}},
}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}]


def _call(city: str, days: str = "3") -> str:
    return (
        f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n"
        f"<parameter=days>\n{days}\n</parameter>\n</function>\n</tool_call>"
    )


CASES = [
    (_call("Paris"), None, [("get_weather", {"city": "Paris", "days": 3})]),
    (
        "Let me check.\n\n" + _call("Paris") + "\n" + _call("Zürich", "1"),
        "Let me check.",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Zürich", "days": 1})],
    ),
    ("<tool_call>\n<function=f>\n</function>\n</tool_call>", None, [("f", {})]),
    # by the schema: a string stays one even when it reads as a number; other types read as JSON; a value that
    # does not parse stays a string; a parameter the schema does not name reads as JSON where it is a number
    (
        '<tool_call>\n<function=get_weather>\n<parameter=opts>\n{"a": [1, "</"]}\n</parameter>\n'
        "<parameter=city>\n123\n</parameter>\n<parameter=extra>\n2.5\n</parameter>\n"
        "<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call> and then text",
        "and then text",
        [("get_weather", {"opts": {"a": [1, "</"]}, "city": "123", "extra": 2.5, "days": "three"})],
    ),
    ("plain text  \n", "plain text  \n", []),
    (
        "<tool_call>not a call</tool_call> after",
        "<tool_call>not a call</tool_call> after",
        [],
    ),  # nothing lost
    ("a <tool_ca", "a <tool_ca", []),
    # a model that leaves `</parameter>` out: the value ends at the next parameter or at `</function>` (as vLLM)
    (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</function>\n</tool_call>",
        None,
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    # vLLM's typing: Python's True for a boolean, a Python list literal for an array, null for any type
    (
        "<tool_call>\n<function=get_weather>\n<parameter=ok>\nTrue\n</parameter>\n<parameter=tags>\n['a', 'b']\n"
        "</parameter>\n<parameter=city>\nnull\n</parameter>\n</function>\n</tool_call>",
        None,
        [("get_weather", {"ok": True, "tags": ["a", "b"], "city": None})],
    ),
    # text around a call keeps one separator, not glued together
    (
        "Let me check.\n" + _call("Paris") + "\nDone",
        "Let me check.\nDone",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_any_pieces("qwen3_coder", text, (content, calls), step=11, schemas=tool_schemas(TOOLS))


def test_arguments_stream_per_parameter_and_a_cut_call_keeps_them() -> None:
    stream = tool_stream("qwen3_coder", tool_schemas(TOOLS))
    pieces = [p for ch in _call("Paris") for p in stream.feed(ch)] + stream.finish()
    deltas = [d for p in pieces for d in p.deltas]
    assert [d.arguments for d in deltas] == ["", '{"city": "Paris"', ', "days": 3', "}", ""]
    assert deltas[0].first and deltas[-1].done
    cut = tool_stream("qwen3_coder", tool_schemas(TOOLS))
    text = _call("Paris")
    pieces = cut.feed(text[: text.index("3\n")]) + cut.finish()  # cut inside the days value
    assert [(c.arguments, c.complete) for p in pieces for c in p.calls] == [
        ('{"city": "Paris", "days": ""', False)
    ]


def test_schemas_from_openai_and_anthropic_tools() -> None:
    anthropic_tool = {"name": "g", "input_schema": {"properties": {"n": {"type": "number"}}}}
    assert tool_schemas([*TOOLS, anthropic_tool, "junk", {"function": {"name": 3}}]) == {
        "get_weather": PARAMETERS,
        "g": anthropic_tool["input_schema"],
    }


@pytest.fixture(scope="module")
def xml_server(tokenizer: Any) -> Iterator[Any]:
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "qwen3_coder"}
    server, handle = start_fake_server(tokenizer, server_options=options)
    # a city that reads as a number: only the request's schema keeps it a string
    handle.engine.script = tokenizer.encode(_call("1984", "2"), add_special_tokens=False)
    with server:
        yield handle


@pytest.mark.parametrize("stream", [False, True])
def test_chat_and_messages_routes(xml_server: Any, stream: bool) -> None:
    client = openai.OpenAI(base_url=xml_server.url + "/v1", api_key="x", max_retries=0)
    kw: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=200
    )
    expected = [("get_weather", {"city": "1984", "days": 2})]
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert not any(ch.delta.content for chunk in chunks for ch in chunk.choices)
        calls, pieces = streamed_tool_calls(chunks)
        assert [(name, json.loads(args)) for name, args in calls.values()] == expected and pieces >= 3
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        assert got == expected and choice.finish_reason == "tool_calls" and choice.message.content is None
    claude = anthropic.Anthropic(base_url=xml_server.url, api_key="x", max_retries=0)
    tool = {"name": "get_weather", "description": "Weather", "input_schema": PARAMETERS}
    body: dict[str, Any] = dict(
        model="tiny", max_tokens=200, messages=[{"role": "user", "content": "Weather?"}], tools=[tool]
    )
    if stream:
        with claude.messages.stream(**body) as s:
            m = s.get_final_message()
    else:
        m = claude.messages.create(**body)
    assert (
        m.stop_reason == "tool_use"
        and [(b.name, b.input) for b in m.content if b.type == "tool_use"] == expected
    )
