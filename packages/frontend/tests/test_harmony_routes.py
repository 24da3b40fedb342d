"""gpt-oss's harmony format beyond chat completions, through the real SDKs: /v1/responses (a `reasoning` item, its
tokens counted as the analysis message's, `reasoning.effort` reaching the template, function_call items) and
/v1/messages (thinking blocks, tool_use), streamed and not, on a gpt_oss model behind a fake engine; a text.format
and forced calls on both routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from frontend_helpers import openai_client
from harmony_assets import (
    ANALYSIS,
    ANSWER,
    CALL,
    FINAL,
    THOUGHT,
    build_harmony_tokenizer,
    start_harmony_server,
)

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_harmony_tokenizer(tmp_path_factory.mktemp("harmony_tok"))


@pytest.fixture(scope="module")
def server(harmony_tokenizer: Any) -> Iterator[Any]:
    srv, handle = start_harmony_server(
        harmony_tokenizer, enable_auto_tool_choice=True, tool_call_parser="openai"
    )
    with srv:
        yield handle


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai_client(server.url)


def test_responses_reasoning_item(client: openai.OpenAI, server: Any, harmony_tokenizer: Any) -> None:
    server.script(ANALYSIS + FINAL)
    try:
        done = client.responses.create(model="tiny", input="Weather?", reasoning={"effort": "high"})
        prompt = server.last_prompt()
        events = list(client.responses.create(model="tiny", input="Weather?", stream=True))
    finally:
        server.engine.script = None
    assert "Reasoning: high<|end|>" in prompt
    # the analysis message's tokens, from its first token to <|end|> (the markers split the text cleanly)
    analysis_tokens = len(harmony_tokenizer.encode(ANALYSIS, add_special_tokens=False))
    for response in (done, events[-1].response):  # type: ignore[union-attr]
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert [(c.type, c.text) for c in response.output[0].content or []] == [("reasoning_text", THOUGHT)]
        assert response.output_text == ANSWER and response.status == "completed"
        assert response.usage and response.usage.output_tokens_details.reasoning_tokens == analysis_tokens
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]  # type: ignore[union-attr]
    assert "".join(deltas) == THOUGHT and len(deltas) > 3
    texts = [e.delta for e in events if e.type == "response.output_text.delta"]  # type: ignore[union-attr]
    assert "".join(texts) == ANSWER and not any("<|" in t for t in texts + deltas)


def test_responses_function_call(client: openai.OpenAI, server: Any) -> None:
    server.script(ANALYSIS + CALL)
    kw: dict[str, Any] = dict(
        model="tiny", input="Weather in Paris?", tools=[TOOL], reasoning={"effort": "low"}
    )
    try:
        done = client.responses.create(**kw)
        assert "Reasoning: low<|end|>" in server.last_prompt()
        events = list(client.responses.create(stream=True, **kw))
    finally:
        server.engine.script = None
    for response in (done, events[-1].response):  # type: ignore[union-attr]
        assert [item.type for item in response.output] == ["reasoning", "function_call"]
        call = response.output[1]
        assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
        assert json.loads(call.arguments) == {"city": "Paris"}
    args = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]  # type: ignore[union-attr]
    assert json.loads("".join(args)) == {"city": "Paris"} and len(args) > 2


def test_responses_reasoning_sent_back_goes_with_its_call(client: openai.OpenAI, server: Any) -> None:
    """The next turn of an agent loop sends the reply's output items back with the call's result: the reasoning item
    reaches the template as the tool-call turn's thinking (gpt-oss's renders it as the analysis before the call), as
    chat completions' reasoning_content does; a reasoning item not followed by an assistant turn stays unshown."""
    server.script(ANALYSIS + CALL)
    try:
        done = client.responses.create(model="tiny", input="Weather in Paris?", tools=[TOOL])
        server.script(FINAL)
        items = [item.model_dump(exclude_none=True) for item in done.output]
        assert [item["type"] for item in items] == ["reasoning", "function_call"]
        result = {"type": "function_call_output", "call_id": items[1]["call_id"], "output": '{"temp": 21}'}
        ask = {"role": "user", "content": "Weather in Paris?"}
        again = client.responses.create(model="tiny", input=[ask, *items, result], tools=[TOOL])
        prompt = server.last_prompt()
        # reasoning before a user turn, not an assistant one: not rendered
        client.responses.create(model="tiny", input=[items[0], ask])
        alone = server.last_prompt()
    finally:
        server.engine.script = None
    assert again.output_text == ANSWER
    analysis = f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
    assert analysis + "<|start|>assistant to=functions.get_weather" in prompt, prompt
    assert THOUGHT not in alone


def test_responses_bad_effort(client: openai.OpenAI) -> None:
    bad: Any = {"effort": "maximal"}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny", input="Hi", reasoning=bad)
    body: Any = err.value.body
    assert (
        body["param"] == "reasoning.effort" and "'maximal' is not one of low, medium, high" in body["message"]
    )


def test_messages_thinking_and_tool_use(server: Any) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    tool = {"name": "get_weather", "description": "Weather", "input_schema": TOOL["parameters"]}
    kw: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Weather?"}],
    }
    try:
        server.script(ANALYSIS + FINAL)
        answer = claude.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **kw)
        with claude.messages.stream(**kw) as stream:
            streamed = stream.get_final_message()
        server.script(ANALYSIS + CALL)
        called = claude.messages.create(tools=[tool], **kw)  # type: ignore[list-item]
        with claude.messages.stream(tools=[tool], **kw) as stream:  # type: ignore[list-item]
            streamed_call = stream.get_final_message()
    finally:
        server.engine.script = None
    for m in (answer, streamed):
        assert [b.type for b in m.content] == ["thinking", "text"] and m.stop_reason == "end_turn"
        assert (m.content[0].thinking, m.content[1].text) == (THOUGHT, ANSWER)  # type: ignore[union-attr]
    for m in (called, streamed_call):
        assert [b.type for b in m.content] == ["thinking", "tool_use"] and m.stop_reason == "tool_use"
        assert (m.content[1].name, m.content[1].input) == ("get_weather", {"city": "Paris"})  # type: ignore[union-attr]


def test_constrained_replies_on_responses_and_messages(client: openai.OpenAI, server: Any) -> None:
    """/v1/responses' text.format holds off until the final message's header (the analysis a reasoning item, the
    JSON the message); a forced function (/v1/responses) or tool (/v1/messages) reasons first, then is the call."""
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    tool = {"name": "get_weather", "description": "Weather", "input_schema": TOOL["parameters"]}
    header = "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    fmt: Any = {"format": {"type": "json_schema", "name": "city", "schema": TOOL["parameters"]}}
    try:
        server.script(ANALYSIS + '<|start|>assistant<|channel|>final<|message|>{"city": "Paris"}')
        formatted = client.responses.create(model="tiny", input="Weather?", text=fmt)
        held = server.requests[-1].sampling_params.structured_outputs
        server.script(ANALYSIS + header + '{"city": "Paris"}')
        choice: Any = {"type": "function", "name": "get_weather"}
        tools: Any = [TOOL]
        forced = client.responses.create(model="tiny", input="Weather?", tools=tools, tool_choice=choice)
        forced_so = server.requests[-1].sampling_params.structured_outputs
        ask: Any = {"messages": [{"role": "user", "content": "Hi"}], "tools": [tool]}
        used = claude.messages.create(
            model="tiny", max_tokens=200, tool_choice={"type": "tool", "name": "get_weather"}, **ask
        )
    finally:
        server.engine.script = None
    assert (held.reasoning, held.is_header_forced) == ("harmony", False)
    assert [item.type for item in formatted.output] == ["reasoning", "message"]
    assert formatted.output_text == '{"city": "Paris"}'
    assert (forced_so.reasoning, forced_so.is_header_forced) == ("harmony", True)
    assert [item.type for item in forced.output] == ["reasoning", "function_call"]
    call = forced.output[1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert [b.type for b in used.content] == ["thinking", "tool_use"]
    assert (used.content[0].thinking, used.content[1].name, used.content[1].input) == (  # type: ignore[union-attr]
        THOUGHT, "get_weather", {"city": "Paris"})  # fmt: skip


def test_responses_required_call(client: openai.OpenAI, server: Any) -> None:
    """tool_choice "required" on /v1/responses: the forced final message's array (structured.harmony_call) comes
    back as a reasoning item and function_call items."""
    calls = [{"name": "get_weather", "parameters": {"city": "Paris"}}]
    server.script(
        ANALYSIS + "<|start|>assistant<|channel|>final<|message|>" + json.dumps(calls) + "<|return|>"
    )
    try:
        done = client.responses.create(
            model="tiny", input="Weather in Paris?", tools=[TOOL], tool_choice="required"
        )
    finally:
        server.engine.script = None
    assert [item.type for item in done.output] == ["reasoning", "function_call"]
    call = done.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})  # type: ignore[union-attr]
    so = server.requests[-1].sampling_params.structured_outputs
    assert so.is_header_forced and json.loads(so.json)["type"] == "array"


def test_responses_previous_response_id_carries_the_reasoning_and_call(
    client: openai.OpenAI, server: Any
) -> None:
    """An agent loop by previous_response_id: the stored reply's reasoning and call reach the template as the
    explicit items do above (the analysis before the call), then the call's result."""
    server.script(ANALYSIS + CALL)
    try:
        done = client.responses.create(model="tiny", input="Weather in Paris?", tools=[TOOL])
        server.script(FINAL)
        call_id = done.output[1].call_id  # type: ignore[union-attr]
        result = {"type": "function_call_output", "call_id": call_id, "output": '{"temp": 21}'}
        again = client.responses.create(
            model="tiny", input=[result], tools=[TOOL], previous_response_id=done.id
        )
        prompt = server.last_prompt()
    finally:
        server.engine.script = None
    assert again.output_text == ANSWER
    analysis = f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
    assert (
        "Weather in Paris?" in prompt and analysis + "<|start|>assistant to=functions.get_weather" in prompt
    )
    # then the call's result (the template writes the output string as JSON)
    assert prompt.index("to=functions.get_weather") < prompt.index("functions.get_weather to=assistant"), (
        prompt
    )
    assert "temp" in prompt[prompt.index("functions.get_weather to=assistant") :]
