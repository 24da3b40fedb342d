"""The granite tool-call format (`--tool-call-parser granite`, vLLM's name; IBM Granite 3.x's chat templates): a
tag, then a JSON array of calls,

    <|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]

Granite 3.0 writes the special token `<|tool_call|>`, Granite 3.1 and later the text `<tool_call>`; both are read
(these replies are decoded with special tokens kept). As vLLM reads them, a reply that opens with `[` is an array of
calls too (the tag decoded away). Text before the tag is content (vLLM reads only a reply that opens with the
tag; one that writes a sentence first keeps it here), released as soon as it cannot be the start of a tag. The
array streams as call_sequence.py reads it (the arguments as they are written); items it cannot stream are read
whole when the array closes. An array in which nothing is a call stays in the content as written, tag included;
text after the array's `]` (a `</tool_call>` closing the text tag aside) is content, and a further tag opens
further calls. The content around blocks follows call_text.py. Phi-4-mini's `functools[...]` (call_phi4.py) is the
same reading under another `Layout`.
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from treadle_frontend.server.call_scanner import WHITESPACE, JsonNesting
from treadle_frontend.server.call_sequence import CallSequence
from treadle_frontend.server.call_text import ContentOut
from treadle_frontend.server.tool_calls import CallDelta, Piece, ToolCall, parse_call, run_steps, tag_prefix

TOKEN_TAG, TEXT_TAG = "<|tool_call|>", "<tool_call>"
TAGS = (TOKEN_TAG, TEXT_TAG)
TEXT_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class Layout:
    """Where a format's arrays of calls stand in the reply."""

    tags: tuple[str, ...]  # the texts that open an array of calls
    bare: bool  # a reply that opens with `[` is an array of calls (the tag decoded away)
    gap: bool  # whitespace may stand between a tag and its `[`
    closes: tuple[str, str] | None = None  # (tag, closing tag dropped after that tag's calls)


GRANITE = Layout(TAGS, bare=True, gap=True, closes=(TEXT_TAG, TEXT_CLOSE))


def array_calls(text: str) -> list[ToolCall]:
    """The items left of an array (`{...}, {...}]`, or the whole `[...]`) as calls; none when any is not a call."""
    body = text.strip(WHITESPACE)
    body = body if body.startswith("[") else "[" + body.removeprefix(",")
    try:
        items = json.loads(body)
    except ValueError:
        return []
    calls = [parse_call(json.dumps(item)) if isinstance(item, dict) else None for item in items]
    return [c for c in calls if c is not None] if calls and all(calls) else []


class GraniteStream:
    """Reply text, fed in pieces, as content and call deltas (see the module docstring)."""

    def __init__(self, layout: Layout = GRANITE) -> None:
        self._layout = layout
        self._state = "start"  # start -> text -> tag -> array -> after -> text ...
        self._buf = ""  # text not yet decided
        self._out = ContentOut()
        self._tag = ""  # the open block's tag ("" for a bare array at the reply's start)
        self._written = ""  # the open block's text as written: content if nothing in it is a call
        self._array: CallSequence | None = None
        self._nesting = JsonNesting()  # finds the array's closing `]`
        self._first = 0  # the index of the open block's first call
        self._closing = False  # the layout's closing tag after the array (`</tool_call>`) is no content
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        return run_steps(self._step)

    def _step(self, pieces: list[Piece]) -> bool:
        """Read what the buffer decides in the current state; True when the state moved on."""
        if self._state == "start":  # a bare array at the reply's start, or text
            body = self._buf.lstrip(WHITESPACE)
            if not body:
                return False
            self._state = "text"
            if self._layout.bare and body.startswith("["):
                self._open_array(pieces, "", self._buf[: len(self._buf) - len(body)], body)
            return True
        if self._state == "text":
            hits = [(at, tag) for tag in self._layout.tags if (at := self._buf.find(tag)) >= 0]
            if not hits:
                cut = len(self._buf) - max(tag_prefix(self._buf, tag) for tag in self._layout.tags)
                self._out.add(pieces, self._buf[:cut])
                self._buf = self._buf[cut:]
                return False
            at, tag = min(hits)
            self._out.add(pieces, self._buf[:at])
            self._state, self._tag, self._buf = "tag", tag, self._buf[at + len(tag) :]
            return True
        if self._state == "tag":  # the array opens, or the tag was text
            body = self._buf.lstrip(WHITESPACE) if self._layout.gap else self._buf
            if not body:
                return False
            if body.startswith("["):
                self._open_array(pieces, self._tag, self._buf[: len(self._buf) - len(body)], body)
            else:
                self._out.add(pieces, self._tag)
                self._state = "text"
            return True
        if self._state == "after":  # the text tag's closing tag, if it follows calls, is no content
            body, close = self._buf.lstrip(WHITESPACE), self._close
            if self._closing and body.startswith(close):
                self._buf = body[len(close) :]
            elif self._closing and close.startswith(body):
                return False
            self._state = "text"
            return True
        if self._state == "array":
            text, self._buf = self._buf, ""
            self._feed_array(pieces, text)
        return self._state != "array"

    @property
    def _close(self) -> str:
        """The closing tag dropped after the open block's calls ("" when the layout has none)."""
        return self._layout.closes[1] if self._layout.closes else ""

    def _open_array(self, pieces: list[Piece], tag: str, space: str, body: str) -> None:
        self._state, self._tag, self._written, self._buf = "array", tag, tag + space, ""
        self._array, self._nesting, self._first = CallSequence.array(), JsonNesting(), self.num_calls
        self._array.count = self.num_calls
        self._feed_array(pieces, body)

    def _feed_array(self, pieces: list[Piece], text: str) -> None:
        """Array text: the calls it streams; at the array's `]`, those read whole, and the text after it."""
        assert self._array is not None, "array text belongs to an open array"
        end = self._nesting.feed(text)
        inside = text if end is None else text[:end]
        self._written += inside
        self._release(pieces, self._array.feed(inside))
        if end is not None:
            self._close_array(pieces)
            self._state, self._buf = "after", text[end:] + self._buf

    def _close_array(self, pieces: list[Piece]) -> None:
        """The array ended (closed, or cut by the reply's end): calls read whole, or the block as content."""
        assert self._array is not None, "an open array ends"
        deltas, rest = self._array.finish(), self._array.rest
        for call in array_calls(rest) if rest.strip(WHITESPACE) else []:
            deltas.append(CallDelta.whole(self._array.count, call))
            self._array.count += 1
            rest = ""
        self._release(pieces, deltas)
        closes = self._layout.closes
        self._closing = closes is not None and self._tag == closes[0] and self.num_calls > self._first
        if self.num_calls == self._first:  # nothing in it was a call: content, as written
            self._out.add(pieces, self._written)
        else:
            self._out.block_closes()
            if rest.strip(WHITESPACE):  # what could not be read after the calls
                self._out.add(pieces, rest)
        self._array = None

    def _release(self, pieces: list[Piece], deltas: list[CallDelta]) -> None:
        if not deltas:
            return
        if self.num_calls == self._first:
            self._out.block_opens()
        assert self._array is not None, "calls come from an open array"
        self.num_calls = self._array.count
        pieces.append(Piece(deltas=deltas))

    def finish(self) -> list[Piece]:
        """The rest when the reply ends: text, a lone tag as text, or the open array's calls."""
        pieces: list[Piece] = []
        if self._state == "array":
            self._close_array(pieces)
        elif self._state == "tag":
            self._out.add(pieces, self._tag + self._buf)
        elif self._state == "after":  # a whole closing tag is no content
            body = self._buf.lstrip(WHITESPACE)
            self._out.add(pieces, body.removeprefix(self._close) if self._closing else self._buf)
        else:
            self._out.add(pieces, self._buf)
        self._out.finish(pieces, self.num_calls)
        self._state, self._buf, self._array = "start", "", None
        return pieces
