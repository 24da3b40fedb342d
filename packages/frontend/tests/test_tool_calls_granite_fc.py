"""Tool calls in granite-20b-functioncalling's format (`--tool-call-parser granite-20b-fc`): the parser alone, fed
whole, in every split into two pieces (and many into three), a character at a time and in random pieces; and the
chat and responses routes through the openai SDK (a fake engine writes the reply, the tag in several stream
chunks), streamed and not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from frontend_helpers import WEATHER, check_in_any_pieces, check_in_random_pieces, openai_client
from tagged_calls import chat, script, serving, split

from treadle_frontend.server.call_granite_fc import TAG
from treadle_frontend.server.reply import tool_stream

CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
LEAD = "Let me check both."
FIRST = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
SECOND = '{"name": "get_time", "arguments": {"zone": "CET"}}'
TWO_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
MALFORMED = f"{LEAD}\n{TAG} get_weather(city='Paris')"
NO_ARGUMENTS = f'{TAG} {{"name": "get_time"}}'
CASES = [
    (f"{LEAD}\n{TAG} {FIRST}\n{TAG} {SECOND}", LEAD, TWO_CALLS),
    (f"{TAG}{FIRST}{TAG}{SECOND}", None, TWO_CALLS),  # tags back to back, no space
    (f'{TAG} {{"name": "f", "parameters": {{"a": "}}{{", "b": [1]}}}}', None, [("f", {"a": "}{", "b": [1]})]),
    # read whole: the name comes second; string-valued arguments
    (f'{TAG} {{"arguments": {{"a": 1}}, "name": "g"}}', None, [("g", {"a": 1})]),
    (f'{TAG} {{"name": "h", "arguments": "{{\\"a\\": 2}}"}}', None, [("h", {"a": 2})]),
    (f"Hi {TAG} {FIRST}\nafter", "Hi after", [TWO_CALLS[0]]),  # text around the call keeps one separator
    (MALFORMED, MALFORMED, []),  # no object after the tag: content, as written
    (f"{TAG} {{not json}} then", f"{TAG} {{not json}} then", []),
    (f"{TAG} {FIRST}\n{NO_ARGUMENTS}", NO_ARGUMENTS, [TWO_CALLS[0]]),  # a call, then an object that is none
    (f"{TAG}{TAG} {SECOND}", TAG, [TWO_CALLS[1]]),  # a tag with no object is text
    (f'{TAG} {{"name": "f", "arguments": {{}}', None, [("f", {})]),  # cut before the object's `}`
    (f'{TAG} {{"arguments": {{}}', f'{TAG} {{"arguments": {{}}', []),  # cut, never committed: content
    (f"a {TAG}", f"a {TAG}", []),
    ("a <function_ca", "a <function_ca", []),
    ("Text  \n ends  here \n", "Text  \n ends  here \n", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_any_pieces("granite-20b-fc", text, (content, calls), step=23)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_random_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_random_pieces("granite-20b-fc", text, (content, calls))


def test_arguments_stream_as_written_and_a_cut_call_keeps_them() -> None:
    stream = tool_stream("granite-20b-fc")
    text = f"{TAG} {FIRST}\n{TAG} {SECOND}"
    deltas = [d for p in [p for c in text for p in stream.feed(c)] + stream.finish() for d in p.deltas]
    assert [d.call.name for d in deltas if d.first] == ["get_weather", "get_time"]
    assert len([d for d in deltas if d.index == 0]) == len('{"city": "Paris"}') + 1  # a character at a time
    assert [d.call.complete for d in deltas if d.done] == [True, True]
    cut = tool_stream("granite-20b-fc")
    pieces = cut.feed(f'{TAG} {{"name": "f", "arguments": {{"a": [1') + cut.finish()
    assert [(c.name, c.arguments, c.complete) for p in pieces for c in p.calls] == [("f", '{"a": [1', False)]


@pytest.fixture(scope="module")
def fc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from serving(tmp_path_factory, "granite-20b-fc")


def two_calls() -> list[str]:
    """The reply's parts: each tag in two (so it reaches the parser over several chunks)."""
    return [LEAD + "\n", *split(TAG), " " + FIRST + "\n", *split(TAG), " " + SECOND]


@pytest.mark.parametrize("stream", [False, True])
def test_two_calls_after_text(fc_server: Any, stream: bool) -> None:
    fc_server.engine.script = script(fc_server.tokenizer, two_calls())
    reply = chat(fc_server, stream, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (LEAD, TWO_CALLS, "tool_calls")
    if stream:  # the content streamed is the text before the first tag, no piece of a tag in it
        assert "".join(reply["deltas"]) == LEAD and not any("<" in d for d in reply["deltas"])
        assert reply["pieces"] > 4


@pytest.mark.parametrize(
    ("text", "stream"), [(MALFORMED, False), (MALFORMED, True), (f"{LEAD}\n{NO_ARGUMENTS}", True)]
)
def test_what_is_no_call_stays_content(fc_server: Any, text: str, stream: bool) -> None:
    """No object after the tag, or an object that is no call (no arguments)."""
    fc_server.engine.script = script(fc_server.tokenizer, [text])
    reply = chat(fc_server, stream, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (text, [], "stop")


def test_responses_route_gives_function_calls(fc_server: Any) -> None:
    fc_server.engine.script = script(fc_server.tokenizer, two_calls())
    tools: list[Any] = [{"type": "function", **t["function"]} for t in (WEATHER, CLOCK)]
    r = openai_client(fc_server.url).responses.create(
        model="tiny", input="Weather?", tools=tools, max_output_tokens=200
    )
    assert [(o.name, o.arguments) for o in r.output if o.type == "function_call"] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", '{"zone": "CET"}'),
    ]
