"""Tool calls in the pythonic format (`--tool-call-parser pythonic`): the parser alone, fed whole and in every split
into two pieces (and many into three), and the chat route through the openai SDK (a fake engine writes the reply),
streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from frontend_helpers import check_in_any_pieces, start_fake_server, streamed_tool_calls

from treadle_frontend.server.call_pythonic import parse_python_call
from treadle_frontend.server.reply import tool_stream

REPLY = "[get_weather(city=\"Paris\", days=3), get_time(zone='CET')]"
BOTH = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "CET"})]
CASES = [
    (REPLY, None, BOTH),
    (
        '<|python_start|>[f(a=[1, 2], b={"k": None, "t": True})]<|python_end|>',
        None,
        [("f", {"a": [1, 2], "b": {"k": None, "t": True}})],
    ),
    ('[f(s="a, b) ]"), g()]', None, [("f", {"s": "a, b) ]"}), ("g", {})]),  # brackets inside strings
    ("[f(s='''tri\"ple'''), g(n=-1.5)]", None, [("f", {"s": 'tri"ple'}), ("g", {"n": -1.5})]),
    ("Sure, here you go.", "Sure, here you go.", []),
    ("[1, 2]", "[1, 2]", []),  # nothing in it is a call: text, as written
    ("[f(x=y)]", "[f(x=y)]", []),  # not a literal
    ("[f(x=1), 2]", "2]", [("f", {"x": 1})]),  # streaming stops at the item that is no call; nothing lost
    ("[f() x, g()]", "x, g()]", [("f", {})]),
    ("[f(x=1), g(y=", "g(y=", [("f", {"x": 1})]),  # cut short: the unfinished item is content
    ("  [f()] and more", "and more", [("f", {})]),
    ("<|python", "<|python", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_any_pieces("pythonic", text, (content, calls), step=3)


def test_each_call_is_released_as_it_closes() -> None:
    stream = tool_stream("pythonic")
    first = REPLY.index(")") + 1
    assert [c.name for p in stream.feed(REPLY[: first - 1]) for c in p.calls] == []
    assert [c.name for p in stream.feed(REPLY[first - 1 : first]) for c in p.calls] == ["get_weather"]


@pytest.mark.parametrize("text", ["f(1)", "f(**k)", "f(x={1, 2})", "a.f(x=1)", "f(x=1", "[f()]"])
def test_what_is_not_a_call(text: str) -> None:
    assert parse_python_call(text) is None


@pytest.fixture(scope="module")
def pythonic_server(tokenizer: Any) -> Iterator[Any]:
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "pythonic"}
    server, handle = start_fake_server(tokenizer, server_options=options)
    handle.engine.script = tokenizer.encode(REPLY, add_special_tokens=False)
    with server:
        yield handle


@pytest.mark.parametrize("stream", [False, True])
def test_chat_pythonic_tool_calls(pythonic_server: Any, stream: bool) -> None:
    client = openai.OpenAI(base_url=pythonic_server.url + "/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    kw: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[tool], max_tokens=200
    )
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert not any(ch.delta.content for chunk in chunks for ch in chunk.choices)
        calls, _ = streamed_tool_calls(chunks)
        got = [(name, json.loads(args)) for name, args in (calls[i] for i in sorted(calls))]
        finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        finish = [choice.finish_reason]
    assert got == BOTH and finish == ["tool_calls"]
