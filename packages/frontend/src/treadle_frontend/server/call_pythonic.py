"""The pythonic tool-call format (`--tool-call-parser pythonic`, vLLM's name; Llama 3.2's light models and Llama 4,
the latter between `<|python_start|>` and `<|python_end|>`): a reply that is a Python list of calls,

    [get_weather(city="Paris", days=3), get_time(zone='CET')]

each argument a keyword with a literal value (string, number, boolean, None, list, dict). A reply that does not
open with `[` (after whitespace and the optional start tag) is text, released as it comes. Calls are released
whole, each as soon as its closing parenthesis is read (Python's own parser reads it, its values become JSON).
Streaming stops at an item that is not such a call; what follows stays in the content as it was written, and a
reply in which nothing is a call is text, as written. Text after the list's `]` (the end tag aside) is content.
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

import ast
import json

from treadle_frontend.server.call_scanner import WHITESPACE
from treadle_frontend.server.tool_calls import CallDelta, Piece, ToolCall

START, END = "<|python_start|>", "<|python_end|>"


def parse_python_call(text: str) -> ToolCall | None:
    """`name(key=literal, ...)` as a call, or None."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    args = {}
    for keyword in node.keywords:
        if keyword.arg is None:  # **kwargs
            return None
        try:
            args[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, SyntaxError, TypeError):
            return None
    try:
        return ToolCall(node.func.id, json.dumps(args, ensure_ascii=False))
    except (TypeError, ValueError):  # a literal JSON cannot hold (a set, bytes, a complex number)
        return None


class _Nesting:
    """Brackets and Python string literals (single, double, triple quoted; escapes) as text arrives."""

    def __init__(self) -> None:
        self.depth = 0
        self._quote = ""  # the open string's quote ('', or ' " ''' \"\"\")
        self._escaped = False

    def step(self, text: str, at: int, final: bool) -> int:
        """Read one token of `text` at `at`; returns how many characters it took (0: needs more text, which
        `final` says there is not)."""
        c = text[at]
        short = not final and len(text) - at < 3  # a triple quote may still be forming
        if self._quote:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif text.startswith(self._quote, at):
                n, self._quote = len(self._quote), ""
                return n
            elif short and len(self._quote) == 3 and c == self._quote[0]:
                return 0
            return 1
        if c in "'\"":
            if short:
                return 0
            self._quote = c * 3 if text.startswith(c * 3, at) else c
            return len(self._quote)
        if c in "([{":
            self.depth += 1
        elif c in ")]}":
            self.depth -= 1
        return 1


class PythonicStream:
    """Reply text, fed in pieces, as content and call deltas (see the module docstring)."""

    def __init__(self) -> None:
        self._mode: str | None = None  # "text" or "calls", once the reply's opening decides it
        self._all = ""  # the reply so far while it may be calls
        self._at = 0  # calls mode: how far _all is read
        self._item = 0  # where the open item starts in _all
        self._nesting = _Nesting()
        self._stopped = -1  # where streaming stopped (an item that is no call), or -1
        self._closed = -1  # just past the list's `]`, or -1
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        if self._mode == "text":
            return [Piece(content=text)] if text else []
        self._all += text
        if self._mode is None:
            head = self._all.lstrip(WHITESPACE)
            tagged = head.startswith(START)
            head = head[len(START) :].lstrip(WHITESPACE) if tagged else head
            if not head or (not tagged and START.startswith(head)):
                return []  # only whitespace so far, or what may still be the start tag
            if not head.startswith("["):
                self._mode = "text"
                return [Piece(content=self._all)]
            self._mode, self._at = "calls", len(self._all) - len(head)
            self._item = self._at + 1
        return self._read(final=False)

    def _read(self, final: bool) -> list[Piece]:
        deltas: list[CallDelta] = []
        text = self._all
        while self._stopped < 0 and self._closed < 0 and self._at < len(text):
            depth_before = self._nesting.depth
            taken = self._nesting.step(text, self._at, final)
            if taken == 0:
                break
            char, self._at = text[self._at], self._at + taken
            depth = self._nesting.depth
            if depth_before == 1 and depth == 1 and char == ",":  # between items
                if text[self._item : self._at - 1].strip(WHITESPACE):  # an item that is no call
                    self._stopped = self._item
                self._item = self._at
            elif depth_before == 2 and depth == 1 and char == ")":  # an item's call closed
                call = parse_python_call(text[self._item : self._at])
                if call is None:
                    self._stopped = self._item
                else:
                    deltas.append(CallDelta.whole(self.num_calls, call))
                    self.num_calls, self._item = self.num_calls + 1, self._at  # only a separator may follow
            elif depth == 0:  # the list closed
                self._closed = self._at
                if text[self._item : self._at - 1].strip(WHITESPACE + ","):  # an item that is no call
                    self._stopped = self._item
        return [Piece(deltas=deltas)] if deltas else []

    def finish(self) -> list[Piece]:
        if self._mode != "calls":
            return [Piece(content=self._all)] if self._mode is None and self._all else []
        pieces = self._read(final=True)
        if not self.num_calls:  # nothing in it was a call: the reply is text, as written
            return [Piece(content=self._all)]
        if self._stopped >= 0:
            rest = self._all[self._stopped :]
        elif self._closed >= 0:
            rest = self._all[self._closed :].strip(WHITESPACE).removeprefix(END)
        else:  # cut short inside the list: an unfinished item is what was written of it
            rest = self._all[self._item :]
        rest = rest.strip(WHITESPACE)
        return [*pieces, Piece(content=rest)] if rest else pieces
