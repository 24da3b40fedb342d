"""Tool use on /v1/messages: Anthropic's tool blocks to and from the chat template's OpenAI-shaped messages.

Request side: `tools` ({name, description, input_schema}) reach the template as OpenAI function tools; an
assistant turn's `tool_use` blocks become its `tool_calls` (arguments as objects), and a user turn's
`tool_result` blocks become `tool` messages (its other text after them, as a user message). Reply side (with
`--enable-auto-tool-choice --tool-call-parser hermes`): the calls the reply writes become `tool_use` blocks after
its text, with stop_reason "tool_use" (max_tokens when the reply was cut); streamed, each call is a block of its
own (content_block_start with empty `input`, `input_json_delta`s with the arguments as the model writes them,
content_block_stop), text after a call opens a new text block, and block indexes count up from 0. A forced
`tool_choice` (`any`, or `tool` with its name) needs no flag: decoding is constrained to the calls' JSON
(forced_tools.py) and the reply is only tool_use blocks, also when max_tokens cuts it (stop_reason max_tokens, as
Anthropic's API): `tool` gives its tool_use block whatever was written, its input parsed as far as it goes ({} if
nothing); `any` gives a block for each call whose name was written whole, and no content at all when the cut came
inside the first name (never the JSON as text).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic_core import from_json

from treadle_frontend.server.errors import APIError
from treadle_frontend.server.forced_tools import forced_schema
from treadle_frontend.server.streams import sse_event
from treadle_frontend.server.tool_calls import CallDelta, ToolCall


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic tool definitions as the OpenAI function tools chat templates render."""
    out = []
    for i, tool in enumerate(tools):
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"tools.{i}.name: a tool needs a name")
        if not isinstance(schema, dict):
            raise APIError(400, f"tools.{i}.input_schema: a tool needs a JSON schema object")
        fn = {"name": name, "description": tool.get("description", ""), "parameters": schema}
        out.append({"type": "function", "function": fn})
    return out


def forced_choice(tools: list[dict[str, Any]] | None, tool_choice: dict[str, Any] | None) -> Any:
    """(the JSON schema the reply must follow, the tool's name or None for `any`), or None when not forced."""
    kind = (tool_choice or {}).get("type")
    if kind not in ("any", "tool"):
        return None
    assert tool_choice is not None
    choice = (
        "required" if kind == "any" else {"type": "function", "function": {"name": tool_choice.get("name")}}
    )
    return forced_schema(openai_tools(tools or []), choice)


def _text_of(block: Any, where: str) -> str:
    text = block.get("text") if isinstance(block, dict) else None
    if not isinstance(text, str):
        raise APIError(400, f"{where}.text: a text block needs its text")
    return text


def _result_text(content: Any, where: str) -> str:
    """A tool_result's content: a string, or text blocks joined one per line."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content: a string or a list of text blocks")
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise APIError(400, f"{where}.content[{j}]: tool results are text here")
        parts.append(_text_of(block, f"{where}.content[{j}]"))
    return "\n".join(parts)


def chat_turns(role: str, blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """One Anthropic message with tool blocks as chat-template messages."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind, at = block.get("type"), f"{where}[{j}]"
        if kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise APIError(400, f"{at}: a tool_use block needs a name and an input object")
            fn = {"name": block["name"], "arguments": block.get("input", {})}
            calls.append({"id": block.get("id", ""), "type": "function", "function": fn})
        elif kind == "tool_result" and role == "user":
            content = _result_text(block.get("content"), at)
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""), "content": content})
        else:
            raise APIError(400, f"{at}: content blocks of type {kind!r} are not supported in a {role} turn")
    text = "\n".join(texts)
    if role == "assistant":
        return [{"role": "assistant", "content": text, "tool_calls": calls}]
    return [*results, *([{"role": "user", "content": text}] if text or not results else [])]


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    """A whole reply's call as a tool_use block; arguments cut short by max_tokens give the input written so far
    (complete values only), as the anthropic SDK reads the same call streamed."""
    try:
        args = from_json(call.arguments, allow_partial=True)
    except ValueError:
        args = {}
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
            "input": args if isinstance(args, dict) else {"value": args}}  # fmt: skip


class BlockStream:
    """The content-block events of a streamed reply: reasoning goes to an open thinking block and text to an open
    text block (each opened on demand, closing the other), each call is a tool_use block of its own."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # the open block's type: "text", "thinking" or "tool_use"
        self.num_calls = 0

    def _start(self, kind: str) -> list[str]:
        events = self.close()
        self.index += 1
        self.open = kind
        body = (
            {"type": "text", "text": ""}
            if kind == "text"
            else {"type": "thinking", "thinking": "", "signature": ""}
        )
        block = {"type": "content_block_start", "index": self.index, "content_block": body}
        return [*events, sse_event("content_block_start", block)]

    def start_text(self) -> list[str]:
        return self._start("text")

    def text(self, text: str) -> list[str]:
        return self._append("text", {"type": "text_delta", "text": text}) if text else []

    def thinking(self, text: str) -> list[str]:
        return self._append("thinking", {"type": "thinking_delta", "thinking": text}) if text else []

    def _append(self, kind: str, delta: dict[str, Any]) -> list[str]:
        """`delta` into the open block of `kind`, opening one (and closing the other) first if needed."""
        events = [] if self.open == kind else self._start(kind)
        event = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return [*events, sse_event("content_block_delta", event)]

    def call(self, delta: CallDelta) -> list[str]:
        """A call's delta: its first opens a tool_use block (empty `input`), its argument text goes out as
        `input_json_delta`s, its last stops the block. A call read whole (first and last at once) sends its input
        as `tool_use_block` reads it (an object)."""
        events, text = [], delta.arguments
        if delta.first:
            events += self.close()
            self.index += 1
            self.num_calls += 1
            block = tool_use_block(delta.call)
            self.open = "tool_use"
            start = {
                "type": "content_block_start",
                "index": self.index,
                "content_block": {**block, "input": {}},
            }
            events.append(sse_event("content_block_start", start))
            if delta.done:
                text = json.dumps(block["input"], ensure_ascii=False)
        if text:
            event = {"type": "content_block_delta", "index": self.index,
                     "delta": {"type": "input_json_delta", "partial_json": text}}  # fmt: skip
            events.append(sse_event("content_block_delta", event))
        return events + (self.close() if delta.done else [])

    def close(self) -> list[str]:
        """Stop the open block (a thinking block gets its (empty) signature first, as Anthropic streams it)."""
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            sig = {
                "type": "content_block_delta",
                "index": self.index,
                "delta": {"type": "signature_delta", "signature": ""},
            }
            events.append(sse_event("content_block_delta", sig))
        self.open = None
        return [*events, sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]
