"""vLLM's `return_token_ids` on both OpenAI routes, through the openai SDK (fake engine): the prompt's ids and each
choice's generated ids, whole and streamed (the streamed pieces join to the whole), and nothing without the flag."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

IDS = {"return_token_ids": True}


@pytest.fixture(scope="module")
def client(fake_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_server.url + "/v1", api_key="sekret", max_retries=0)


def _tokenize(server: Any, body: dict[str, Any]) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body, headers={"Authorization": "Bearer sekret"})
    return list(r.json()["tokens"])


def test_completions(client: openai.OpenAI, fake_server: Any, tokenizer: Any) -> None:
    prompt_ids = _tokenize(fake_server, {"model": "tiny", "prompt": "Hello there"})
    kw: dict[str, Any] = dict(model="tiny", prompt="Hello there", max_tokens=6, n=2, seed=5, extra_body=IDS)
    r = client.completions.create(**kw)
    for choice in r.choices:
        extra = choice.model_extra or {}
        assert extra["prompt_token_ids"] == prompt_ids
        assert len(extra["token_ids"]) == 6 and tokenizer.decode(extra["token_ids"]) == choice.text
    streamed: dict[int, list[int]] = {0: [], 1: []}
    prompt_seen: dict[int, int] = {0: 0, 1: 0}
    for chunk in client.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            extra = choice.model_extra or {}
            streamed[choice.index] += extra["token_ids"]
            if "prompt_token_ids" in extra:
                assert extra["prompt_token_ids"] == prompt_ids
                prompt_seen[choice.index] += 1
    assert prompt_seen == {0: 1, 1: 1}  # once per choice
    assert streamed == {c.index: (c.model_extra or {})["token_ids"] for c in r.choices}


def test_chat(client: openai.OpenAI, fake_server: Any, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    prompt_ids = _tokenize(fake_server, {"model": "tiny", "messages": messages})
    kw: dict[str, Any] = dict(model="tiny", messages=messages, max_tokens=6, seed=7, extra_body=IDS)
    r = client.chat.completions.create(**kw)
    assert (r.model_extra or {})["prompt_token_ids"] == prompt_ids
    ids = (r.choices[0].model_extra or {})["token_ids"]
    assert len(ids) == 6 and tokenizer.decode(ids) == r.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert [(c.model_extra or {}).get("prompt_token_ids") for c in chunks[:2]] == [prompt_ids, None]
    streamed = [t for c in chunks for ch in c.choices for t in (ch.model_extra or {}).get("token_ids", [])]
    assert streamed == ids


def test_nothing_without_the_flag(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert "token_ids" not in (r.choices[0].model_extra or {})
    c = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert "prompt_token_ids" not in (c.model_extra or {}) and "token_ids" not in (
        c.choices[0].model_extra or {}
    )
