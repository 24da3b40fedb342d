"""vLLM's return_tokens_as_token_ids, through the openai SDK on a fake engine: logprob tokens are named
"token_id:{id}" (chat: `token` and top_logprobs' `token`, `bytes` that name's bytes; completions: `tokens` and the
top_logprobs keys, echoed prompt tokens included), whole and streamed. The request's field wins over the server's
--return-tokens-as-token-ids either way. Checked against the same greedy request named by text: the ids are the
engine's (return_token_ids, prompt_token_ids), each decodes to the text entry in the same place, and the logprobs
and text offsets are the same."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from frontend_helpers import start_fake_server

PREFIX = "token_id:"


@pytest.fixture(scope="module", params=[False, True], ids=["flag-off", "flag-on"])
def server(request: pytest.FixtureRequest, tokenizer: Any) -> Iterator[tuple[Any, bool]]:
    """A server started with or without --return-tokens-as-token-ids."""
    srv, handle = start_fake_server(tokenizer, server_options={"return_tokens_as_token_ids": request.param})
    with srv:
        yield handle, request.param


def _client(handle: Any) -> openai.OpenAI:
    # not strict: the SDK's Completion type has no null finish_reason, which streamed chunks carry
    return openai.OpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0)


def _extra(server_flag: bool, as_ids: bool) -> dict[str, Any]:
    """The request fields that ask for `as_ids`: none when the server's flag already says so, else the field."""
    field = {} if as_ids == server_flag else {"return_tokens_as_token_ids": as_ids}
    return {"return_token_ids": True, **field}


def _id(name: str) -> int:
    assert name.startswith(PREFIX), name
    return int(name.removeprefix(PREFIX))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_name_token_ids(server: tuple[Any, bool], tokenizer: Any, stream: bool) -> None:
    handle, flag = server
    kw: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": "Count to three"}], max_tokens=8,
                              temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip

    def run(as_ids: bool) -> tuple[list[Any], list[int]]:
        create = _client(handle).chat.completions.create
        if not stream:
            choice = create(extra_body=_extra(flag, as_ids), **kw).choices[0]
            assert choice.logprobs is not None and choice.logprobs.content is not None
            return choice.logprobs.content, choice.model_extra["token_ids"]  # type: ignore[index]
        chunks = list(create(stream=True, extra_body=_extra(flag, as_ids), **kw))
        entries = [e for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content or []]
        ids = [t for ch in chunks for c in ch.choices for t in (c.model_extra or {}).get("token_ids") or []]
        return entries, ids

    named, ids = run(True)
    texts, text_ids = run(False)
    assert ids == text_ids and len(named) == len(texts) == len(ids) == 8
    for entry, text, token in zip(named, texts, ids, strict=True):
        assert entry.token == f"{PREFIX}{token}" and entry.bytes == list(entry.token.encode())
        assert tokenizer.decode([token]) == text.token and entry.logprob == text.logprob
        top_ids = [_id(t.token) for t in entry.top_logprobs]
        assert [tokenizer.decode([t]) for t in top_ids] == [t.token for t in text.top_logprobs]
        assert [t.logprob for t in entry.top_logprobs] == [t.logprob for t in text.top_logprobs]
        assert all(t.bytes == list(t.token.encode()) for t in entry.top_logprobs)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_logprobs_name_token_ids(server: tuple[Any, bool], tokenizer: Any, stream: bool) -> None:
    handle, flag = server
    kw: dict[str, Any] = dict(model="tiny", prompt="Count to three", max_tokens=8, temperature=0, logprobs=3,
                              echo=True)  # fmt: skip

    def run(as_ids: bool) -> tuple[dict[str, list[Any]], list[int]]:
        create = _client(handle).completions.create
        if not stream:
            choice = create(extra_body=_extra(flag, as_ids), **kw).choices[0]
            extra: Any = choice.model_extra
            assert choice.logprobs is not None
            return choice.logprobs.model_dump(), extra["prompt_token_ids"] + extra["token_ids"]
        block: dict[str, list[Any]] = {
            key: [] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }
        ids: list[int] = []
        for chunk in create(stream=True, extra_body=_extra(flag, as_ids), **kw):
            for c in chunk.choices:
                extra = c.model_extra or {}
                ids += (extra.get("prompt_token_ids") or []) + (extra.get("token_ids") or [])
                for key, values in (c.logprobs.model_dump() if c.logprobs else {}).items():
                    block[key] += values or []
        return block, ids

    named, ids = run(True)
    texts, text_ids = run(False)
    assert ids == text_ids and len(ids) > 8  # the echoed prompt, then the 8 generated tokens
    assert named["tokens"] == [f"{PREFIX}{t}" for t in ids]
    assert [tokenizer.decode([t]) for t in ids] == texts["tokens"]
    assert named["token_logprobs"] == texts["token_logprobs"] and named["text_offset"] == texts["text_offset"]
    assert named["top_logprobs"][0] is None and texts["top_logprobs"][0] is None  # the prompt's first token
    for top, text_top in zip(named["top_logprobs"][1:], texts["top_logprobs"][1:], strict=True):
        # the ids' texts, the first (best) of equal texts kept, as the text-named block keys them
        by_text: dict[str, float] = {}
        for name, logprob in top.items():
            by_text.setdefault(tokenizer.decode([_id(name)]), logprob)
        assert by_text == text_top
