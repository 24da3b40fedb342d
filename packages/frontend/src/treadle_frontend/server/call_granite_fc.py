"""IBM granite-20b-functioncalling's tool-call format (`--tool-call-parser granite-20b-fc`, vLLM's name): each call
is the tag `<function_call>`, then one JSON object; several calls are several tags in a row,

    Let me check both.
    <function_call> {"name": "get_weather", "arguments": {"city": "Paris"}}
    <function_call> {"name": "get_time", "arguments": {"zone": "CET"}}

The tag is plain text (not a special token). Text before the first tag is content, released as soon as it cannot
be the start of a tag. After a tag (and any whitespace) a `{` opens the call's object; anything else leaves the tag
in the content as text. The object streams as call_scanner.py reads it: once its name and the `{` opening its
arguments (or "parameters") are read the call is committed and its arguments stream as written; an object of
another shape (another key first, string-valued arguments) is read whole when its closing `}` comes (strings and
escapes tracked), and when it is no call (not JSON, no name, no arguments) it stays in the content as written, tag
included. Text after an object is content; a further tag opens a further call. A reply that ends inside a
committed call keeps the arguments written (complete only when they parse as JSON); one that ends inside an
uncommitted object, or right after a tag, keeps that text as content. The content around calls follows
call_text.py (the newlines between the tags are not content).
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

from treadle_frontend.server.call_scanner import WHITESPACE, CallScanner, JsonNesting
from treadle_frontend.server.call_text import ContentOut
from treadle_frontend.server.tool_calls import CallDelta, Piece, parse_call, run_steps

TAG = "<function_call>"


class GraniteFcStream:
    """Reply text, fed in pieces, as content and call deltas (see the module docstring)."""

    def __init__(self) -> None:
        self._state = "text"  # text -> tag -> object -> text ...
        self._buf = ""  # text not yet decided
        self._out = ContentOut()
        self._written = ""  # the open block's text as written, tag included: content if it is no call
        self._scanner = CallScanner()  # the open object's: streams a call's arguments
        self._nesting = JsonNesting()  # finds the open object's closing `}`
        self._call: CallDelta | None = None  # the open object's committed call (its latest delta)
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        """The pieces this text decides."""
        self._buf += text
        return run_steps(self._step)

    def _step(self, pieces: list[Piece]) -> bool:
        """Read what the buffer decides in the current state; True when the state moved on."""
        if self._state == "text":
            self._buf, found = self._out.add_until(pieces, self._buf, TAG)
            if not found:
                return False
            self._state, self._written, self._buf = "tag", TAG, self._buf[len(TAG) :]
            return True
        if self._state == "tag":  # the object opens, or the tag was text
            body = self._buf.lstrip(WHITESPACE)
            if not body:
                return False
            if body.startswith("{"):
                self._written += self._buf[: len(self._buf) - len(body)]
                self._state, self._buf, self._call = "object", body, None
                self._scanner, self._nesting = CallScanner(), JsonNesting()
            else:
                self._out.add(pieces, TAG)
                self._state = "text"
            return True
        text, self._buf = self._buf, ""
        end = self._nesting.feed(text)
        self._read(pieces, text if end is None else text[:end])
        if end is None:
            return False
        self._close(pieces)
        self._state, self._buf = "text", text[end:]
        return True

    def _read(self, pieces: list[Piece], text: str) -> None:
        """Object text: the call's first delta once its head is read, then the argument text each piece adds."""
        self._written += text
        args, _ = self._scanner.feed(text)
        if self._call is None and self._scanner.name is not None:
            self._out.block_opens()
            self._call = CallDelta.opening(self.num_calls, self._scanner.name, args)
            self.num_calls += 1
            pieces.append(Piece(deltas=[self._call]))
        elif self._call is not None and args:
            self._call = self._call.then(args)
            pieces.append(Piece(deltas=[self._call]))

    def _close(self, pieces: list[Piece]) -> None:
        """The object closed: the committed call's last delta, a call read whole, or the block as content."""
        if self._call is not None:
            pieces.append(Piece(deltas=[self._call.last()]))
        elif (call := parse_call(self._written[len(TAG) :])) is not None:
            self._out.block_opens()
            pieces.append(Piece(deltas=[CallDelta.whole(self.num_calls, call)]))
            self.num_calls += 1
        else:
            self._out.add(pieces, self._written)
            self._written = ""
            return
        self._out.block_closes()
        self._written, self._call = "", None

    def finish(self) -> list[Piece]:
        """The rest when the reply ends: text, a lone tag or an uncommitted object as text, or a cut call's end."""
        pieces: list[Piece] = []
        if self._state == "object" and self._call is not None:
            pieces.append(Piece(deltas=[self._call.last_if_json()]))
        elif self._state == "object":
            self._out.add(pieces, self._written)
        else:  # in "tag" the tag is not in the buffer
            self._out.add(pieces, (TAG if self._state == "tag" else "") + self._buf)
        self._out.finish(pieces, self.num_calls)
        self._state, self._buf, self._written, self._call = "text", "", "", None
        return pieces
