"""Tool calls in GLM-4.5's format (`--tool-call-parser glm45`) and its reasoning (`--reasoning-parser glm45`, read
as qwen3's): the parser alone, fed whole and in every split into two pieces (and many into three), values typed by
the tool's schema as vLLM types them; and the chat and messages routes through the openai / anthropic SDKs (a fake
engine writes the reply, its tags split over several stream chunks), streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from frontend_helpers import check_in_any_pieces
from tagged_calls import chat, no_marker_leaks, script, serving, split

from treadle_frontend.server.call_glm45 import CLOSE, OPEN
from treadle_frontend.server.call_xml import tool_schemas
from treadle_frontend.server.reply import ReasoningStream, tool_stream

WEATHER = {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"}}
CLOCK = {"zone": {"type": "string"}, "exact": {"type": "boolean"}, "tags": {"type": "array"}}
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": p}}}
    for n, p in (("get_weather", WEATHER), ("get_time", CLOCK))
]
LEAD = "Let me check both."
OPTS = {"a": [1, "</"]}


def _call(name: str, **args: str) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in args.items())
    return f"{OPEN}{name}\n{pairs}{CLOSE}"


TWO = f"{LEAD}\n{_call('get_weather', city='1984', days='2')}\n{_call('get_time', zone='CET', exact='true')}"
TWO_CALLS = [("get_weather", {"city": "1984", "days": 2}), ("get_time", {"zone": "CET", "exact": True})]
MALFORMED = f'{LEAD}\n{OPEN}{{"name": "get_weather", "arguments": {{}}}}{CLOSE}'
CASES = [
    (TWO, LEAD, TWO_CALLS),
    (f"{OPEN}f\n{CLOSE}", None, [("f", {})]),  # no arguments
    (f"{OPEN}f{CLOSE}", None, [("f", {})]),
    # GLM-4.7's compact layout
    ("<tool_call>f<arg_key>a</arg_key><arg_value>[1]</arg_value></tool_call>", None, [("f", {"a": [1]})]),
    # by the schema, as vLLM's glm45 reads them: "string" keeps the text exactly; any other type, or a parameter the
    # schema does not name, reads as JSON, else as a Python literal, else stays a string (NaN is no JSON)
    (
        _call("get_weather", city=" 12 ", days="three", opts=json.dumps(OPTS), extra="2.5", note="Paris")
        + " and then text",
        "and then text",
        [("get_weather", {"city": " 12 ", "days": "three", "opts": OPTS, "extra": 2.5, "note": "Paris"})],
    ),
    (
        _call("get_time", exact="True", tags="['a', 'b']", zone="null", n="NaN", s="{1, 2}"),
        None,
        [("get_time", {"exact": True, "tags": ["a", "b"], "zone": "null", "n": "NaN", "s": "{1, 2}"})],
    ),
    (MALFORMED, MALFORMED, []),  # not a function name: content, as written
    (f"{OPEN}\n{OPEN}f\n{CLOSE}", f"{OPEN}", [("f", {})]),  # nothing lost
    ("plain text  \n", "plain text  \n", []),
    ("a <tool_ca", "a <tool_ca", []),
    (f"Hi\n{_call('f')}\nDone", "Hi\nDone", [("f", {})]),  # text around a call keeps one separator
    (f"{OPEN}f\n<arg_key>a</arg_key>\nstray<arg_value>1</arg_value>{CLOSE}", None, [("f", {})]),  # a lone key
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    check_in_any_pieces("glm45", text, (content, calls), step=31, schemas=tool_schemas(TOOLS))


def test_arguments_stream_strings_as_written_and_a_cut_call_keeps_them() -> None:
    """A string value streams a character at a time (escaped), other values once whole."""
    stream = tool_stream("glm45", tool_schemas(TOOLS))
    text = _call("get_weather", city='Pa"ris', days="3")
    deltas = [d for p in [p for ch in text for p in stream.feed(ch)] + stream.finish() for d in p.deltas]
    escaped = ['{"city": "', *"Pa", '\\"', *"ris", '"']
    assert [d.arguments for d in deltas] == ["", *escaped, ', "days": 3', "}", ""]
    assert deltas[0].first and deltas[0].call.name == "get_weather" and deltas[-1].done
    cut = tool_stream("glm45", tool_schemas(TOOLS))
    pieces = cut.feed(text[: text.index("3</arg")] + "3</arg") + cut.finish()  # cut inside the days value
    assert [(c.arguments, c.complete) for p in pieces for c in p.calls] == [
        ('{"city": "Pa\\"ris", "days": 3', False)
    ]
    cut = tool_stream("glm45", tool_schemas(TOOLS))
    pieces = cut.feed(text[: text.index("ris")] + "ri</arg_val") + cut.finish()  # cut inside the city value
    assert [(c.arguments, c.complete) for p in pieces for c in p.calls] == [('{"city": "Pa\\"ri"', False)]


def test_reasoning_alias_reads_as_qwen3() -> None:
    for text in ("<think>\nWeighing it.\n</think>\n\nAnswer", "No block, all content", "  <think>cut short"):
        glm, qwen = ReasoningStream("glm45"), ReasoningStream("qwen3")
        assert glm.split(text, final=True) == qwen.split(text, final=True)
    assert ReasoningStream("glm45").split("<think>Hmm</think>Yes", final=True) == ("Hmm", "Yes")


def test_structured_outputs_wait_for_the_block_as_qwen3s() -> None:
    from types import SimpleNamespace

    from treadle_frontend.server.structured import after_reasoning
    from treadle_model_runner import StructuredOutputsParams

    vocab = SimpleNamespace(get_vocab=lambda: {"<think>": 7, "</think>": 8})
    got = after_reasoning(StructuredOutputsParams(json_object=True), "glm45", vocab)
    assert (got.reasoning, got.think_start_id, got.think_end_id) == ("qwen3", 7, 8)


@pytest.fixture(scope="module")
def glm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from serving(tmp_path_factory, "glm45", reasoning_parser="glm45")


def _script(server: Any, parts: list[str]) -> None:
    server.engine.script = script(server.tokenizer, parts)


@pytest.mark.parametrize("stream", [False, True])
def test_two_calls_after_text_typed_by_the_schema(glm_server: Any, stream: bool) -> None:
    parts = [TWO[: TWO.index(OPEN)], *split(OPEN), TWO[TWO.index(OPEN) + len(OPEN) :]]
    _script(glm_server, parts)
    reply = chat(glm_server, stream, TOOLS)
    assert (reply["content"], reply["calls"], reply["finish"]) == (LEAD, TWO_CALLS, "tool_calls")
    if stream:  # the tags never reach the content, though they come in several chunks
        assert no_marker_leaks(reply["deltas"], LEAD) and reply["pieces"] >= 4


def test_a_malformed_call_stays_content(glm_server: Any) -> None:
    _script(glm_server, [MALFORMED])
    reply = chat(glm_server, True, TOOLS)
    assert (reply["content"], reply["calls"], reply["finish"]) == (MALFORMED, [], "stop")


def test_reasoning_then_calls(glm_server: Any) -> None:
    _script(glm_server, ["<think>Weighing it.</think>\n", TWO])
    reply = chat(glm_server, True, TOOLS)
    assert (reply["reasoning"], reply["content"], reply["calls"]) == ("Weighing it.", LEAD, TWO_CALLS)


def test_messages_route_gives_typed_tool_use_blocks(glm_server: Any) -> None:
    _script(glm_server, [TWO])
    claude = anthropic.Anthropic(base_url=glm_server.url, api_key="x", max_retries=0)
    tools: list[Any] = [
        {"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS
    ]
    m = claude.messages.create(
        model="tiny", max_tokens=200, messages=[{"role": "user", "content": "Weather?"}], tools=tools
    )
    assert m.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in m.content if b.type == "tool_use"] == TWO_CALLS
    assert [b.text for b in m.content if b.type == "text"] == [LEAD]
