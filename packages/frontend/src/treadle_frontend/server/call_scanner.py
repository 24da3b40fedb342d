"""Reading one tool call's JSON object as it is written, so that its arguments can stream while the model writes
them: `{"name": "get_weather", "arguments": {"city": "Par` already says which function is called and the first
characters of its arguments.

A call streams once its head is read: `{`, the key `"name"` with a string value, then `"arguments"` (or
`"parameters"`) whose value opens with `{`. From there every character up to the arguments' matching `}` is
argument text (strings and escapes tracked, so braces inside strings do not count), and the object's remaining
keys are read to its own closing `}`. Any other shape (another key first, string-valued arguments, not JSON) is
not streamable: `CallScanner.feed` says so and the caller reads the call whole once it is complete.
"""

from __future__ import annotations

import json
from enum import Enum

WHITESPACE = " \t\r\n"
ARGUMENT_KEYS = ('"arguments"', '"parameters"')


class Head(Enum):
    MORE = "more"  # the text so far could still open a streamable call
    NO = "no"  # it cannot


def read_head(text: str) -> tuple[str, int] | Head:
    """(the function name, the index of the arguments' opening `{`) once `text` holds a streamable call's head."""
    at, name = 0, ""
    for expect in ("{", ('"name"',), ":", None, ",", ARGUMENT_KEYS, ":", "{"):
        while at < len(text) and text[at] in WHITESPACE:
            at += 1
        if expect is None:  # the name: a JSON string
            if at == len(text):
                return Head.MORE
            if text[at] != '"':
                return Head.NO
            end = _string_end(text, at + 1)
            if end is None:
                return Head.MORE
            try:
                name = json.loads(text[at:end])
            except ValueError:
                return Head.NO
            at = end
            continue
        options = (expect,) if isinstance(expect, str) else expect
        rest = text[at:]
        hit = next((o for o in options if rest.startswith(o)), None)
        if hit is None:
            return Head.MORE if any(o.startswith(rest) for o in options) else Head.NO
        at += len(hit)
    return name, at - 1


def _string_end(text: str, at: int) -> int | None:
    """The index just past the closing quote of the JSON string whose body starts at `at` (None: not closed)."""
    escaped = False
    for i in range(at, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            return i + 1
    return None


class JsonNesting:
    """Tracks how deep a JSON text nests as it arrives; `feed` finds where the depth returns to zero."""

    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> int | None:
        """The index just past the character of `text` that closes the outermost value (None: still open)."""
        for i, c in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


class CallScanner:
    """One call object, fed in pieces: `name` is set once the head is read (the call is committed from then on),
    `feed` returns the argument text each piece adds and, once the object is closed, where in that piece it
    ended."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.streamable = True  # False once the head cannot be a streamable call's
        self._head = ""
        self._args = JsonNesting()
        self._object = JsonNesting(depth=1)  # the call object's own keys after the arguments
        self._in_args = False

    @property
    def head(self) -> str:
        """The text read before the call was committed (all of it, when it is not streamable)."""
        return self._head

    def feed(self, text: str) -> tuple[str, int | None]:
        """(argument text added by `text`, the index in `text` just past the call object's `}` or None)."""
        if not self.streamable:
            return "", None
        start = 0
        if self.name is None:
            before = len(self._head)
            self._head += text
            head = read_head(self._head)
            if head is Head.MORE:
                return "", None
            if head is Head.NO:
                self.streamable = False
                return "", None
            self.name, brace = head
            start, self._in_args = brace - before, True
        if self._in_args:
            end = self._args.feed(text[start:])
            if end is None:
                return text[start:], None
            self._in_args = False
            args, start = text[start : start + end], start + end
        else:
            args = ""
        end = self._object.feed(text[start:])
        return args, None if end is None else start + end
