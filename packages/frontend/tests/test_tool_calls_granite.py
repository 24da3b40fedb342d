"""Tool calls in IBM Granite 3.x's format (`--tool-call-parser granite`): the parser alone, fed whole and in every
split into two pieces (and many into three); and the chat and responses routes through the openai SDK with a
tokenizer where `<|tool_call|>` is a special token (a fake engine writes the reply: the tag as its token, or split
over several stream chunks), streamed and not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from frontend_helpers import WEATHER, check_in_any_pieces, openai_client
from tagged_calls import chat, no_marker_leaks, script, serving, split

from treadle_frontend.server.call_granite import TEXT_TAG, TOKEN_TAG
from treadle_frontend.server.reply import tool_stream

CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
LEAD = "Let me check both."
ARRAY = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "CET"}}]'
TWO_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
MALFORMED = f"{LEAD}\n{TOKEN_TAG}[get_weather(city='Paris')]"
CASES = [
    (f"{LEAD}\n{TOKEN_TAG}{ARRAY}", LEAD, TWO_CALLS),
    (f"{TEXT_TAG}{ARRAY}</tool_call>", None, TWO_CALLS),  # Granite 3.1's text tag (a closing tag is dropped)
    # a reply that opens with the array: the tag decoded away (vLLM reads it so)
    (f" {ARRAY}", None, TWO_CALLS),
    (f'{TOKEN_TAG} [ {{"name": "f", "arguments": {{"a": [1, "]"]}}}} ]', None, [("f", {"a": [1, "]"]})]),
    # read whole: the name comes second
    (f'{TOKEN_TAG}[{{"arguments": {{"a": 1}}, "name": "g"}}]', None, [("g", {"a": 1})]),
    (f'{TOKEN_TAG}[{{"name": "f", "parameters": {{}}}}] then words', "then words", [("f", {})]),
    (f"Hi {TOKEN_TAG}{ARRAY}\nafter", "Hi after", TWO_CALLS),  # text around the calls keeps one separator
    (MALFORMED, MALFORMED, []),  # nothing in the array is a call: content, as written
    (f"{TOKEN_TAG} not an array", f"{TOKEN_TAG} not an array", []),
    (f'{TEXT_TAG}["f"}}</tool_call>', f'{TEXT_TAG}["f"}}</tool_call>', []),  # its closing tag too
    ("[link](x) is text", "[link](x) is text", []),
    ("a <|tool_ca", "a <|tool_ca", []),
    ("Text  \n ends  here \n", "Text  \n ends  here \n", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_any_pieces("granite", text, (content, calls), step=37)


def test_arguments_stream_as_written_and_a_cut_call_keeps_them() -> None:
    stream = tool_stream("granite")
    text = f"{TOKEN_TAG}{ARRAY}"
    deltas = [d for p in [p for c in text for p in stream.feed(c)] + stream.finish() for d in p.deltas]
    assert [d.call.name for d in deltas if d.first] == ["get_weather", "get_time"]
    assert len([d for d in deltas if d.index == 0]) >= len('{"city": "Paris"}')  # a character at a time
    cut = tool_stream("granite")
    pieces = cut.feed(f'{TOKEN_TAG}[{{"name": "f", "arguments": {{"a": [1') + cut.finish()
    assert [(c.name, c.arguments, c.complete) for p in pieces for c in p.calls] == [("f", '{"a": [1', False)]


def test_config_lists_the_new_parsers() -> None:
    """`--tool-call-parser` takes its choices from tool_calls.PARSERS, which ServerConfig validates against."""
    from treadle_frontend.server import ServerConfig

    names = ("glm45", "granite", "deepseek_v3", "deepseek_v31", "kimi_k2", "granite-20b-fc", "phi4_mini_json")
    for name in names:
        assert ServerConfig(enable_auto_tool_choice=True, tool_call_parser=name).tool_call_parser == name
    assert ServerConfig(reasoning_parser="glm45").reasoning_parser == "glm45"
    with pytest.raises(ValueError, match=r"deepseek_v31, kimi_k2, granite-20b-fc, phi4_mini_json$"):
        ServerConfig(enable_auto_tool_choice=True, tool_call_parser="no_such_parser")


@pytest.fixture(scope="module")
def granite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from serving(tmp_path_factory, "granite")


@pytest.mark.parametrize(("tag", "stream"), [("token", False), ("split", True), ("text", True)])
def test_two_calls_after_text(granite_server: Any, tag: str, stream: bool) -> None:
    """The tag as its special token (decoded only with special tokens kept), split over several chunks, or as
    Granite 3.1's text tag."""
    parts = {"token": [TOKEN_TAG], "split": split(TOKEN_TAG), "text": split(TEXT_TAG)}[tag]
    granite_server.engine.script = script(granite_server.tokenizer, [LEAD + "\n", *parts, ARRAY])
    reply = chat(granite_server, stream, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (LEAD, TWO_CALLS, "tool_calls")
    if stream:
        assert no_marker_leaks(reply["deltas"], LEAD) and reply["pieces"] > 4


def test_a_malformed_call_stays_content(granite_server: Any) -> None:
    granite_server.engine.script = script(granite_server.tokenizer, [MALFORMED])
    reply = chat(granite_server, True, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (MALFORMED, [], "stop")


def test_responses_route_gives_function_calls(granite_server: Any) -> None:
    granite_server.engine.script = script(granite_server.tokenizer, [LEAD + "\n", TOKEN_TAG, ARRAY])
    tools: list[Any] = [{"type": "function", **t["function"]} for t in (WEATHER, CLOCK)]
    r = openai_client(granite_server.url).responses.create(
        model="tiny", input="Weather?", tools=tools, max_output_tokens=200
    )
    assert [(o.name, o.arguments) for o in r.output if o.type == "function_call"] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", '{"zone": "CET"}'),
    ]
