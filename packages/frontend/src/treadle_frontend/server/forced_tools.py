"""A forced tool call on /v1/chat/completions: `tool_choice` "required" or a named function, as OpenAI defines
them, done as vLLM does: decoding is constrained to JSON (structured outputs, without whitespace between its
tokens, which a call's arguments do not need and which a model could otherwise repeat without end) and that
JSON becomes the calls.

- named (`{"type": "function", "function": {"name": N}}`): the reply is N's arguments, a JSON value of its
  `parameters` schema; one call, finish_reason "stop" (OpenAI's for a forced function);
- "required": the reply is a JSON array of one or more `{"name", "parameters"}` objects, each naming a tool and
  matching its schema; one call per item, finish_reason "tool_calls".
`ForcedToolCalls` streams each call as its JSON is written (the JSON is never content). A reply cut by max_tokens
is still calls (finish_reason "length", content null; Anthropic's stop_reason max_tokens): the named call with the
arguments written so far ("" if none), and each array item whose name was written whole.
With a reasoning parser the constraint holds off until the reasoning block ends (structured.after_reasoning), so
the block is split off first and streamed as reasoning; the JSON after it is the calls. A harmony reply (gpt-oss) of
a forced call is an analysis message (reasoning) or none, then a forced header (structured.harmony_call: the named
call's own, or for "required" the final message's, whose JSON is the array), dropped here.
`ReplyReader` picks the parser for a reply (forced calls, the tool-call and reasoning parsers, or none), and
`chat_delta` turns what a parser releases into a streamed chunk's delta.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import from_json

from treadle_frontend.server.call_sequence import CallSequence
from treadle_frontend.server.call_xml import tool_schemas
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.harmony import HARMONY, ForcedCallHeader
from treadle_frontend.server.reply import THINK_PARSERS, ReasoningStream, ReplyParser, whole_reply
from treadle_frontend.server.tool_calls import CallDelta, Piece, ToolCall, merged, parse_call


def forced_schema(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[dict[str, Any], str | None]:
    """(the JSON schema the reply must follow, the forced function's name or None for "required")."""
    functions = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"tools[{i}].function.name: every tool needs a function name", param="tools")
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError(
                400, f"tools[{i}].function.parameters: a JSON schema object is required", param="tools"
            )
        functions[fn["name"]] = parameters or {"type": "object"}
    if not functions:
        raise APIError(400, "tool_choice: forcing a tool call needs tools", param="tool_choice")
    if tool_choice == "required":
        variants = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": schema},
                     "required": ["name", "parameters"]} for name, schema in functions.items()]  # fmt: skip
        return {"type": "array", "minItems": 1, "items": {"anyOf": variants}}, None
    name = (tool_choice.get("function") or {}).get("name")
    if name not in functions:
        raise APIError(400, f"tool_choice: no tool named {name!r} in tools", param="tool_choice")
    return functions[name], name


def _array_items(text: str, partial: bool = False) -> list[Any]:
    """The items of a constrained "required" reply: none when it was cut short and does not parse, or, `partial`,
    what its text holds so far (complete values only: an item cut inside its name has no name)."""
    try:
        value = from_json(text, allow_partial=True) if partial else json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _cut_call(item: Any) -> ToolCall | None:
    """An array item cut short: a call when its name was written whole (its arguments as far as they got: ""
    when cut before them)."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("parameters")
    text = json.dumps(arguments, ensure_ascii=False) if isinstance(arguments, dict) else ""
    return ToolCall(item["name"], text, complete=False)


class ForcedToolCalls:
    """The streaming side: releases the reasoning block as it comes, then streams the calls as their JSON is
    written (named: the reply is the arguments, the call opens on its first character; "required": each array
    item streams as call_scanner.py reads it). A reply with no call in it (empty, or an array whose items the
    scanner cannot stream and whose JSON does not parse at the end) is released as its text when it ends.

    `calls_only` (the routes' forced tool_choice, whose reply is only calls: chat's tool_calls, Anthropic's
    tool_use blocks): a reply cut short (by max_tokens or a stop sequence) is never text. A named call is made even
    if none of its arguments were written (arguments "", Anthropic's input {}); of an array, every item whose name
    was written whole is a call, with the arguments written so far (those the scanner streamed as written, else
    complete values only); an item cut inside its name is dropped, as is the JSON around it."""

    def __init__(
        self, name: str | None, reasoning_parser: str | None = None, calls_only: bool = False
    ) -> None:
        self.name, self.calls_only = name, calls_only
        self.reasoning = ReasoningStream(reasoning_parser) if reasoning_parser in THINK_PARSERS else None
        # a harmony reply: an analysis message (reasoning) or none, then the call's forced header
        self.header = ForcedCallHeader() if reasoning_parser == HARMONY else None
        self.text = ""
        self._named: CallDelta | None = None
        self._array = CallSequence.array() if name is None else None

    @property
    def num_calls(self) -> int:
        return self._array.count if self._array is not None else int(self._named is not None)

    def feed(self, text: str, final: bool = False) -> list[Piece]:
        reasoning, content = self.reasoning.split(text, final) if self.reasoning else ("", text)
        if self.header is not None:
            reasoning, content = self.header.split(content, final)
        self.text += content
        deltas = self._array.feed(content) if self._array is not None else self._stream_named(content)
        pieces = [Piece(reasoning=reasoning)] if reasoning else []
        if final:
            deltas += self._finish_array(self._array) if self._array is not None else self._finish_named()
            if not self.num_calls and not self.calls_only:
                pieces.append(Piece(content=self.text))
        return [*pieces, Piece(deltas=deltas)] if deltas else pieces

    def _stream_named(self, content: str) -> list[CallDelta]:
        assert self.name is not None
        if self._named is None:
            content = content.lstrip()
            if not content:
                return []
            self._named = CallDelta.opening(0, self.name, content)
            return [self._named]
        return [self._named.then(content)] if content else []

    def _finish_array(self, array: CallSequence) -> list[CallDelta]:
        """The open item's last delta, or, when streaming stopped, the calls left in the whole reply (with
        `calls_only`, also those of a reply cut short: each item whose name is whole)."""
        deltas = array.finish()
        if array.stopped or self.calls_only:
            for item in _array_items(self.text, partial=self.calls_only)[array.count :]:
                if (call := parse_call(json.dumps(item)) or _cut_call(item)) is not None:
                    deltas.append(CallDelta.whole(array.count, call))
                    array.count += 1
        return deltas

    def _finish_named(self) -> list[CallDelta]:
        if self._named is None:
            assert self.name is not None
            # cut before its first character: still the call the tool_choice named, with no arguments written
            return [CallDelta.whole(0, ToolCall(self.name, "", complete=False))] if self.calls_only else []
        # constrained JSON: whole unless max_tokens cut it
        return [self._named.last_if_json()]


class ReplyReader:
    """How a route reads its reply: a forced call's JSON (`forced`: forced_schema's (schema, name)), else the
    reasoning and tool-call parsers the request and server enable, else plain text."""

    def __init__(
        self,
        reasoning_parser: str | None,
        tool_parser: str | None,
        forced: tuple[Any, str | None] | None,
        tools: list[Any] | None = None,
        calls_only: bool = False,
    ) -> None:
        """`tools`: the request's tool definitions (their parameter schemas type qwen3_coder's values);
        `calls_only`: a forced reply cut short is still calls, never text (ForcedToolCalls)."""
        self.reasoning_parser, self.tool_parser, self.forced = reasoning_parser, tool_parser, forced
        self.schemas = tool_schemas(tools)
        self.calls_only = calls_only

    def whole(self, text: str) -> tuple[str | None, str | None, list[ToolCall]]:
        """A finished reply: (reasoning or None, content or None where calls or reasoning stand alone, calls)."""
        parser = self.stream()
        if parser is None:
            return None, text, []
        return whole_reply(parser.feed(text, final=True), self.reasoning_parser)

    def stream(self) -> ReplyParser | ForcedToolCalls | None:
        """A parser for the reply's streamed pieces (None: every piece is content)."""
        if self.forced is not None:
            return ForcedToolCalls(self.forced[1], self.reasoning_parser, self.calls_only)
        if self.reasoning_parser or self.tool_parser:
            return ReplyParser(self.reasoning_parser, self.tool_parser, self.schemas)
        return None


def chat_delta(parser: ReplyParser | ForcedToolCalls | None, text: str, finish: str | None) -> dict[str, Any]:
    """A chunk's delta: its text (split by the reasoning and tool-call parsers when on), and the calls it opens
    or adds argument text to."""
    if parser is None:
        return {"content": text} if text or finish is None else {}
    piece = merged(parser.feed(text, final=finish is not None))
    delta: dict[str, Any] = {"reasoning_content": piece.reasoning} if piece.reasoning else {}
    if piece.content:
        delta["content"] = piece.content
    if calls := [d.openai() for d in piece.deltas if d.first or d.arguments]:
        delta["tool_calls"] = calls
    return delta
