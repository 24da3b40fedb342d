"""Tool calls in Phi-4-mini's format (`--tool-call-parser phi4_mini_json`): the parser alone, fed whole, in every
split into two pieces (and many into three), a character at a time and in random pieces; and the chat and responses
routes through the openai SDK (a fake engine writes the reply, `functools` over several stream chunks), streamed
and not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from frontend_helpers import WEATHER, check_in_any_pieces, check_in_random_pieces, openai_client
from tagged_calls import chat, script, serving, split

from treadle_frontend.server.call_phi4 import TAG
from treadle_frontend.server.reply import tool_stream

CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
LEAD = "Let me check both."
ARRAY = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "parameters": {"zone": "CET"}}]'
TWO_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
MALFORMED = f"{LEAD}\n{TAG}[get_weather(city='Paris')]"
PROSE = "Python's functools module has partial, and functools [1] is no call."
CASES = [
    (f"{TAG}{ARRAY}", None, TWO_CALLS),
    (f"{LEAD}\n{TAG}{ARRAY}", LEAD, TWO_CALLS),
    (f'{TAG}[ {{"name": "f", "arguments": {{"a": [1, "]"]}}}} ]', None, [("f", {"a": [1, "]"]})]),
    # read whole: the name comes second
    (f'{TAG}[{{"arguments": {{"a": 1}}, "name": "g"}}]', None, [("g", {"a": 1})]),
    (f'{TAG}[{{"name": "f", "parameters": {{}}}}] then words', "then words", [("f", {})]),
    (f"Hi {TAG}{ARRAY}\nafter", "Hi after", TWO_CALLS),  # text around the calls keeps one separator
    (f'{TAG}[{{"name": "f", "arguments": {{}}}}]\n{TAG}[{{"name": "g", "arguments": {{}}}}]', None,
     [("f", {}), ("g", {})]),  # a second array: further calls
    (f'{TAG}[{{"name": "f", "arguments": {{}}}}, 2]', "2]", [("f", {})]),  # streaming stops at the item; nothing lost
    (MALFORMED, MALFORMED, []),  # nothing in the array is a call: content, as written
    (PROSE, PROSE, []),  # the word alone, or with a space before `[`, is text
    (f"{TAG}[1, 2]", f"{TAG}[1, 2]", []),
    (f'{TAG}[{{"name": "f"}}]', f'{TAG}[{{"name": "f"}}]', []),  # no arguments: no call
    (f"a {TAG}", f"a {TAG}", []),
    ("a functo", "a functo", []),
    ("[link](x) is text", "[link](x) is text", []),
]  # fmt: skip


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_any_pieces("phi4_mini_json", text, (content, calls), step=23)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_random_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_random_pieces("phi4_mini_json", text, (content, calls))


def test_arguments_stream_as_written_and_a_cut_call_keeps_them() -> None:
    stream = tool_stream("phi4_mini_json")
    text = f"{TAG}{ARRAY}"
    deltas = [d for p in [p for c in text for p in stream.feed(c)] + stream.finish() for d in p.deltas]
    assert [d.call.name for d in deltas if d.first] == ["get_weather", "get_time"]
    assert len([d for d in deltas if d.index == 0]) == len('{"city": "Paris"}') + 1  # a character at a time
    cut = tool_stream("phi4_mini_json")
    pieces = cut.feed(f'{TAG}[{{"name": "f", "arguments": {{"a": [1') + cut.finish()
    assert [(c.name, c.arguments, c.complete) for p in pieces for c in p.calls] == [("f", '{"a": [1', False)]


@pytest.fixture(scope="module")
def phi4_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from serving(tmp_path_factory, "phi4_mini_json")


@pytest.mark.parametrize("stream", [False, True])
def test_two_calls_after_text(phi4_server: Any, stream: bool) -> None:
    phi4_server.engine.script = script(phi4_server.tokenizer, [LEAD + "\n", *split(TAG), ARRAY])
    reply = chat(phi4_server, stream, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (LEAD, TWO_CALLS, "tool_calls")
    if stream:  # the content streamed is the text before the tag, no piece of the tag in it
        assert "".join(reply["deltas"]) == LEAD and not any("func" in d for d in reply["deltas"])
        assert reply["pieces"] > 4


@pytest.mark.parametrize(("text", "stream"), [(MALFORMED, True), (MALFORMED, False), (PROSE, True)])
def test_what_is_no_call_stays_content(phi4_server: Any, text: str, stream: bool) -> None:
    phi4_server.engine.script = script(phi4_server.tokenizer, [text])
    reply = chat(phi4_server, stream, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (text, [], "stop")


def test_responses_route_gives_function_calls(phi4_server: Any) -> None:
    phi4_server.engine.script = script(phi4_server.tokenizer, [LEAD + "\n", TAG, ARRAY])
    tools: list[Any] = [{"type": "function", **t["function"]} for t in (WEATHER, CLOCK)]
    r = openai_client(phi4_server.url).responses.create(
        model="tiny", input="Weather?", tools=tools, max_output_tokens=200
    )
    assert [(o.name, o.arguments) for o in r.output if o.type == "function_call"] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", '{"zone": "CET"}'),
    ]
