"""The Anthropic routes through the real anthropic SDK (strict response validation, fake engine)."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest


@pytest.fixture(scope="module")
def client(fake_server: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=fake_server.url, api_key="sekret", _strict_response_validation=True, max_retries=0
    )


def test_message_basic(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model="tiny",
        max_tokens=6,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"temperature": 0},
    )
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 6 and m.usage.input_tokens > 0
    assert m.content[0].type == "text"


def test_system_and_count_tokens(client: anthropic.Anthropic, fake_server: Any) -> None:
    msgs: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    plain = client.messages.count_tokens(model="tiny", messages=msgs)
    with_sys = client.messages.count_tokens(model="tiny", messages=msgs, system="Be brief.")
    assert with_sys.input_tokens > plain.input_tokens > 0
    m = client.messages.create(model="tiny", max_tokens=3, messages=msgs, system="Be brief.")
    assert m.usage.input_tokens == with_sys.input_tokens


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = dict(
        model="tiny",
        max_tokens=14,
        messages=[{"role": "user", "content": "go"}],
        extra_body={"temperature": 0},
    )
    text = client.messages.create(**kw).content[0].text
    stop = text[2:5]
    m = client.messages.create(stop_sequences=[stop], **kw)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[: text.find(stop)]


def test_stream_event_order(client: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = dict(
        model="tiny",
        max_tokens=8,
        messages=[{"role": "user", "content": "go"}],
        extra_body={"temperature": 0},
    )
    text = client.messages.create(**kw).content[0].text
    events = list(client.messages.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) <= {"content_block_delta"}
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == text
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 8
    with client.messages.stream(**kw) as stream:
        assert stream.get_final_text() == text


def test_raw_stream_has_named_events(fake_server: Any) -> None:
    body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}], "stream": True}
    r = httpx.post(fake_server.url + "/v1/messages", json=body, headers={"x-api-key": "sekret"})
    blocks = [b for b in r.text.split("\n\n") if b.strip()]
    assert blocks and all(b.startswith("event: ") and "\ndata: " in b for b in blocks)
    assert "[DONE]" not in r.text


BAD_MESSAGES = [
    ("tools", {"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools: tool use needs the server started with --enable-auto-tool-choice"),
    ("tool_choice_any", {"tool_choice": {"type": "any"}}, "tool_choice: forcing a tool call needs tools"),
    ("thinking", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking: extended thinking"),
    ("temperature_5", {"temperature": 5}, "temperature: must be in [0, 1]"),
    ("max_tokens_bool", {"max_tokens": True}, "max_tokens"),
    ("empty_content", {"messages": [{"role": "user", "content": ""}]}, "messages.0.content: a user message needs"),
    ("no_blocks", {"messages": [{"role": "user", "content": []}]}, "messages.0.content: a user message needs"),
    ("block_without_text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content[0].text: a text block needs its text"),
]  # fmt: skip


def test_tool_choice_none_needs_no_tool_flags(client: anthropic.Anthropic) -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    m = client.messages.create(model="tiny", max_tokens=3, tools=tools, tool_choice={"type": "none"},
                               messages=[{"role": "user", "content": "hi"}])  # type: ignore[arg-type]  # fmt: skip
    assert [b.type for b in m.content] == ["text"] and m.stop_reason == "max_tokens"


@pytest.mark.parametrize(("name", "change", "message"), BAD_MESSAGES, ids=[c[0] for c in BAD_MESSAGES])
def test_unsupported_or_invalid_requests_are_named(
    fake_server: Any, name: str, change: Any, message: str
) -> None:
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **change}
    r = httpx.post(fake_server.url + "/v1/messages", json=body, headers={"x-api-key": "sekret"})
    assert r.status_code == 400, (name, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error


def test_turns_and_blocks_are_combined_one_per_line(client: anthropic.Anthropic) -> None:
    """Consecutive turns of one role become one turn and text blocks one text, each part on its own line (vLLM
    joins text parts with newlines); an empty final assistant turn (a prefill) is allowed."""

    def count(messages: Any) -> int:
        return client.messages.count_tokens(model="tiny", messages=messages).input_tokens

    joined = count([{"role": "user", "content": "alpha\nbeta"}])
    assert count([{"role": "user", "content": "alpha"}, {"role": "user", "content": "beta"}]) == joined
    blocks = [{"type": "text", "text": "alpha"}, {"type": "text", "text": "beta"}]
    assert count([{"role": "user", "content": blocks}]) == joined
    assert count([{"role": "user", "content": "alphabeta"}]) != joined
    m = client.messages.create(
        model="tiny",
        max_tokens=2,
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
    )
    assert m.stop_reason == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_usage_separates_prefix_cache_reads(
    client: anthropic.Anthropic, fake_server: Any, stream: bool
) -> None:
    """Anthropic's usage: input_tokens + cache_read_input_tokens = the prompt (input_tokens excludes cache reads),
    in the response and in a stream's message_start and message_delta."""
    msgs: list[Any] = [{"role": "user", "content": "a prompt long enough to share a prefix"}]
    prompt = client.messages.count_tokens(model="tiny", messages=msgs).input_tokens
    fake_server.engine.cached_prefix_tokens = 4
    try:
        if stream:
            with client.messages.stream(model="tiny", max_tokens=3, messages=msgs) as s:
                events = list(s)
                m = s.get_final_message()
            start = next(e for e in events if e.type == "message_start").message.usage
            assert (start.input_tokens, start.cache_read_input_tokens) == (prompt - 4, 4)
        else:
            m = client.messages.create(model="tiny", max_tokens=3, messages=msgs)
    finally:
        fake_server.engine.cached_prefix_tokens = 0
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.output_tokens) == (
        prompt - 4,
        4,
        3,
    )
    assert m.usage.cache_creation_input_tokens == 0
