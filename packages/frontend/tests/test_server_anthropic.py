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
