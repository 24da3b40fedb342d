"""vLLM's `truncate_prompt_tokens` on both OpenAI routes, through the openai SDK (fake engine): the prompt keeps its
last k tokens (the usage and the returned prompt ids say so), -1 keeps up to max_model_len, and other values are
400s."""

from __future__ import annotations

from typing import Any

import openai
import pytest


@pytest.fixture(scope="module")
def client(fake_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_server.url + "/v1", api_key="sekret", max_retries=0)


def test_completions_keep_the_last_tokens(client: openai.OpenAI) -> None:
    prompt = "one two three four five six seven eight nine ten"
    whole = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=2, extra_body={"return_token_ids": True}
    )
    ids = (whole.choices[0].model_extra or {})["prompt_token_ids"]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=2,
                                    extra_body={"return_token_ids": True, "truncate_prompt_tokens": 3})  # fmt: skip
    assert (cut.choices[0].model_extra or {})["prompt_token_ids"] == ids[-3:]
    assert cut.usage is not None and cut.usage.prompt_tokens == 3
    same = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=2, extra_body={"truncate_prompt_tokens": -1}
    )
    assert same.usage is not None and same.usage.prompt_tokens == len(ids)


def test_chat_keeps_the_last_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "a fairly long question about many things"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                       extra_body={"truncate_prompt_tokens": 4})  # fmt: skip
    assert r.usage is not None and r.usage.prompt_tokens == 4


def test_bad_values_are_400(client: openai.OpenAI) -> None:
    for k in (0, -2):
        with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens must be -1 or >= 1"):
            client.completions.create(
                model="tiny", prompt="hi", max_tokens=1, extra_body={"truncate_prompt_tokens": k}
            )
