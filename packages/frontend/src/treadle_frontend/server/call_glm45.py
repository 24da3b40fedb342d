"""The glm45 tool-call format (`--tool-call-parser glm45`, vLLM's name; GLM-4.5 / 4.6's chat template):

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    <arg_key>days</arg_key>
    <arg_value>3</arg_value>
    </tool_call>

The name runs from `<tool_call>` to the first newline (or `<arg_key>`, or `</tool_call>` for a call without
arguments, as GLM-4.7's compact layout writes them). Each value is raw text; it becomes JSON as vLLM's glm45 parser
reads it: a parameter whose schema type is "string" keeps its text exactly; any other (a number, boolean, object,
array, or a parameter the schema does not name) is read, stripped, as JSON, else as a Python literal (`True`,
`['a']`), else it stays a string. A key without a value is skipped, as is stray text between pairs.
A call streams as it is written: its first delta (the name) once the name's line ends; a string value as it comes
(`{"city": "` when it opens, its text JSON-escaped piece by piece, `"` when it closes, as vLLM streams long strings),
any other value once it closes (`, "days": 3`); `}` at `</tool_call>`. A reply cut inside a call keeps what was
written, the open value included. A block whose head is not a function name stays in the content as written. The
content around blocks follows call_text.py. Replies are decoded with special tokens kept (GLM's tags are added
tokens, some marked special: vLLM keeps them too).
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from treadle_frontend.server.call_scanner import WHITESPACE
from treadle_frontend.server.call_text import ContentOut
from treadle_frontend.server.tool_calls import CallDelta, Piece, run_steps, tag_prefix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
KEY, END_KEY = "<arg_key>", "</arg_key>"
VALUE, END_VALUE = "<arg_value>", "</arg_value>"
NAME = re.compile(r"[\w.:\-]{1,256}")  # a function name: longer text, or other characters, is not one
_NOT_JSON = object()


def glm_value(raw: str, schema: Any) -> str:
    """A value's raw text as JSON text, by its parameter's schema (see the module docstring)."""
    if isinstance(schema, dict) and schema.get("type") == "string":
        return json.dumps(raw, ensure_ascii=False)
    value = raw.strip(WHITESPACE)
    for read in (_from_json, _from_python):
        parsed = read(value)
        if parsed is not _NOT_JSON:
            try:
                return json.dumps(parsed, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError):  # a set, bytes, a complex number, NaN: not JSON
                continue
    return json.dumps(value, ensure_ascii=False)


def _from_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return _NOT_JSON


def _from_python(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_JSON


class Glm45Stream:
    """Reply text, fed in pieces, as content and call deltas (see the module docstring)."""

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None) -> None:
        self._schemas = schemas or {}
        self._state = "text"  # text -> name -> args <-> key -> value -> args ... -> text
        self._buf = ""  # text not yet decided (in "name": from OPEN on, content again if it is no call)
        self._out = ContentOut()
        self._call: CallDelta | None = None
        self._key = ""  # the open pair's key
        self._count = 0  # arguments written in the open call
        self._open_string = False  # a string value is being streamed (its opening quote written)
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        return run_steps(self._step)

    def _step(self, pieces: list[Piece]) -> bool:
        """Read what the buffer decides in the current state; True when the state moved on."""
        if self._state == "text":
            self._buf, found = self._out.add_until(pieces, self._buf, OPEN)
            if not found:
                return False
            self._state = "name"  # the buffer keeps OPEN until the block is a call
            return True
        body = self._buf.lstrip(WHITESPACE)
        if self._state == "name":
            return self._read_name(pieces)
        if self._state == "args":  # a pair's key, the block's end, or stray text (skipped)
            if body.startswith(KEY):
                end = body.find(END_KEY)
                if end < 0:
                    self._buf = body
                    return False
                self._key, self._state = body[len(KEY) : end].strip(WHITESPACE), "key"
                self._buf = body[end + len(END_KEY) :]
                return True
            if body.startswith(CLOSE):
                self._close_call(pieces)
                self._state, self._buf = "text", body[len(CLOSE) :]
                return True
            if KEY.startswith(body) or CLOSE.startswith(body):
                self._buf = body
                return False
            skip = body.find("<", 1)
            self._buf = "" if skip < 0 else body[skip:]
            return skip >= 0
        if self._state == "key":  # the key's value opens, or the key stands alone (skipped)
            if body.startswith(VALUE):
                self._state, self._buf = "value", body[len(VALUE) :]
                return True
            self._buf = body
            if VALUE.startswith(body):
                return False
            self._state = "args"
            return True
        end = self._buf.find(END_VALUE)  # value: raw up to its closing tag
        if self._schema_type() == "string":  # streamed as it comes
            held = 0 if end >= 0 else tag_prefix(self._buf, END_VALUE)
            upto = self._buf[:end] if end >= 0 else self._buf[: len(self._buf) - held]
            self._stream_string(pieces, upto, closes=end >= 0)
            self._buf, end = self._buf[len(upto) :], min(end, 0)
        elif end >= 0:
            self._add_argument(pieces, self._buf[:end])
        if end < 0:
            return False
        self._state, self._buf = "args", self._buf[end + len(END_VALUE) :]
        return True

    def _read_name(self, pieces: list[Piece]) -> bool:
        """The block's head: a function name (the call is committed), or not (the block is content)."""
        head = self._buf[len(OPEN) :].lstrip(WHITESPACE)
        ends = [at for at in (head.find("\n"), head.find(KEY), head.find(CLOSE)) if at >= 0]
        if not ends:  # the name may still be being written
            held = max(tag_prefix(head, KEY), tag_prefix(head, CLOSE))
            start = head[: len(head) - held].strip(WHITESPACE)
            if not start or NAME.fullmatch(start):
                return False
            return self._not_a_call(pieces)
        end = min(ends)
        name = head[:end].strip(WHITESPACE)
        if not NAME.fullmatch(name):
            return self._not_a_call(pieces)
        self._out.block_opens()
        self._call = CallDelta.opening(self.num_calls, name, "")
        self.num_calls, self._count = self.num_calls + 1, 0
        pieces.append(Piece(deltas=[self._call]))
        self._state, self._buf = "args", head[end:]
        return True

    def _not_a_call(self, pieces: list[Piece]) -> bool:
        """The open block is no call: its tag is content, as written, and the text after it is read again."""
        self._out.add(pieces, OPEN)
        self._state, self._buf = "text", self._buf[len(OPEN) :]
        return True

    def _add(self, pieces: list[Piece], args: str) -> None:
        assert self._call is not None, "arguments belong to an open call"
        pieces.append(Piece(deltas=[self._call.then(args)]))

    def _schema(self) -> Any:
        """The open pair's parameter schema (None: the tool's schema does not name it)."""
        assert self._call is not None, "a pair belongs to an open call"
        properties = self._schemas.get(self._call.call.name, {}).get("properties")
        return properties.get(self._key) if isinstance(properties, dict) else None

    def _schema_type(self) -> Any:
        schema = self._schema()
        return schema.get("type") if isinstance(schema, dict) else None

    def _pair_head(self) -> str:
        """`{"key": ` for the call's first pair, `, "key": ` after it."""
        return ("{" if not self._count else ", ") + json.dumps(self._key, ensure_ascii=False) + ": "

    def _add_argument(self, pieces: list[Piece], raw: str) -> None:
        self._add(pieces, self._pair_head() + glm_value(raw, self._schema()))
        self._count += 1

    def _stream_string(self, pieces: list[Piece], text: str, closes: bool) -> None:
        """More of a string value's text (JSON-escaped: the same escapes whatever the pieces), and its end."""
        args = "" if self._open_string else self._pair_head() + '"'
        self._open_string = True
        args += json.dumps(text, ensure_ascii=False)[1:-1]
        if closes:
            args += '"'
            self._open_string, self._count = False, self._count + 1
        if args:
            self._add(pieces, args)

    def _close_call(self, pieces: list[Piece]) -> None:
        assert self._call is not None, "a block closes an open call"
        self._add(pieces, "}" if self._count else "{}")
        pieces.append(Piece(deltas=[self._call.last()]))
        self._call = None
        self._out.block_closes()

    def finish(self) -> list[Piece]:
        """The rest when the reply ends: text, an uncommitted block as text, or a cut call's last delta."""
        pieces: list[Piece] = []
        if self._state in ("text", "name"):
            self._out.add(pieces, self._buf)
        elif self._call is not None:
            if self._state == "value":  # cut inside a value: what was written of it
                written = self._buf[: len(self._buf) - tag_prefix(self._buf, END_VALUE)]
                if self._schema_type() == "string":
                    self._stream_string(pieces, written, closes=True)
                else:
                    self._add_argument(pieces, written)
            pieces.append(Piece(deltas=[self._call.last(complete=False)]))
        self._out.finish(pieces, self.num_calls)
        self._state, self._buf, self._call = "text", "", None
        return pieces
