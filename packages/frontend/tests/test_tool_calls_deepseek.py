"""Tool calls in DeepSeek's formats (`--tool-call-parser deepseek_v3`, V3 and R1-0528; `deepseek_v31`, V3.1): the
parsers alone, fed whole and in every split into two pieces (and many into three); and the chat and messages routes
through the openai / anthropic SDKs with a tokenizer where DeepSeek's markers are special tokens (a fake engine
writes the reply: each marker as its token, or the first one split over several stream chunks), streamed and not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from frontend_helpers import WEATHER, check_in_any_pieces
from tagged_calls import chat, no_marker_leaks, script, serving, split

from treadle_frontend.server.call_deepseek import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from treadle_frontend.server.reply import tool_stream

CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
LEAD = "Let me check both."
TWO_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]


def v3_call(name: str, args: str) -> list[str]:
    return [CALL_BEGIN, f"function{SEP}{name}\n```json\n{args}\n```", CALL_END]


def v31_call(name: str, args: str) -> list[str]:
    return [CALL_BEGIN, f"{name}{SEP}{args}", CALL_END]


LAYOUTS = {"deepseek_v3": v3_call, "deepseek_v31": v31_call}


def two_calls(parser: str, begin: list[str]) -> list[str]:
    """The reply's parts: text, the section's opening marker as `begin`, two calls, the section's end."""
    call = LAYOUTS[parser]
    return [f"{LEAD}\n", *begin, *call("get_weather", '{"city": "Paris"}'), "\n",
            *call("get_time", '{"zone": "CET"}'), CALLS_END]  # fmt: skip


def malformed(parser: str) -> str:
    """A section whose only call has no JSON object for arguments: content, as written."""
    return "".join([f"{LEAD}\n", CALLS_BEGIN, *LAYOUTS[parser]("get_weather", "city=Paris"), CALLS_END])


CASES = [
    ("".join(two_calls("deepseek_v3", [CALLS_BEGIN])), LEAD, TWO_CALLS),
    ("".join(two_calls("deepseek_v31", [CALLS_BEGIN])), LEAD, TWO_CALLS),
    (malformed("deepseek_v3"), malformed("deepseek_v3"), []),
    (malformed("deepseek_v31"), malformed("deepseek_v31"), []),
    # V3's fence may be left out; arguments may span lines, their strings hold braces
    (
        "".join([CALLS_BEGIN, CALL_BEGIN, f'function{SEP}f\n{{\n "a": "}}"\n}}', CALL_END, CALLS_END]),
        None,
        [("f", {"a": "}"})],
    ),
    # a malformed call after a good one: the good one stays a call, the rest is content as written
    (
        "".join([CALLS_BEGIN, *v3_call("f", "{}"), CALL_BEGIN, "oops", CALL_END, CALLS_END, " done"]),
        f"{CALL_BEGIN}oops{CALL_END}{CALLS_END} done",
        [("f", {})],
    ),
    ("".join([CALLS_BEGIN, *v3_call("f", "{}"), CALLS_END, "\nAfter."]), "After.", [("f", {})]),
    (f"{CALLS_BEGIN}{CALLS_END}", f"{CALLS_BEGIN}{CALLS_END}", []),  # an empty section: nothing lost
    ("Just text  \n", "Just text  \n", []),
    (f"a {CALLS_BEGIN[:5]}", f"a {CALLS_BEGIN[:5]}", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    parser = "deepseek_v31" if f"get_weather{SEP}" in text else "deepseek_v3"
    check_in_any_pieces(parser, text, (content, calls), step=41)


@pytest.mark.parametrize("parser", ["deepseek_v3", "deepseek_v31"])
def test_arguments_stream_as_written_and_a_cut_call_keeps_them(parser: str) -> None:
    stream = tool_stream(parser)
    text = "".join(two_calls(parser, [CALLS_BEGIN]))
    deltas = [d for p in [p for c in text for p in stream.feed(c)] + stream.finish() for d in p.deltas]
    assert [d.call.name for d in deltas if d.first] == ["get_weather", "get_time"]
    assert "".join(d.arguments for d in deltas if d.index == 0) == '{"city": "Paris"}'
    assert len([d for d in deltas if d.index == 0]) >= len('{"city": "Paris"}')  # a character at a time
    begin, head = LAYOUTS[parser]("f", '{"a": [1')[:2]
    cut = tool_stream(parser)
    pieces = cut.feed(CALLS_BEGIN + begin + head.removesuffix("\n```")) + cut.finish()  # cut in the arguments
    assert [(c.name, c.arguments, c.complete) for p in pieces for c in p.calls] == [("f", '{"a": [1', False)]
    unbalanced = tool_stream(parser)  # the call's end marker ends them, and the next call is read
    text = "".join([CALLS_BEGIN, *LAYOUTS[parser]("f", '{"a": [1}'), *LAYOUTS[parser]("g", "{}"), CALLS_END])
    pieces = unbalanced.feed(text) + unbalanced.finish()
    calls = [(c.name, c.arguments.removesuffix("\n```"), c.complete) for p in pieces for c in p.calls]
    assert calls == [("f", '{"a": [1}', False), ("g", "{}", True)]


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v31"])
def ds_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from serving(tmp_path_factory, request.param)


@pytest.mark.parametrize(("split_marker", "stream"), [(False, False), (True, True)])
def test_two_calls_after_text(ds_server: Any, split_marker: bool, stream: bool) -> None:
    """Each marker as its special token (decoded only with special tokens kept), or the first one split."""
    begin = split(CALLS_BEGIN) if split_marker else [CALLS_BEGIN]
    ds_server.engine.script = script(ds_server.tokenizer, two_calls(ds_server.parser, begin))
    reply = chat(ds_server, stream, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (LEAD, TWO_CALLS, "tool_calls")
    if stream:
        assert no_marker_leaks(reply["deltas"], LEAD) and reply["pieces"] > 4


def test_a_malformed_call_stays_content(ds_server: Any) -> None:
    text = malformed(ds_server.parser)
    ds_server.engine.script = script(ds_server.tokenizer, [text])
    reply = chat(ds_server, True, [WEATHER, CLOCK])
    assert (reply["content"], reply["calls"], reply["finish"]) == (text, [], "stop")


def test_messages_route_gives_tool_use_blocks(ds_server: Any) -> None:
    ds_server.engine.script = script(ds_server.tokenizer, two_calls(ds_server.parser, [CALLS_BEGIN]))
    claude = anthropic.Anthropic(base_url=ds_server.url, api_key="x", max_retries=0)
    tools: list[Any] = [
        {"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in (WEATHER, CLOCK)
    ]
    m = claude.messages.create(
        model="tiny", max_tokens=200, messages=[{"role": "user", "content": "Weather?"}], tools=tools
    )
    assert m.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in m.content if b.type == "tool_use"] == TWO_CALLS
