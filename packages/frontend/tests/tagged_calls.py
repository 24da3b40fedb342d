"""Shared by the glm45, granite, deepseek and kimi_k2 tool-call tests: a tokenizer whose special tokens include GLM's,
Granite's, DeepSeek's and Kimi-K2's markers (special, or added tokens, in those models' tokenizers: a reply decoded the default
way would lose them), replies scripted from text parts (a marker given whole is its one special token; a marker split
over two parts is written in smaller tokens, so it reaches the parser split across stream chunks), a fake-engine
server for one parser, and a chat request through the openai SDK, streamed or not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from frontend_helpers import openai_client, start_fake_server, streamed_tool_calls
from tiny_assets import build_tokenizer_dir

from treadle_frontend.server.call_deepseek import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, KIMI_K2, SEP
from treadle_frontend.server.call_glm45 import CLOSE, END_KEY, END_VALUE, KEY, OPEN, VALUE
from treadle_frontend.server.call_granite import TOKEN_TAG

# GLM's tags are added tokens in its tokenizer too, kept when decoding as vLLM keeps them
GLM_TAGS = (OPEN, CLOSE, KEY, END_KEY, VALUE, END_VALUE)
KIMI_ARGS = "<|tool_call_argument_begin|>"
KIMI_MARKERS = (KIMI_K2.calls_begin, KIMI_K2.calls_end, KIMI_K2.call_begin, KIMI_K2.call_end, KIMI_ARGS)
MARKERS = (TOKEN_TAG, CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, *GLM_TAGS, *KIMI_MARKERS)
_BUILT: dict[str, Any] = {}  # the tokenizer, built once per test session


def marker_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from treadle_frontend.tokenizer import load_tokenizer

    if "tokenizer" not in _BUILT:
        path: Path = tmp_path_factory.mktemp("marker_tok")
        _BUILT["tokenizer"] = load_tokenizer(build_tokenizer_dir(path, extra_specials=MARKERS))
    return _BUILT["tokenizer"]


def script(tokenizer: Any, parts: list[str]) -> list[int]:
    """The reply's tokens: each part encoded on its own (a marker alone is its special token)."""
    return [t for part in parts for t in tokenizer.encode(part, add_special_tokens=False)]


def split(marker: str) -> list[str]:
    """A marker as two parts: written in several tokens, it arrives in several stream chunks."""
    return [marker[: len(marker) // 2], marker[len(marker) // 2 :]]


def start(tokenizer: Any, parser: str, **options: Any) -> Any:
    """A fake-engine server (not yet started) reading `parser`'s calls; its handle's engine takes the scripts."""
    server_options = {"enable_auto_tool_choice": True, "tool_call_parser": parser, **options}
    return start_fake_server(tokenizer, server_options=server_options)


def serving(tmp_path_factory: pytest.TempPathFactory, parser: str, **options: Any) -> Iterator[Any]:
    """A module fixture's body: the fake-engine server for `parser` on the marker tokenizer, running; its handle
    holds the tokenizer and the parser's name."""
    tokenizer = marker_tokenizer(tmp_path_factory)
    server, handle = start(tokenizer, parser, **options)
    handle.tokenizer, handle.parser = tokenizer, parser
    with server:
        yield handle


def chat(server: Any, stream: bool, tools: list[Any], **kw: Any) -> dict[str, Any]:
    """One chat request's reply: content (None when absent), calls as (name, arguments object), finish_reason,
    reasoning; streamed, also the content deltas one by one (none may hold a marker or a piece of one)."""
    client = openai_client(server.url)
    body: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=tools, max_tokens=200, **kw
    )
    if not stream:
        choice = client.chat.completions.create(**body).choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        reasoning = getattr(choice.message, "reasoning_content", None)
        return dict(
            content=choice.message.content, calls=calls, finish=choice.finish_reason, reasoning=reasoning
        )
    chunks = list(client.chat.completions.create(stream=True, **body))
    deltas = [ch.delta.content for chunk in chunks for ch in chunk.choices if ch.delta.content]
    reasoning = "".join(
        getattr(ch.delta, "reasoning_content", None) or "" for chunk in chunks for ch in chunk.choices
    )
    found, pieces = streamed_tool_calls(chunks)
    finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
    assert len(finish) == 1, finish
    return dict(
        content="".join(deltas) or None,
        calls=[(name, json.loads(args)) for name, args in (found[i] for i in sorted(found))],
        finish=finish[0],
        reasoning=reasoning or None,
        deltas=deltas,
        pieces=pieces,
    )


def no_marker_leaks(deltas: list[str], leading: str) -> bool:
    """The streamed content is the leading text alone: no delta holds a marker's character past it."""
    return "".join(deltas) == leading and not any(c in d for d in deltas for c in "<>|\uff5c\u2581")
