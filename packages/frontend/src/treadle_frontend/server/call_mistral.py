"""The mistral tool-call format (`--tool-call-parser mistral`, vLLM's name). A reply writes the special token
`[TOOL_CALLS]`, then its calls, in one of the two layouts Mistral's tokenizers use:
- `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (tokenizers v3 to v7: Mistral 7B v0.3, Mixtral 8x22B,
  Mistral Nemo, Mistral Small 3.1), streamed by call_sequence.py's array reader;
- `[TOOL_CALLS]name[ARGS]{...}`, the tag repeated before each call (v11 and later: Mistral Small 3.2, Magistral,
  Devstral), the arguments streamed as they are written.
Text before the first tag is content, released as soon as it cannot be the start of the tag. Whatever after a tag
cannot be read as calls stays in the content as it was written (the tag included), so nothing is lost. The tag is
a special token: chat.py decodes such replies with skip_special_tokens off. Call ids are 9 letters and digits,
the only ids Mistral's chat templates accept when a call comes back in the conversation.
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

import json
import random
import string

from treadle_frontend.server.call_scanner import WHITESPACE, JsonNesting
from treadle_frontend.server.call_sequence import CallSequence
from treadle_frontend.server.tool_calls import CallDelta, Piece, ToolCall, parse_call, run_steps, tag_prefix

TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
_MAX_NAME = 256  # longer text between a tag and [ARGS] is not a function name
_ID_CHARS = string.ascii_letters + string.digits


def mistral_call_id() -> str:
    return "".join(random.choices(_ID_CHARS, k=9))


class MistralStream:
    """Content up to the first `[TOOL_CALLS]`, then calls (see the module docstring)."""

    def __init__(self) -> None:
        # text -> tag -> array | name -> args -> between (-> tag ...); stopped: the rest is content
        self._state = "text"
        self._buf = ""  # text read but not yet decided
        self._rest = ""  # stopped: the text from the tag that could not be read as calls
        self._array: CallSequence | None = None
        self._array_start = ""  # the array's text, for the content if it turns out not to be calls
        self._call: CallDelta | None = None
        self._name, self._written = "", ""  # `name[ARGS]`: the name, and the text from the tag as written
        self._nesting = JsonNesting()
        # the whitespace between the content and the tag: it separates any content after the calls
        self._space = ""
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        if self._state == "stopped":
            self._rest += text
            return []
        self._buf += text
        return run_steps(self._step)

    def _step(self, pieces: list[Piece]) -> bool:
        """Read what the buffer decides in the current state; True when the state moved on."""
        if self._state == "text":  # held back: what may begin the tag, and whitespace before it
            at = self._buf.find(TAG)
            text = self._buf[:at] if at >= 0 else self._buf[: len(self._buf) - tag_prefix(self._buf, TAG)]
            released = text.rstrip(WHITESPACE)
            if released:
                pieces.append(Piece(content=released))
            if at < 0:
                self._buf = self._buf[len(released) :]
                return False
            self._state, self._space = "tag", text[len(released) :]
            self._buf = self._buf[at + len(TAG) :]
            return True
        if self._state == "tag":
            body = self._buf.lstrip(WHITESPACE)
            if not body:
                return False
            if body.startswith("["):
                self._array_start = self._buf[: len(self._buf) - len(body)]  # the whitespace after the tag
                self._state, self._array, self._buf = "array", CallSequence.array(), ""
                self._feed_array(body, pieces)
                return False
            self._state = "name"
            return True
        if self._state == "name":  # `name[ARGS]`: wait while the text can still be one
            at = self._buf.find(ARGS)
            head = self._buf[:at] if at >= 0 else self._buf[: len(self._buf) - tag_prefix(self._buf, ARGS)]
            name = head.strip(WHITESPACE)
            if len(name) > _MAX_NAME or (name and not _is_name(name)) or (at >= 0 and not name):
                return self._stop()
            if at < 0:
                return False
            self._name, self._written = name, TAG + self._buf[: at + len(ARGS)]
            self._state, self._buf = "args", self._buf[at + len(ARGS) :]
            return True
        if self._state == "args":
            if self._call is None:  # the call is committed when its arguments open with `{`
                body = self._buf.lstrip(WHITESPACE)
                if not body:
                    return False
                if not body.startswith("{"):  # not JSON arguments: content, as written
                    self._state, self._rest, self._buf = "stopped", self._written + self._buf, ""
                    return False
                self._call = CallDelta.opening(self.num_calls, self._name, "")
                self._call.call.id = mistral_call_id()
                self._nesting, self.num_calls, self._buf = JsonNesting(), self.num_calls + 1, body
                pieces.append(Piece(deltas=[self._call]))
            end = self._nesting.feed(self._buf)
            args, self._buf = (self._buf, "") if end is None else (self._buf[:end], self._buf[end:])
            if args:
                pieces.append(Piece(deltas=[self._call.then(args)]))
            if end is None:
                return False
            pieces.append(Piece(deltas=[self._call.last()]))
            self._state, self._call = "between", None
            return True
        if self._state == "between":  # after a call: another tag, or text (content)
            body = self._buf.lstrip(WHITESPACE)
            if body.startswith(TAG):
                self._state, self._buf = "tag", body[len(TAG) :]
                return True
            if TAG.startswith(body):  # nothing yet, or what may still be the tag
                return False
            self._buf = body
            return self._stop()
        if self._state == "array":
            self._feed_array(self._buf, pieces)
            self._buf = ""
        return False

    def _feed_array(self, text: str, pieces: list[Piece]) -> None:
        assert self._array is not None
        self._array_start += text
        deltas = self._array.feed(text)
        for delta in deltas:
            if delta.first:
                delta.call.id = mistral_call_id()
        self.num_calls = max(self.num_calls, self._array.count)
        if deltas:
            pieces.append(Piece(deltas=deltas))

    def _stop(self) -> bool:
        """What follows cannot be calls: it is content, as written (from the tag, if no call was read yet)."""
        self._rest = (TAG if self._state in ("tag", "name") else "") + self._buf
        self._state, self._buf = "stopped", ""
        return False

    def finish(self) -> list[Piece]:
        pieces: list[Piece] = []
        if self._state == "text":
            return [Piece(content=self._buf)] if self._buf else []
        if self._state in ("tag", "name"):
            return [Piece(content=self._space + TAG + self._buf)]
        if self._state == "args":  # cut short: the arguments written so far (none yet: content, as written)
            if self._call is None:
                return [Piece(content=self._space + self._written + self._buf)]
            return [Piece(deltas=[self._call.last(complete=False)])]
        if self._state == "array" and self._array is not None:
            deltas = self._array.finish()
            rest = self._array.rest
            for call in _array_calls(rest) if rest.strip() else []:
                call.id = mistral_call_id()
                deltas.append(CallDelta.whole(self.num_calls, call))
                self.num_calls += 1
                rest = ""
            if not self.num_calls:  # nothing in it was a call: the reply is text, as written
                return [Piece(content=self._space + TAG + self._array_start)]
            pieces.append(Piece(deltas=deltas))
            self._rest = rest + self._array.after.lstrip(WHITESPACE)
        text = self._rest + (self._buf if self._state == "between" else "")
        return [*pieces, Piece(content=self._space + text)] if text.strip() else pieces


def _is_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-." for c in name)


def _array_calls(text: str) -> list[ToolCall]:
    """`[{...}, ...]` or the items left of one (`{...}, {...}]`) as calls, or none when any part is not a call."""
    body = text.strip()
    body = body if body.startswith("[") else "[" + body.removeprefix(",")
    try:
        items = json.loads(body)
    except ValueError:
        return []
    calls = [parse_call(json.dumps(item)) if isinstance(item, dict) else None for item in items]
    return [c for c in calls if c is not None] if all(calls) else []
