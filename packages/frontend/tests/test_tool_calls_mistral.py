"""Tool calls in Mistral's format (`--tool-call-parser mistral`): the parser alone on both layouts, fed whole and
in every split into two pieces (and many into three), and the chat route through the openai SDK with a tokenizer
where `[TOOL_CALLS]` is a special token (a fake engine writes the reply), streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from frontend_helpers import WEATHER, check_in_any_pieces, start_fake_server, streamed_tool_calls
from tiny_assets import build_tokenizer_dir

from treadle_frontend.server.reply import parse_whole, tool_stream

ARRAY = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]'
)
NAMED = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]f[ARGS]{}'
BOTH_CALLS = [("get_weather", {"city": "Paris"}), ("f", {})]
CASES = [
    (ARRAY, None, BOTH_CALLS),
    (NAMED, None, BOTH_CALLS),
    (' [TOOL_CALLS] [ {"name": "f", "arguments": {"a": [1, "}"]}} ]', None, [("f", {"a": [1, "}"]})]),
    (
        'Let me check.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}',
        "Let me check.",  # the whitespace before the calls is not content
        [("get_weather", {"city": "Zürich"})],
    ),
    ("Text  \n ends  here \n", "Text  \n ends  here \n", []),  # whitespace in a reply without calls stays
    ("Just text, no calls.", "Just text, no calls.", []),
    ("a [TOOL_C", "a [TOOL_C", []),  # what might have been the tag, released at the end
    ("[TOOL_CALLS] not a call", "[TOOL_CALLS] not a call", []),  # nothing lost
    ("[TOOL_CALLS]f[ARGS]oops", "[TOOL_CALLS]f[ARGS]oops", []),
    ("[TOOL_CALLS] [1, 2]", "[TOOL_CALLS] [1, 2]", []),
    ('[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}] then words', "then words", [("f", {"a": 1})]),
    ("[TOOL_CALLS]f[ARGS]{} trailing", "trailing", [("f", {})]),
    ('Hi [TOOL_CALLS] [{"name": "f", "arguments": {}}] after', "Hi after", [("f", {})]),  # not glued together
    ("Hi [TOOL_CALLS]f[ARGS]{}\nafter", "Hi after", [("f", {})]),
    ('[TOOL_CALLS][{"arguments": {}, "name": "g"}]', None, [("g", {})]),  # read whole: the name comes second
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_in_any_pieces(text: str, content: str | None, calls: list[Any]) -> None:
    _, whole_content, whole_calls = parse_whole(text, None, "mistral")  # the non-streamed routes' reading
    assert (whole_content, [(c.name, json.loads(c.arguments)) for c in whole_calls]) == (content, calls)
    check_in_any_pieces("mistral", text, (content, calls), step=5)


@pytest.mark.parametrize("text", [ARRAY, NAMED])
def test_arguments_stream_and_ids_suit_mistral_templates(text: str) -> None:
    stream = tool_stream("mistral")
    pieces = [p for c in text for p in stream.feed(c)] + stream.finish()
    deltas = [d for p in pieces for d in p.deltas]
    assert [d.call.name for d in deltas if d.first] == ["get_weather", "f"]
    assert len([d for d in deltas if d.index == 0]) >= len('{"city": "Paris"}')  # a character at a time
    ids = {d.call.id for d in deltas}
    assert len(ids) == 2 and all(len(i) == 9 and i.isalnum() for i in ids)
    cut = tool_stream("mistral")
    pieces = cut.feed('[TOOL_CALLS]f[ARGS]{"a": [1') + cut.finish()  # cut short: kept as written
    assert [(c.name, c.arguments, c.complete) for p in pieces for c in p.calls] == [("f", '{"a": [1', False)]


@pytest.fixture(scope="module")
def mistral_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from treadle_frontend.tokenizer import load_tokenizer

    path: Path = tmp_path_factory.mktemp("mistral_tok")
    return load_tokenizer(build_tokenizer_dir(path, extra_specials=("[TOOL_CALLS]", "[ARGS]")))


@pytest.fixture(scope="module")
def mistral_server(mistral_tokenizer: Any) -> Iterator[Any]:
    options = {"enable_auto_tool_choice": True, "tool_call_parser": "mistral"}
    server, handle = start_fake_server(mistral_tokenizer, server_options=options)
    handle.engine.script = mistral_tokenizer.encode(NAMED, add_special_tokens=False)
    # the tags are special tokens: a reply decoded the default way would lose them
    assert "[TOOL_CALLS]" not in mistral_tokenizer.decode(handle.engine.script, skip_special_tokens=True)
    with server:
        yield handle


def _client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="x", _strict_response_validation=True, max_retries=0
    )


@pytest.mark.parametrize("stream", [False, True])
def test_chat_mistral_tool_calls(mistral_server: Any, stream: bool) -> None:
    kw: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], max_tokens=200
    )
    if stream:
        chunks = list(_client(mistral_server).chat.completions.create(stream=True, **kw))
        assert not any(
            ch.delta.content for chunk in chunks for ch in chunk.choices
        )  # the calls are never text
        finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
        calls, pieces = streamed_tool_calls(chunks)
        got = [(name, json.loads(args)) for name, args in (calls[i] for i in sorted(calls))]
        assert pieces > 2  # the arguments stream as they are written
    else:
        choice = _client(mistral_server).chat.completions.create(**kw).choices[0]
        assert choice.message.content is None
        calls_out = choice.message.tool_calls or []
        got = [(c.function.name, json.loads(c.function.arguments)) for c in calls_out]
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls_out)
        finish = [choice.finish_reason]
    assert got == BOTH_CALLS and finish == ["tool_calls"]


def test_without_tools_special_tokens_stay_skipped(mistral_server: Any) -> None:
    kw: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], max_tokens=200
    )
    choice = _client(mistral_server).chat.completions.create(**kw).choices[0]
    assert not choice.message.tool_calls and "[TOOL_CALLS]" not in (choice.message.content or "")


def test_messages_and_responses_routes_keep_the_tag(mistral_server: Any) -> None:
    """/v1/messages and /v1/responses decode these replies with special tokens too: the calls come back."""
    import anthropic

    tool = {
        "name": "get_weather",
        "description": "Weather",
        "input_schema": WEATHER["function"]["parameters"],
    }
    claude = anthropic.Anthropic(base_url=mistral_server.url, api_key="x", max_retries=0)
    m = claude.messages.create(
        model="tiny", max_tokens=200, messages=[{"role": "user", "content": "Weather?"}], tools=[tool]
    )
    assert m.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in m.content if b.type == "tool_use"] == BOTH_CALLS
    r = _client(mistral_server).responses.create(
        model="tiny",
        input="Weather?",
        tools=[{"type": "function", **WEATHER["function"]}],
        max_output_tokens=200,
    )
    assert [(o.name, json.loads(o.arguments)) for o in r.output if o.type == "function_call"] == BOTH_CALLS
