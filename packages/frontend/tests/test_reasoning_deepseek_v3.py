"""`--reasoning-parser deepseek_v3` (DeepSeek-V3.1's hybrid thinking, as vLLM's parser of that name): a request whose
`chat_template_kwargs` set `thinking` has its reply read as deepseek_r1's (reasoning up to `</think>`, the template
having opened the block), any other the whole reply as content; on /v1/messages `thinking: enabled` is that
request (rendered into the template as `thinking=True`); /v1/responses reads it as content. Through the openai and
anthropic SDKs on a server whose fake engine writes a DeepSeek-style thinking reply."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from frontend_helpers import start_fake_server

from treadle_frontend.server.reply import request_reasoning_parser

REPLY = "Let me think.\n</think>\n\nAnswer"
# a hybrid template: the assistant turn opens a <think> block only when told to think (DeepSeek-V3.1's rule)
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if thinking %}<think>{% endif %}{% endif %}"
)
HI = [{"role": "user", "content": "Hi"}]


def test_the_request_picks_the_reading() -> None:
    assert request_reasoning_parser("deepseek_v3", {"thinking": True}) == "deepseek_r1"
    assert request_reasoning_parser("deepseek_v3", {"thinking": False}) is None
    # Qwen3's name for it, not V3.1's
    assert request_reasoning_parser("deepseek_v3", {"enable_thinking": True}) is None
    assert request_reasoning_parser("deepseek_v3", None) is None
    assert request_reasoning_parser("qwen3", {"thinking": True}) == "qwen3"  # the others ignore it
    assert request_reasoning_parser(None, {"thinking": True}) is None


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_fake_server(tokenizer, server_options={"reasoning_parser": "deepseek_v3"})
    handle.engine.script = tokenizer.encode(REPLY, add_special_tokens=False)
    handle.llm.input_processor.chat_template = TEMPLATE
    with srv:
        yield handle


def _chat(client: openai.OpenAI, **kw: Any) -> list[tuple[str | None, str | None]]:
    """(reasoning_content, content) of the reply, whole and streamed."""
    message = client.chat.completions.create(model="tiny", messages=HI, **kw).choices[0].message  # type: ignore[arg-type]
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="tiny", messages=HI, stream=True, **kw):  # type: ignore[arg-type]
        for ch in chunk.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
    return [
        (getattr(message, "reasoning_content", None), message.content),
        (reasoning or None, content or None),
    ]


def test_chat_reads_a_block_only_when_thinking(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", _strict_response_validation=True)
    thinking = {"chat_template_kwargs": {"thinking": True}}
    assert _chat(client, extra_body=thinking) == [("Let me think.\n", "Answer")] * 2
    assert _chat(client) == [(None, REPLY)] * 2
    assert _chat(client, extra_body={"chat_template_kwargs": {"thinking": False}}) == [(None, REPLY)] * 2


def test_messages_thinking_enabled_renders_and_reads_the_block(server: Any) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    kw: dict[str, Any] = {"model": "tiny", "max_tokens": 100, "messages": HI}
    on = {"type": "enabled", "budget_tokens": 1024}
    m = client.messages.create(thinking=on, **kw)
    blocks = [(b.type, b.thinking if b.type == "thinking" else b.text) for b in m.content]
    assert blocks == [("thinking", "Let me think.\n"), ("text", "Answer")]
    with client.messages.stream(thinking=on, **kw) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.thinking if b.type == "thinking" else b.text) for b in final.content] == blocks
    plain = client.messages.create(**kw)
    assert [(b.type, b.text) for b in plain.content if b.type == "text"] == [("text", REPLY)]
    assert [b.type for b in plain.content] == ["text"]
    # the template was told to think: its assistant turn opens the block in the prompt
    count = client.messages.count_tokens
    assert (
        count(model="tiny", messages=HI, thinking=on).input_tokens
        > count(model="tiny", messages=HI).input_tokens
    )


def test_responses_read_the_reply_as_content(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", _strict_response_validation=True)
    r = client.responses.create(model="tiny", input="Hi")
    assert [item.type for item in r.output] == ["message"] and r.output_text == REPLY
