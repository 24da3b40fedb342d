"""Chat requests as vLLM serves them, through the openai SDK on a fake engine: the engine's rejection reason is
a 400, min_tokens holds stop strings back, "developer" is the system prompt, `echo` opens the reply with the
message it continues, and /tokenize renders messages as the chat route does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from frontend_helpers import make_processor, start_fake_server
from tiny_assets import CHATML

REPLY = "one, two, three, four, five, six, seven"
CONTINUED = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "Zero,"}]


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer)
    handle.engine.script = tokenizer.encode(REPLY, add_special_tokens=False)
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_the_engines_rejection_is_a_400_with_its_reason(server: Any, client: openai.OpenAI) -> None:
    server.engine.reject = "structured_outputs.json: a reason only the engine knew"
    try:
        with pytest.raises(openai.BadRequestError, match="a reason only the engine knew"):
            client.chat.completions.create(model="tiny", messages=CONTINUED[:1], max_tokens=3)
    finally:
        server.engine.reject = None
    assert client.chat.completions.create(model="tiny", messages=CONTINUED[:1], max_tokens=3).choices


@pytest.mark.parametrize("min_tokens", [0, 3, 4, 9])
def test_min_tokens_holds_stop_strings_back(client: openai.OpenAI, tokenizer: Any, min_tokens: int) -> None:
    script = tokenizer.encode(REPLY, add_special_tokens=False)
    texts = [tokenizer.decode(script[:n]) for n in range(len(script) + 1)]
    # the reply stops at the first "," written by a token past the first min_tokens, and ends before it
    stop_at = next(n for n in range(min_tokens + 1, len(script) + 1) if "," in texts[n][len(texts[n - 1]) :])
    body = {"model": "tiny", "prompt": "Count", "max_tokens": 20, "stop": [","]}
    extra = {"min_tokens": min_tokens, "return_token_ids": True}
    choice = client.completions.create(**body, extra_body=extra).choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == ","  # type: ignore[attr-defined]
    assert len(choice.token_ids) == stop_at  # type: ignore[attr-defined]
    assert choice.text == texts[stop_at][: texts[stop_at].index(",", len(texts[stop_at - 1]))]
    assert choice.text.count(",") == texts[min_tokens].count(",")  # those within min_tokens stay in the text
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**body, extra_body=extra, stream=True)
    )
    assert streamed == choice.text


def test_developer_is_the_system_prompt(server: Any, tokenizer: Any) -> None:
    def ids(role: str) -> list[int]:
        messages = [{"role": role, "content": "Answer tersely."}, {"role": "user", "content": "Hi"}]
        return list(httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"])

    assert ids("developer") == ids("system") != ids("user")
    processor = make_processor(tokenizer)
    processor.chat_template = CHATML + "{# a template with a developer role of its own keeps it #}"
    assert "<|im_start|>developer" in processor.render_chat([{"role": "developer", "content": "x"}])


@pytest.mark.parametrize("stream", [False, True])
def test_echo_opens_the_reply_with_the_message_it_continues(client: openai.OpenAI, stream: bool) -> None:
    def content(echo: bool, messages: list[dict[str, str]], **extra: Any) -> str:
        body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, "stream": stream}
        out = client.chat.completions.create(**body, extra_body={"echo": echo, **extra})
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in out if c.choices)
        return out.choices[0].message.content or ""

    continued = {"continue_final_message": True, "add_generation_prompt": False}
    reply = content(False, CONTINUED, **continued)
    assert reply and content(True, CONTINUED, **continued) == "Zero," + reply
    # a new assistant turn: nothing echoed
    assert content(True, CONTINUED[:1]) == content(False, CONTINUED[:1])


def test_tokenize_renders_messages_as_the_chat_route(server: Any, client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    fields = {
        "continue_final_message": True,
        "add_generation_prompt": False,
        "chat_template_kwargs": {"x": 1},
    }
    chat = client.chat.completions.create(model="tiny", messages=CONTINUED, max_tokens=2, tools=tools,
                                          extra_body={**fields, "return_token_ids": True})  # fmt: skip
    tokenized = httpx.post(server.url + "/tokenize", json={"messages": CONTINUED, "tools": tools, **fields})
    assert tokenized.json()["tokens"] == chat.prompt_token_ids  # type: ignore[attr-defined]
    closed = httpx.post(
        server.url + "/tokenize", json={"messages": CONTINUED, "add_generation_prompt": False}
    )
    assert closed.json()["tokens"] != chat.prompt_token_ids  # type: ignore[attr-defined]
