"""The engine's max_logprobs on the OpenAI routes, through the real openai SDK (fake engine): a request over it is a
400 in vLLM's words naming the request's field; chat's top_logprobs -1 returns the whole vocabulary where the
engine allows it (max_logprobs -1), and completions' logprobs takes no -1, as in vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from frontend_helpers import openai_client, start_fake_server

CHAT: list[Any] = [{"role": "user", "content": "hi"}]


def _bad_request(call: Any) -> tuple[str, str | None]:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = info.value.response.json()["error"]
    return error["message"], error["param"]


@pytest.fixture(scope="module")
def unlimited(tokenizer: Any) -> Iterator[Any]:
    """A server whose engine reports max_logprobs -1 (no limit) in its READY handshake."""
    server, handle = start_fake_server(tokenizer)
    processor = handle.llm.input_processor
    processor.model = dataclasses.replace(processor.model, max_logprobs=-1)
    with server:
        yield handle


def test_over_max_logprobs_is_a_400_naming_the_field(fake_server: Any, tokenizer: Any) -> None:
    client = openai_client(fake_server.url, "sekret")
    vocab = len(tokenizer)
    too_many = "Requested {} logprobs of {}, which is greater than max allowed: 20"
    cases = [
        (
            lambda: client.chat.completions.create(
                model="tiny", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=21
            ),
            too_many.format("sample", 21),
            "top_logprobs",
        ),
        (
            lambda: client.chat.completions.create(
                model="tiny", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=-1
            ),
            too_many.format("sample", vocab),
            "top_logprobs",
        ),
        (
            lambda: client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=21),
            too_many.format("sample", 21),
            "logprobs",
        ),
        (
            lambda: client.completions.create(
                model="tiny", prompt="hi", max_tokens=2, extra_body={"prompt_logprobs": -1}
            ),
            too_many.format("prompt", vocab),
            "prompt_logprobs",
        ),
        (
            lambda: client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=-1),
            "logprobs must be >= 0, got -1",
            "logprobs",
        ),
        (
            lambda: client.chat.completions.create(
                model="tiny", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=-2
            ),
            "top_logprobs must be non-negative or -1",
            "top_logprobs",
        ),
    ]
    for call, words, field in cases:
        message, param = _bad_request(call)
        assert message.startswith(words) and param == field, (message, param)
    ok = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=20
    )
    assert ok.choices[0].logprobs is not None and ok.choices[0].logprobs.content is not None
    assert all(len(t.top_logprobs) == 20 for t in ok.choices[0].logprobs.content)


def test_whole_vocabulary_where_the_engine_allows_it(unlimited: Any, tokenizer: Any) -> None:
    client = openai_client(unlimited.url)
    vocab = len(tokenizer)
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=-1
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    for token in content:
        assert len(token.top_logprobs) == vocab  # every token once, most likely first
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
    r2 = client.chat.completions.create(  # above vLLM's default of 20
        model="tiny", messages=CHAT, max_tokens=1, logprobs=True, top_logprobs=30
    )
    assert len(r2.choices[0].logprobs.content[0].top_logprobs) == 30  # type: ignore[union-attr,index]
    message, param = _bad_request(
        lambda: client.completions.create(model="tiny", prompt="hi", max_tokens=1, logprobs=vocab + 1)
    )
    assert message.startswith(
        f"Requested sample logprobs of {vocab + 1}, which is greater than max allowed: {vocab}"
    )
    assert param == "logprobs"


def test_streamed_chat_takes_prompt_logprobs_zero(fake_server: Any) -> None:
    """vLLM refuses prompt_logprobs > 0 or -1 with stream; 0 asks for nothing and is accepted."""
    client = openai_client(fake_server.url, "sekret")
    chunks = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    message, param = _bad_request(
        lambda: client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1}
        )
    )
    assert param == "prompt_logprobs" and "not available when stream is true" in message
