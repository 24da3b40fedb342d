"""Tool calls written in the hermes format (`<tool_call>{json}</tool_call>`): the parser alone, fed whole and in
every split, and the chat route with `--enable-auto-tool-choice --tool-call-parser hermes` through the openai
SDK (a fake engine writes the reply), streamed and not."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from frontend_helpers import WEATHER, start_fake_server, streamed_tool_calls

from treadle_frontend.server import ServerConfig
from treadle_frontend.server.reply import parse_whole, tool_stream
from treadle_frontend.server.tool_calls import Piece, ToolCallStream, template_messages


def parse_reply(text: str) -> tuple[str | None, list[Any]]:
    """A whole reply through the hermes parser alone: (content, calls)."""
    return parse_whole(text, None, "hermes")[1:]


REPLY = (
    "Let me check both.\n<tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    + "\n</tool_call>\n<tool_call>\n"
    + json.dumps({"name": "get_weather", "arguments": {"city": "Zürich"}}, ensure_ascii=False)
    + "\n</tool_call>\n"
)


def _summary(content: str | None, calls: list[Any]) -> tuple[str | None, list[tuple[str, Any]]]:
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_parse_reply() -> None:
    content, calls = _summary(*parse_reply(REPLY))
    assert content == "Let me check both."
    assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Zürich"})]
    only = '<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>'
    assert _summary(*parse_reply(only)) == (None, [("f", {"x": 1})])
    assert parse_reply("plain text, kept as written \n") == ("plain text, kept as written \n", [])
    for bad in ("<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                'Sure <tool_call>{"name": "f"', '<tool_call>{"name": "Bob", "age": 3}</tool_call>'):  # fmt: skip
        assert parse_reply(bad) == (bad, []), bad
    args_text = parse_reply('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>')[1][
        0
    ].arguments
    assert json.loads(args_text) == {"a": 2}


CUT_SHORT = '<tool_call>{"name": "f", "arguments": {"a": [1, "x}'
ODD_CALLS = [
    '<tool_call>{"name": "f", "arguments": {"code": "if (x) { y(\\"}\\"); }"}, "id": 3}</tool_call>',
    '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>',  # read whole: the name comes second
    '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call> then text',  # the object never closes
]


def _feed(text: str, cuts: list[int]) -> tuple[str, list[Any], list[Piece]]:
    """`text` fed to the hermes parser in the pieces `cuts` make: (content, calls, every piece in order)."""
    stream, pieces = ToolCallStream(), []
    for a, b in itertools.pairwise([0, *cuts, len(text)]):
        pieces += stream.feed(text[a:b])
    pieces += stream.finish()
    calls = [c for p in pieces for c in p.calls]
    return "".join(p.content for p in pieces), calls, pieces


@pytest.mark.parametrize(
    "text",
    [REPLY, "no calls <tool at all> <tool_call", "x <tool_call>{bad}</tool_call> y", CUT_SHORT, *ODD_CALLS],
)
def test_streamed_in_any_pieces_equals_whole(text: str) -> None:
    whole = parse_reply(text)
    rng = random.Random(0)
    splits = [[i] for i in range(len(text) + 1)] + [
        sorted(rng.sample(range(len(text)), 6)) for _ in range(50)
    ]
    for cuts in splits:
        content, calls, pieces = _feed(text, cuts)
        got = (content or None if calls else content, [(c.name, c.arguments) for c in calls])
        assert got == (whole[0], [(c.name, c.arguments) for c in whole[1]]), cuts
        for call in calls:  # every call's deltas: one first, one last, and its arguments in between
            deltas = [d for p in pieces for d in p.deltas if d.call is call]
            assert deltas[0].first and deltas[-1].done and sum(d.first or d.done for d in deltas[1:-1]) == 0
            assert "".join(d.arguments for d in deltas) == call.arguments


def test_arguments_stream_as_they_are_written() -> None:
    _, calls, pieces = _feed(REPLY, list(range(len(REPLY))))  # one character at a time
    # the arguments as the model wrote them
    assert [c.arguments for c in calls] == ['{"city": "Paris"}', '{"city": "Zürich"}']
    # named with its first character, then one delta a character, then closed
    first = [d for p in pieces for d in p.deltas if d.call is calls[0]]
    assert len(first) == len(calls[0].arguments) + 1
    content, cut = parse_reply(CUT_SHORT)  # the reply ended inside the arguments: kept as written
    assert content is None and [(c.name, c.arguments) for c in cut] == [("f", '{"a": [1, "x}')]
    assert [json.loads(c.arguments) for c in parse_reply(ODD_CALLS[0])[1]] == [{"code": 'if (x) { y("}"); }'}]
    assert [json.loads(c.arguments) for c in parse_reply(ODD_CALLS[1])[1]] == [{"a": 1}]
    content, unclosed = parse_reply(ODD_CALLS[2])  # CLOSE ends the call even where its object does not
    assert content == " then text" and [json.loads(c.arguments) for c in unclosed] == [{"a": 1}]


def test_history_arguments_reach_the_template_as_objects() -> None:
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    out = template_messages([{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert call["function"]["arguments"] == '{"a": 1}'  # the request itself is left as sent


def test_config_needs_a_known_parser() -> None:
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ServerConfig(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="not one of: hermes"):
        ServerConfig(enable_auto_tool_choice=True, tool_call_parser="no_such_parser")


@pytest.fixture(scope="module")
def tool_server(tokenizer: Any) -> Iterator[Any]:
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    server, handle = start_fake_server(tokenizer, server_options=options)
    handle.engine.script = tokenizer.encode(REPLY, add_special_tokens=False)
    assert tokenizer.decode(handle.engine.script) == REPLY
    with server:
        yield handle


def _client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1",
        api_key=server.api_key or "x",
        _strict_response_validation=True,
        max_retries=0,
    )


def test_chat_returns_tool_calls(tool_server: Any) -> None:
    messages = [{"role": "user", "content": "Weather in Paris and Zürich?"}]
    done = _client(tool_server).chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], max_tokens=200
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check both."
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Zürich"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.type == "function" for c in calls)
    # the calls and their results go back as history: the template receives them
    history = [*messages, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C"}]  # fmt: skip
    again = _client(tool_server).chat.completions.create(model="tiny", messages=history, tools=[WEATHER])
    assert again.choices[0].finish_reason == "tool_calls"


def test_chat_streams_tool_calls(tool_server: Any) -> None:
    stream = _client(tool_server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], stream=True
    )
    chunks = list(stream)
    content = "".join(ch.delta.content or "" for chunk in chunks for ch in chunk.choices)
    finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
    assert content == "Let me check both." and finish == ["tool_calls"]
    calls, pieces = streamed_tool_calls(chunks)
    assert {i: (name, json.loads(args)) for i, (name, args) in calls.items()} == {
        0: ("get_weather", {"city": "Paris"}),
        1: ("get_weather", {"city": "Zürich"}),
    }
    assert pieces > 4, "the arguments should stream in several deltas, as the tokens come"


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_tokens(tool_server: Any, tokenizer: Any, stream: bool) -> None:
    """max_tokens ends the reply inside the first call's arguments: finish_reason length, and the call with the
    arguments written so far (as OpenAI returns a cut call)."""
    ids = tool_server.engine.script
    cut = next(n for n in range(len(ids)) if '"city": "Pa' in tokenizer.decode(ids[:n]))
    written = tokenizer.decode(ids[:cut])
    args = written[written.index('{"city"') :]
    kw: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                              max_tokens=cut)  # fmt: skip
    if stream:
        chunks = list(_client(tool_server).chat.completions.create(stream=True, **kw))
        calls, _ = streamed_tool_calls(chunks)
        finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
        got = list(calls.values())
    else:
        choice = _client(tool_server).chat.completions.create(**kw).choices[0]
        got = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        finish = [choice.finish_reason]
    assert got == [("get_weather", args)] and finish == ["length"]


@pytest.mark.parametrize("tool_choice", ["none", None])
def test_text_when_tools_are_off(tool_server: Any, fake_server: Any, tool_choice: str | None) -> None:
    kwargs: dict[str, Any] = {"tool_choice": "none"} if tool_choice else {}
    server = tool_server if tool_choice else fake_server  # fake_server runs without the parser flags
    if server is fake_server:
        fake_server.engine.script = tool_server.engine.script
    try:
        done = _client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], **kwargs
        )
    finally:
        fake_server.engine.script = None
    assert done.choices[0].message.content == REPLY and not done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "stop"


LLAMA_CALLS = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "parameters": {}}'
)
LLAMA_CASES = [
    (LLAMA_CALLS, None, [("get_weather", {"city": "Paris"}), ("f", {})]),
    (' {"name": "f", "arguments": {"x": 1}}', None, [("f", {"x": 1})]),
    ('Sure: {"name": "f", "parameters": {}}', 'Sure: {"name": "f", "parameters": {}}', []),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    # JSON that names something is not a call without its arguments: a structured reply stays content (as vLLM)
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ('{"name": "f", "parameters": {}} trailing words', "trailing words", [("f", {})]),  # nothing lost
    ("<|python", "<|python", []),
    ('{"parameters": {"x": 1}, "name": "f"}', None, [("f", {"x": 1})]),  # read whole: the name comes second
    ('{"name": "f", "parameters": {}}; {"parameters": {}, "name": "g"}', None, [("f", {}), ("g", {})]),
    ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), LLAMA_CASES)
def test_llama3_json_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    from treadle_frontend.server.reply import parse_whole

    assert _summary(*parse_whole(text, None, "llama3_json")[1:]) == (content, calls)
    for cut in range(len(text) + 1):
        stream = tool_stream("llama3_json")
        pieces = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.finish()
        joined, got = "".join(p.content for p in pieces), [c for p in pieces for c in p.calls]
        assert _summary(joined or (None if got else joined), got) == (content, calls)


def test_llama3_json_arguments_stream() -> None:
    stream = tool_stream("llama3_json")
    pieces = [p for c in LLAMA_CALLS for p in stream.feed(c)] + stream.finish()
    deltas = [d for p in pieces for d in p.deltas]
    assert [d.call.name for d in deltas if d.first] == ["get_weather", "f"]
    assert len([d for d in deltas if d.index == 0]) == len('{"city": "Paris"}') + 1  # a character at a time
    cut = tool_stream("llama3_json")
    pieces = cut.feed('{"name": "f", "parameters": {"a": [1') + cut.finish()  # cut short: kept as written
    assert [(c.name, c.arguments) for p in pieces for c in p.calls] == [("f", '{"a": [1')]


@pytest.fixture(scope="module")
def llama_server(tokenizer: Any) -> Iterator[Any]:
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "llama3_json"}
    server, handle = start_fake_server(tokenizer, server_options=options)
    text = LLAMA_CALLS.removeprefix("<|python_tag|>")  # a special token: skipped in the reply's text anyway
    handle.engine.script = tokenizer.encode(text, add_special_tokens=False)
    with server:
        yield handle


@pytest.mark.parametrize("stream", [False, True])
def test_chat_llama3_json_tool_calls(llama_server: Any, stream: bool) -> None:
    kw: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER]
    )
    if stream:
        chunks = list(_client(llama_server).chat.completions.create(stream=True, **kw))
        assert not any(ch.delta.content for chunk in chunks for ch in chunk.choices)  # the JSON is never text
        finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
        calls, pieces = streamed_tool_calls(chunks)
        got = [(name, json.loads(args)) for name, args in (calls[i] for i in sorted(calls))]
        assert pieces > 2  # the arguments stream as they are written
    else:
        choice = _client(llama_server).chat.completions.create(**kw).choices[0]
        assert choice.message.content is None
        got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        finish = [choice.finish_reason]
    assert got == [("get_weather", {"city": "Paris"}), ("f", {})] and finish == ["tool_calls"]
