"""Tool calls in chat replies: `treadle serve --enable-auto-tool-choice --tool-call-parser hermes`, vLLM's flags.

The hermes format (the Hermes, Qwen2.5 and Qwen3 chat templates) writes each call into the reply text as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. `ToolCallStream` turns reply text, fed whole or in
streamed deltas, into pieces of content and `CallDelta`s, in order:
- text is released as soon as it cannot be the start of a block;
- a call streams as it is written (call_scanner.py): once its name and the `{` opening its arguments are read it
  is committed, and each piece adds the argument text written so far (the call's `arguments` are that text, as the
  model wrote it); its last delta comes when the block closes, or when the reply ends inside it (a call cut short
  by max_tokens keeps the arguments written, as OpenAI returns them);
- a block of another shape (string-valued arguments, another key first) is read whole when it closes: a JSON
  object with a string `name` is a call (one delta, first and last), anything else stays in the content as it was
  written, as vLLM leaves output it cannot parse as text; so does an uncommitted block when the reply ends;
- trailing whitespace is held until other text follows, and dropped at the end when the reply made calls (the
  newlines around blocks are not content).
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treadle_frontend.server.call_scanner import CallScanner

# hermes: here; llama3_json: call_sequence.py; openai (gpt-oss's harmony format): harmony.py; qwen3_coder:
# call_xml.py; deepseek_v3, deepseek_v31 and kimi_k2: call_deepseek.py; granite-20b-fc: call_granite_fc.py;
# phi4_mini_json: call_phi4.py; the others: call_NAME.py
PARSERS = (
    "hermes", "llama3_json", "mistral", "openai", "pythonic", "qwen3_coder", "glm45", "granite", "deepseek_v3",
    "deepseek_v31", "kimi_k2", "granite-20b-fc", "phi4_mini_json",
)  # fmt: skip
# formats marked by special tokens: replies keep special tokens in their text
SPECIAL_TOKEN_PARSERS = ("deepseek_v3", "deepseek_v31", "glm45", "granite", "kimi_k2", "mistral", "openai")
OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex[:24]}")
    complete: bool = True  # False: the reply ended inside the call (its arguments are as far as they got)

    def json(self) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class CallDelta:
    """One step of a streamed call: the first names it, each adds `arguments` (text appended to the call's), the
    last (`done`) completes it. A call read whole is one delta, first and done."""

    index: int  # the call's place among the reply's calls
    call: ToolCall  # its arguments grow with each delta
    arguments: str
    first: bool = False
    done: bool = False

    @classmethod
    def opening(cls, index: int, name: str, arguments: str) -> CallDelta:
        """A streamed call's first delta: its name and the argument text read so far."""
        return cls(index, ToolCall(name, arguments), arguments, first=True)

    @classmethod
    def whole(cls, index: int, call: ToolCall) -> CallDelta:
        """A call read whole: one delta, first and last."""
        return cls(index, call, call.arguments, first=True, done=True)

    def then(self, arguments: str) -> CallDelta:
        """The call's next delta, adding `arguments` (appended to the call's)."""
        self.call.arguments += arguments
        return CallDelta(self.index, self.call, arguments)

    def last(self, complete: bool = True) -> CallDelta:
        """The call's last delta; `complete=False`: the reply ended inside it."""
        self.call.complete = complete
        return CallDelta(self.index, self.call, "", done=True)

    def last_if_json(self) -> CallDelta:
        """The call's last delta, complete when its arguments parse as JSON (a reply cut inside them does not)."""
        try:
            json.loads(self.call.arguments)
        except ValueError:
            return self.last(complete=False)
        return self.last()

    def openai(self) -> dict[str, Any]:
        """The streamed chat chunk's `delta.tool_calls` entry: the call's id, type and name on its first delta."""
        if self.first:
            fn = {"name": self.call.name, "arguments": self.arguments}
            return {"index": self.index, "id": self.call.id, "type": "function", "function": fn}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class Piece:
    """Part of a reply, in order: reasoning, then content, then call deltas."""

    reasoning: str = ""
    content: str = ""
    deltas: list[CallDelta] = field(default_factory=list)

    @property
    def calls(self) -> list[ToolCall]:
        """The calls this piece completes."""
        return [d.call for d in self.deltas if d.done]


def merged(pieces: list[Piece]) -> Piece:
    """The pieces as one (the deltas' order kept; content and reasoning joined)."""
    return Piece(
        reasoning="".join(p.reasoning for p in pieces),
        content="".join(p.content for p in pieces),
        deltas=[d for p in pieces for d in p.deltas],
    )


def parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in ("arguments", "parameters") if k in obj), None)
    if key is None:  # JSON that names something is not a call without its arguments (vLLM's parsers agree)
        return None
    args = obj[key]
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def tag_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could begin `tag` (held back until the next delta decides)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def run_steps(step: Callable[[list[Piece]], bool]) -> list[Piece]:
    """Call a stream reader's `step(pieces)` until it reports no progress; the pieces it appended."""
    pieces: list[Piece] = []
    while step(pieces):
        pass
    return pieces


def add_text(pieces: list[Piece], text: str) -> None:
    """Text joins the last piece until a delta follows it."""
    if not text:
        return
    if not pieces or pieces[-1].deltas:
        pieces.append(Piece())
    pieces[-1].content += text


class _Out:
    """The pieces one feed releases."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    def text(self, text: str) -> None:
        add_text(self.pieces, text)

    def delta(self, delta: CallDelta) -> None:
        if not self.pieces:
            self.pieces.append(Piece())
        self.pieces[-1].deltas.append(delta)


class ToolCallStream:
    def __init__(self) -> None:
        self._buf = ""  # text not yet decided
        self._space = ""  # whitespace-only text held back
        self._scanner: CallScanner | None = None  # the open block's (None: between blocks)
        self._block = ""  # an uncommitted block's text so far, OPEN included: content again if it is no call
        self._call: CallDelta | None = None  # the open block's committed call (its latest delta)
        self._closed = False  # that call's object is complete (what follows up to CLOSE is not content)
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        """The pieces this text decides."""
        self._buf += text
        out = _Out()
        while self._between_blocks(out) if self._scanner is None else self._in_block(out):
            pass
        return out.pieces

    def finish(self) -> list[Piece]:
        """The rest when the reply ends: text, an uncommitted block as text, or a committed call's last delta."""
        out, rest = _Out(), self._buf
        if self._scanner is None:
            out.text(self._release(rest))
        elif self._call is None:
            out.text(self._release(self._block + rest))
        else:
            if not self._closed:  # a held possible CLOSE was argument text after all
                self._add(out, self._scanner.feed(rest)[0])
            out.delta(self._call.last(complete=self._closed))
        self._buf, self._scanner, self._call, self._block = "", None, None, ""
        if self._space and not self.num_calls:
            out.text(self._space)
            self._space = ""
        return out.pieces

    def _between_blocks(self, out: _Out) -> bool:
        start = self._buf.find(OPEN)
        if start < 0:
            cut = len(self._buf) - tag_prefix(self._buf, OPEN)
            out.text(self._release(self._buf[:cut]))
            self._buf = self._buf[cut:]
            return False
        out.text(self._release(self._buf[:start]))
        self._buf, self._block, self._scanner = self._buf[start + len(OPEN) :], OPEN, CallScanner()
        self._call, self._closed = None, False
        return True

    def _in_block(self, out: _Out) -> bool:
        """Read the open block up to CLOSE (or up to a possible start of it); True when the block ended."""
        assert self._scanner is not None
        end = self._buf.find(CLOSE)
        body = self._buf[: len(self._buf) - tag_prefix(self._buf, CLOSE)] if end < 0 else self._buf[:end]
        self._buf = self._buf[len(body) :]
        if self._call is None:
            self._read_uncommitted(out, self._scanner, body)
        elif not self._closed:
            args, object_end = self._scanner.feed(body)
            self._add(out, args)
            self._closed = object_end is not None
        if end < 0:
            return False
        self._buf = self._buf[len(CLOSE) :]
        if self._call is not None:
            out.delta(self._call.last())
        elif (call := parse_call(self._block[len(OPEN) :])) is None:
            out.text(self._release(self._block + CLOSE))
        else:
            out.delta(CallDelta.whole(self.num_calls, call))
            self.num_calls += 1
        self._scanner, self._call, self._block = None, None, ""
        return True

    def _read_uncommitted(self, out: _Out, scanner: CallScanner, body: str) -> None:
        args, object_end = scanner.feed(body)
        if scanner.name is None:
            self._block += body
            return
        self._block = ""
        self._call = CallDelta.opening(self.num_calls, scanner.name, args)
        self._closed = object_end is not None
        self.num_calls += 1
        out.delta(self._call)

    def _add(self, out: _Out, args: str) -> None:
        """Argument text of the committed call."""
        if args and self._call is not None:
            self._call = self._call.then(args)
            out.delta(self._call)

    def _release(self, text: str) -> str:
        """`text` after any whitespace held before it, less its own trailing whitespace (held in turn)."""
        text = self._space + text
        kept = text.rstrip()
        self._space = text[len(kept) :]
        return kept


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant turns as chat templates (and vLLM) expect them: tool calls' JSON `arguments` as objects, and the
    reasoning a client sends back (`reasoning_content`, vLLM's field, or `reasoning`) also as `thinking`, the field
    gpt-oss's template reads (it renders a tool-call turn's thinking or its content, and refuses both)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list):
            m = {**m, "tool_calls": [_arguments_as_object(c) for c in calls]}
        thought = m.get("reasoning_content") or m.get("reasoning")
        lone = not (calls and m.get("content"))  # not beside a tool-call turn's content
        if m.get("role") == "assistant" and isinstance(thought, str) and "thinking" not in m and lone:
            m = {**m, "thinking": thought}
        out.append(m)
    return out


def _arguments_as_object(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": args}}
