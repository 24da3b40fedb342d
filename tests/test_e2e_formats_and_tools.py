"""End to end on the shared real server: tool calls, forced calls, structured outputs and /v1/responses through
the real openai and anthropic SDKs; the random model's replies, constrained by the engine, always parse.

This file sorts before test_e2e_server.py, whose last test kills the shared server's engine.
"""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import lark
import openai
import pytest
from e2e_helpers import API_KEY, CHAT, MODEL_NAME, RealServer


def test_tools_through_the_real_engine(real_server: RealServer, oai: openai.OpenAI) -> None:
    """With the tool-call flags, requests with tools reach the real engine on both routes (the random model
    writes no call: its text comes back as content), and the history's calls and results render."""
    tool = {
        "name": "get_weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    fn = {"type": "function", "function": {"name": tool["name"], "parameters": tool["input_schema"]}}
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]  # fmt: skip
    chat = oai.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=[fn], max_tokens=4, temperature=0
    )
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.choices[0].message.content is not None
    msg = anthropic.Anthropic(base_url=real_server.url, api_key=API_KEY, max_retries=0).messages.create(
        model=MODEL_NAME, max_tokens=4, tools=[tool], messages=[{"role": "user", "content": "Weather?"}]
    )
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.content[0].type == "text"


SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "ok": {"type": "boolean"}},
    "required": ["color", "n", "ok"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_structured_outputs_through_the_real_engine(oai: openai.OpenAI, temperature: float) -> None:
    """The random model's replies, constrained by the engine's grammar masks, always parse: a JSON schema (no
    whitespace, so the reply is short), a regex and a choice, on both routes, greedy and sampled (seeded)."""
    chat = oai.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=60, temperature=temperature, seed=3,
        extra_body={"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
    )  # fmt: skip
    assert chat.choices[0].finish_reason == "stop", chat.choices[0].message.content
    value = json.loads(chat.choices[0].message.content or "")
    assert set(value) == {"color", "n", "ok"} and value["color"] in ("red", "green", "blue")
    assert isinstance(value["n"], int) and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)
    regex = oai.completions.create(
        model=MODEL_NAME, prompt="Code:", max_tokens=20, temperature=temperature, seed=4,
        extra_body={"guided_regex": "[a-z]{3}-[0-9]{2}"},
    )  # fmt: skip
    assert (
        re.fullmatch("[a-z]{3}-[0-9]{2}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
    )
    stream = oai.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=20, temperature=temperature, seed=5, stream=True,
        extra_body={"guided_choice": ["Paris", "Lyon", "Nice"]},
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("Paris", "Lyon", "Nice")


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_through_the_real_engine(oai: openai.OpenAI, stream: bool) -> None:
    """tool_choice required / a named function: decoding constrained to the calls' JSON, so even the random
    model's reply is well-formed calls to the tools given, with arguments matching their schemas."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"],
        "additionalProperties": False}}}  # fmt: skip
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}  # fmt: skip
    for choice, finish in (({"type": "function", "function": {"name": "get_weather"}}, "stop"),
                           ("required", "tool_calls")):  # fmt: skip
        kw: dict[str, Any] = dict(model=MODEL_NAME, messages=CHAT, tools=[weather, clock], tool_choice=choice,
                                  max_tokens=200, temperature=1.0, seed=9)  # fmt: skip
        if stream:
            calls: dict[int, Any] = {}  # index -> the function, its arguments joined as they stream
            reasons = []
            for chunk in oai.chat.completions.create(stream=True, **kw):
                for ch in chunk.choices:
                    for tc in ch.delta.tool_calls or []:
                        assert tc.function is not None
                        if tc.index in calls:
                            calls[tc.index].arguments += tc.function.arguments or ""
                        else:
                            calls[tc.index] = tc.function
                    reasons += [ch.finish_reason] if ch.finish_reason else []
            got, reason = [calls[i] for i in sorted(calls)], reasons[-1]
        else:
            done = oai.chat.completions.create(**kw)
            got, reason = (
                [c.function for c in done.choices[0].message.tool_calls or []],
                done.choices[0].finish_reason,
            )
            assert done.choices[0].message.content is None
        assert reason == finish and got, (choice, reason)
        for fn in got:
            args = json.loads(fn.arguments)
            assert fn.name in ("get_weather", "get_time")
            assert args == {} if fn.name == "get_time" else args["unit"] in ("C", "F")
        if isinstance(choice, dict):
            assert [fn.name for fn in got] == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_use_on_messages(real_server: RealServer, stream: bool) -> None:
    """Anthropic's tool_choice any / tool: the random model's reply is only well-formed tool_use blocks."""
    client = anthropic.Anthropic(base_url=real_server.url, api_key=API_KEY, max_retries=0)
    weather = {
        "name": "get_weather",
        "input_schema": {
            "type": "object",
            "properties": {"unit": {"enum": ["C", "F"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    }
    clock = {
        "name": "get_time",
        "input_schema": {"type": "object", "properties": {}, "additionalProperties": False},
    }
    for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any"}):  # fmt: skip
        kw: dict[str, Any] = dict(model=MODEL_NAME, max_tokens=200, tools=[weather, clock], tool_choice=choice,
                                  messages=[{"role": "user", "content": "Weather?"}])  # fmt: skip
        if stream:
            with client.messages.stream(**kw) as s:
                m = s.get_final_message()
        else:
            m = client.messages.create(**kw)
        assert m.stop_reason == "tool_use" and m.content and all(b.type == "tool_use" for b in m.content), m
        for b in m.content:
            assert b.input == {} if b.name == "get_time" else b.input["unit"] in ("C", "F")
        if choice["type"] == "tool":
            assert [b.name for b in m.content] == ["get_weather"]


def test_responses_api_through_the_real_engine(oai: openai.OpenAI) -> None:
    """/v1/responses on the real engine: a reply, and text.format's JSON schema constraining it."""
    done = oai.responses.create(model=MODEL_NAME, input="Hello", max_output_tokens=4)
    assert done.status == "incomplete" and done.usage is not None and done.usage.output_tokens == 4
    # a JSON string from a list: no room for the whitespace a random model could otherwise repeat inside an object
    fmt = {"type": "json_schema", "name": "pick", "schema": {"enum": ["red", "green", "blue"]}}
    shaped = oai.responses.create(model=MODEL_NAME, input="Pick", max_output_tokens=60, text={"format": fmt})  # type: ignore[arg-type]
    assert shaped.status == "completed" and json.loads(shaped.output_text) in ("red", "green", "blue")
    unit = {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"],
            "additionalProperties": False}  # fmt: skip
    tool = {"type": "function", "name": "get_weather", "parameters": unit}
    forced = oai.responses.create(model=MODEL_NAME, input="Weather?", tools=[tool],  # type: ignore[list-item]
                                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60)  # fmt: skip
    calls = [o for o in forced.output if o.type == "function_call"]
    assert forced.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["unit"] in ("C", "F")


LARK = r"""
start: greeting " " CITY "."
greeting: "hi"i | "hello"
CITY: /[A-Z][a-z\u00e0-\u00ff]{2,6}/
"""


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_lark_grammar_holds_the_real_engines_reply(oai: openai.OpenAI, temperature: float) -> None:
    """vLLM clients send Lark grammars too (guided_grammar through extra_body): the engine's masks hold the random
    model's reply to the converted grammar, and Lark's own parser reads it; what cannot be converted is a 400
    naming the field."""
    reply = oai.completions.create(
        model=MODEL_NAME, prompt="Greet a city:", max_tokens=30, temperature=temperature, seed=6,
        extra_body={"guided_grammar": LARK},
    )  # fmt: skip
    text = reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop", text
    lark.Lark(LARK, parser="earley", lexer="dynamic_complete").parse(text)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                               extra_body={"guided_grammar": 'start: /a+?/'})  # fmt: skip
    assert e.value.param == "guided_grammar" and "a lazy quantifier" in e.value.message, e.value.message


def test_structured_output_errors_leave_the_engine_serving(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="Unsupported type"):
        oai.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, extra_body={"structured_outputs": {"json": {"type": "nonsense"}}}
        )
    ok = oai.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    assert ok.choices[0].finish_reason == "length"
