"""The qwen3_coder tool-call format (`--tool-call-parser qwen3_coder`, vLLM's name; Qwen3-Coder's chat template):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A parameter's value is raw text (one newline after its opening tag and one before its closing tag are layout). It
becomes JSON by the type the request's tool schema gives that parameter: a string stays a string; any other type
is read as JSON, and a value that does not parse stays a string (as vLLM converts them); a parameter the schema
does not name is read as JSON when it parses to a number, boolean, null, array or object.
A call streams as it is written: its first delta (the name) once `<function=NAME>` is read, `{"city": "Paris"` once
a parameter closes, `, "next": ...` for each one after, `}` at `</function>`; a reply cut inside a call keeps what
was written, the open parameter's value included. Text outside blocks is content; the whitespace around blocks is
not, when the reply made calls (as in the hermes format). A block that does not open with `<function=NAME>` stays
in the content as it was written.
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from treadle_frontend.server.call_scanner import WHITESPACE
from treadle_frontend.server.tool_calls import CallDelta, Piece, add_text, run_steps, tag_prefix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION, END_FUNCTION = "<function=", "</function>"
PARAMETER, END_PARAMETER = "<parameter=", "</parameter>"
_NAME = re.compile(r"[^<>\n]{1,256}")


def tool_schemas(tools: list[Any] | None) -> dict[str, dict[str, Any]]:
    """Each tool's parameter schema by name, from OpenAI (`function.parameters`) or Anthropic (`input_schema`)
    tool definitions."""
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            schema = fn.get("parameters") or fn.get("input_schema") or {}
            schemas[fn["name"]] = schema if isinstance(schema, dict) else {}
    return schemas


def _json_value(raw: str, schema: dict[str, Any] | None) -> str:
    """A parameter's raw text as JSON text, by its schema's type (see the module docstring)."""
    value = raw.removeprefix("\n").removesuffix("\n")
    types = (schema or {}).get("type")
    types = types if isinstance(types, list) else [types]
    if value.strip().lower() == "null":  # null for any type (a string parameter too, as vLLM reads it)
        return "null"
    if "string" in types or (schema is not None and not any(types)):
        return json.dumps(value, ensure_ascii=False)
    if "boolean" in types and value.strip().lower() in ("true", "false"):  # Python's True / False too
        return value.strip().lower()
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = _python_literal(value)  # ['a', 'b'] or {'k': 1}, as a model may write them
        if parsed is None:
            return json.dumps(value, ensure_ascii=False)
    if schema is None and isinstance(parsed, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(parsed, ensure_ascii=False)


def _python_literal(value: str) -> Any:
    """A Python list, dict or tuple literal as a JSON value (None when `value` is not one, or holds no JSON)."""
    try:
        parsed = ast.literal_eval(value.strip())
        json.dumps(parsed)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return list(parsed) if isinstance(parsed, tuple) else parsed if isinstance(parsed, (list, dict)) else None


class Qwen3CoderStream:
    """Reply text, fed in pieces, as content and call deltas (see the module docstring)."""

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None) -> None:
        self._schemas = schemas or {}
        self._state = "text"  # text -> block -> function <-> parameter; function -> done -> text
        self._buf = ""  # text not yet decided
        self._space = ""  # whitespace held back after content
        self._after_block = False  # no content since a block ended (the whitespace after it is not content)
        # content was released (the whitespace before a block then separates it from what follows)
        self._wrote = False
        self._call: CallDelta | None = None
        self._param = ""  # the open parameter's name
        self._count = 0  # parameters written in the open call
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        return run_steps(self._step)

    def _step(self, pieces: list[Piece]) -> bool:
        """Read what the buffer decides in the current state; True when the state moved on."""
        body = self._buf.lstrip(WHITESPACE)
        if self._state == "text":
            at = self._buf.find(OPEN)
            cut = at if at >= 0 else len(self._buf) - tag_prefix(self._buf, OPEN)
            self._content(pieces, self._buf[:cut])
            self._buf = self._buf[cut:]
            if at < 0:
                return False
            self._state = "block"  # the buffer keeps OPEN until the block is a call
            return True
        if self._state == "block":  # OPEN, then `<function=NAME>`
            head = self._buf[len(OPEN) :].lstrip(WHITESPACE)
            end = head.find(">")
            if head.startswith(FUNCTION) and end >= 0:
                name = head[len(FUNCTION) : end]
                if not _NAME.fullmatch(name):
                    return self._not_a_call(pieces)
                self._call = CallDelta.opening(self.num_calls, name, "")
                self.num_calls, self._count = self.num_calls + 1, 0
                self._space = self._space if self._wrote else ""  # no content yet: nothing to separate
                pieces.append(Piece(deltas=[self._call]))
                self._state, self._buf = "function", head[end + 1 :]
                return True
            if head.startswith(FUNCTION) and len(head) <= len(FUNCTION) + 256 and "\n" not in head:
                return False  # the name is still being written
            return False if FUNCTION.startswith(head) else self._not_a_call(pieces)
        if self._state == "function":
            if body.startswith(PARAMETER):
                end = body.find(">")
                if end < 0:
                    self._buf = body
                    return False
                self._param, self._state, self._buf = body[len(PARAMETER) : end], "parameter", body[end + 1 :]
                return True
            if body.startswith(END_FUNCTION):
                self._add(pieces, "}" if self._count else "{}")
                assert self._call is not None
                pieces.append(Piece(deltas=[self._call.last()]))
                self._call, self._state, self._buf = None, "done", body[len(END_FUNCTION) :]
                return True
            if PARAMETER.startswith(body) or END_FUNCTION.startswith(body):
                self._buf = body
                return False
            skip = body.find("<", 1)  # stray text between parameters: skipped
            self._buf = "" if skip < 0 else body[skip:]
            return skip >= 0
        if self._state == "parameter":  # the value ends at `</parameter>`, or where a model that left it out
            ends = [
                (at, tag)
                for tag in (END_PARAMETER, PARAMETER, END_FUNCTION)
                if (at := self._buf.find(tag)) >= 0
            ]
            if not ends:  # goes on: the next parameter or the function's end (as vLLM reads them)
                return False
            end, tag = min(ends)
            self._add_parameter(pieces, self._buf[:end])
            self._state = "function"
            self._buf = self._buf[end + len(END_PARAMETER) :] if tag == END_PARAMETER else self._buf[end:]
            return True
        # done: the call's `</function>` is read; CLOSE ends the block (text instead: the block was left open)
        if body.startswith(CLOSE):
            self._state, self._buf, self._after_block = "text", body[len(CLOSE) :], True
            return True
        if CLOSE.startswith(body):
            return False
        self._state, self._buf, self._after_block = "text", body, True
        return True

    def finish(self) -> list[Piece]:
        """The rest when the reply ends: text, an unfinished block as text, or a cut call's last delta."""
        pieces: list[Piece] = []
        if self._state == "text" or self._state == "block":
            self._content(pieces, self._buf)
        elif self._state in ("function", "parameter") and self._call is not None:
            if self._state == "parameter":  # cut inside a value: what was written of it
                self._add_parameter(pieces, self._buf)
            pieces.append(Piece(deltas=[self._call.last(complete=False)]))
        elif self._state == "done" and not CLOSE.startswith(self._buf.lstrip(WHITESPACE)):
            self._content(pieces, self._buf.lstrip(WHITESPACE))
        if self._space and not self.num_calls:
            pieces.append(Piece(content=self._space))
        self._state, self._buf, self._space, self._call = "text", "", "", None
        return pieces

    def _add(self, pieces: list[Piece], args: str) -> None:
        assert self._call is not None
        pieces.append(Piece(deltas=[self._call.then(args)]))

    def _add_parameter(self, pieces: list[Piece], raw: str) -> None:
        assert self._call is not None
        properties = self._schemas.get(self._call.call.name, {}).get("properties")
        schema = properties.get(self._param) if isinstance(properties, dict) else None
        key = json.dumps(self._param.strip(), ensure_ascii=False)
        self._add(pieces, ("{" if not self._count else ", ") + f"{key}: {_json_value(raw, schema)}")
        self._count += 1

    def _not_a_call(self, pieces: list[Piece]) -> bool:
        """The open block is not a call: its text is content, as written."""
        self._state = "text"
        self._content(pieces, self._buf[: len(OPEN)])
        self._buf = self._buf[len(OPEN) :]
        return True

    def _content(self, pieces: list[Piece], text: str) -> None:
        """Release text, holding back its trailing whitespace (dropped before a call, kept before more text)."""
        if self._after_block:
            text = text.lstrip(WHITESPACE)
            self._after_block = not text
        text = self._space + text
        kept = text.rstrip(WHITESPACE)
        self._space = text[len(kept) :]
        self._wrote = self._wrote or bool(kept)
        add_text(pieces, kept)
