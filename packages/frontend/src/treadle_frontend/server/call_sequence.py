"""Replies that are a sequence of call objects, each streamed as call_scanner.py reads it:
- a forced "required" reply, `[{"name": ..., "parameters": {...}}, ...]` (`CallSequence.array()`);
- the llama3_json format (Llama 3.1-3.3's tool prompt): a reply that opens with a JSON object (after an optional
  `<|python_tag|>`) is its calls, `{"name": ..., "parameters": {...}}` each, separated by ";"
  (`Llama3JsonStream`).
Streaming stops at an item the scanner cannot stream (another key first) or at text that is not a separator; what
is left from there (`CallSequence.rest`) is read whole when the reply ends.
"""

from __future__ import annotations

import json

from treadle_frontend.server.call_scanner import WHITESPACE, CallScanner
from treadle_frontend.server.tool_calls import CallDelta, Piece, ToolCall, parse_call


class CallSequence:
    """Call objects between an optional `open` and `close` character, separated by `separator`."""

    def __init__(self, open_: str = "", separator: str = ";", close: str = "") -> None:
        self._open, self._separator, self._close = open_, separator, close
        # open -> item -> scanning -> separator -> item ... -> end; or stopped
        self._state = "open" if open_ else "item"
        self._buf = ""
        self._scanner = CallScanner()
        self._call: CallDelta | None = None
        self.rest = ""  # the text from where streaming stopped
        self.after = ""  # the text after the closing character
        self.count = 0  # the calls streamed

    @classmethod
    def array(cls) -> CallSequence:
        return cls("[", ",", "]")

    @property
    def stopped(self) -> bool:
        return self._state == "stopped"

    def feed(self, text: str) -> list[CallDelta]:
        if self._state in ("stopped", "end"):
            if self._state == "stopped":
                self.rest += text
            else:
                self.after += text
            return []
        self._buf += text
        deltas: list[CallDelta] = []
        while self._state not in ("end", "stopped"):
            if self._state == "scanning":
                if not self._scan(deltas):
                    break
                continue
            self._buf = self._buf.lstrip(WHITESPACE)
            if not self._buf:
                break
            char = self._buf[0]
            if self._state == "open":
                self._expect(char == self._open, "item", 1)
            elif self._state == "item":
                if char == "{":
                    self._state, self._scanner = "scanning", CallScanner()
                else:
                    self._expect(bool(self._close) and char == self._close, "end", 1)
            else:  # after an item
                closing = bool(self._close) and char == self._close
                self._expect(char == self._separator or closing, "end" if closing else "item", 1)
        if self._state == "end":
            self.after, self._buf = self.after + self._buf, ""
        return deltas

    def _expect(self, ok: bool, state: str, consume: int) -> None:
        if ok:
            self._state, self._buf = state, self._buf[consume:]
        else:
            self._state, self.rest, self._buf = "stopped", self._buf, ""

    def _scan(self, deltas: list[CallDelta]) -> bool:
        """Feed the open item; True when it ended (the buffer then holds what follows it)."""
        text = self._buf
        args, end = self._scanner.feed(text)
        self._buf = "" if end is None else text[end:]
        if not self._scanner.streamable:  # read whole at the end, from the item's start
            self._state, self.rest, self._buf = "stopped", self._scanner.head, ""
            return False
        if self._scanner.name is not None and self._call is None:
            self._call = CallDelta.opening(self.count, self._scanner.name, args)
            self.count += 1
            deltas.append(self._call)
        elif args and self._call is not None:
            deltas.append(self._call.then(args))
        if end is None:
            return False
        if self._call is not None:
            deltas.append(self._call.last())
        self._state, self._call = "separator", None
        return True

    def finish(self) -> list[CallDelta]:
        """The open call's last delta (a reply cut short keeps the arguments written)."""
        return [] if self._call is None else [self._call.last(complete=False)]


def json_calls(text: str, separators: str = " \t\r\n;") -> list[ToolCall]:
    """`{...}; {...}` as calls, or none at all when any part is not a call."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            obj, end = decoder.raw_decode(text, at)
        except ValueError:
            return []
        call = parse_call(json.dumps(obj)) if isinstance(obj, dict) else None
        if call is None:
            return []
        calls.append(call)
        at = end
        while at < len(text) and text[at] in separators:
            at += 1
    return calls


class Llama3JsonStream:
    """A reply that opens with `{` (after whitespace and an optional tag) is calls, streamed as they are written;
    any other reply is text, streamed as it comes. Where streaming stops, the rest is read whole at the end: calls
    when it parses as calls, else content after the calls; a reply in which nothing is a call is text, released as
    it was written."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self._all = ""  # the reply so far, while it may still be calls
        self._mode: str | None = None  # "text" or "calls", once the reply's opening decides it
        self._calls = CallSequence()

    @property
    def num_calls(self) -> int:
        return self._calls.count

    def feed(self, text: str) -> list[Piece]:
        if self._mode == "text":
            return [Piece(content=text)] if text else []
        self._all += text
        if self._mode is None:
            head = self._all.lstrip()
            tagged = head.startswith(self.TAG)
            head = head[len(self.TAG) :].lstrip() if tagged else head
            if not head or (not tagged and self.TAG.startswith(head)):
                return []  # only whitespace so far, or what may still be the tag
            if not head.startswith("{"):
                self._mode = "text"
                return [Piece(content=self._all)]
            self._mode, text = "calls", head
        deltas = self._calls.feed(text)
        return [Piece(deltas=deltas)] if deltas else []

    def finish(self) -> list[Piece]:
        if self._mode != "calls":
            return [Piece(content=self._all)] if self._mode is None and self._all else []
        deltas, rest = self._calls.finish(), self._calls.rest
        for call in json_calls(rest) if rest.strip() else []:
            deltas.append(CallDelta.whole(self._calls.count, call))
            self._calls.count += 1
            rest = ""
        if not self._calls.count:  # nothing in it is a call: the reply is text, as it was written
            return [Piece(content=self._all)]
        return [Piece(deltas=deltas), *([Piece(content=rest)] if rest.strip() else [])]
