"""Tool calls in chat replies: `treadle serve --enable-auto-tool-choice --tool-call-parser hermes`, vLLM's flags.

The hermes format (the Hermes, Qwen2.5 and Qwen3 chat templates) writes each call into the reply text as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. `ToolCallStream` turns reply text, fed whole or in
streamed deltas, into content and calls:
- text is released as soon as it cannot be the start of a block; a call is released whole when its block closes;
- a block whose body is not a JSON object with a string `name` stays in the content as it was written, as vLLM
  leaves output it cannot parse as text; so does an unclosed block when the reply ends;
- trailing whitespace is held until other text follows, and dropped at the end when the reply made calls (the
  newlines around blocks are not content).
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

PARSERS = ("hermes", "llama3_json")
OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex[:24]}")

    def json(self, index: int | None = None) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry; with `index`, the streamed delta's form."""
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _open_prefix(text: str) -> int:
    """Length of the longest end of `text` that could begin OPEN (held back until the next delta decides)."""
    for n in range(min(len(text), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    def __init__(self) -> None:
        self._buf = ""  # text not yet decided
        self._space = ""  # whitespace-only text held back
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content to release now, calls completed by this text)."""
        self._buf += text
        pieces: list[str] = []
        calls: list[ToolCall] = []
        while True:
            start = self._buf.find(OPEN)
            if start < 0:
                cut = len(self._buf) - _open_prefix(self._buf)
                pieces.append(self._buf[:cut])
                self._buf = self._buf[cut:]
                break
            end = self._buf.find(CLOSE, start + len(OPEN))
            if end < 0:
                pieces.append(self._buf[:start])
                self._buf = self._buf[start:]
                break
            call = parse_call(self._buf[start + len(OPEN) : end])
            pieces.append(self._buf[: end + len(CLOSE)] if call is None else self._buf[:start])
            if call is not None:
                calls.append(call)
            self._buf = self._buf[end + len(CLOSE) :]
        self.num_calls += len(calls)
        return self._release("".join(pieces)), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content left when the reply ends (an unclosed block as text); no call is left by then."""
        rest, self._buf = self._buf, ""
        text = self._release(rest)
        if self._space and not self.num_calls:
            text, self._space = text + self._space, ""
        return text, []

    def _release(self, text: str) -> str:
        """`text` after any whitespace held before it, less its own trailing whitespace (held in turn)."""
        text = self._space + text
        kept = text.rstrip()
        self._space = text[len(kept) :]
        return kept


class Llama3JsonStream:
    """The llama3_json format (Llama 3.1-3.3's tool prompt): a reply that opens with a JSON object (after an
    optional `<|python_tag|>`) is its calls, `{"name": ..., "parameters": {...}}` each, several separated by
    ";". Such a reply is held whole and parsed when it ends (text that does not parse is released as it was);
    any other reply is text, streamed as it comes."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self._buf = ""
        self._mode: str | None = None  # "text" or "calls", once the reply's opening decides it
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._mode == "text":
            return text, []
        self._buf += text
        head = self._buf.lstrip()
        if self._mode is None:
            if head.startswith(("{", self.TAG)):
                self._mode = "calls"
            elif head and not self.TAG.startswith(head):
                self._mode, rest, self._buf = "text", self._buf, ""
                return rest, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the held text, if it is not calls; the calls, if it is)."""
        text, self._buf = self._buf, ""
        if self._mode != "calls":
            return text, []
        calls = _json_calls(text.strip().removeprefix(self.TAG))
        self.num_calls = len(calls)
        return ("", calls) if calls else (text, [])


def _json_calls(text: str) -> list[ToolCall]:
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
        while at < len(text) and text[at] in " \t\n;":
            at += 1
    return calls


def tool_stream(parser: str) -> ToolCallStream | Llama3JsonStream:
    return Llama3JsonStream() if parser == "llama3_json" else ToolCallStream()


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant turns' tool calls with their JSON `arguments` as objects, as chat templates (and vLLM) expect."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list):
            m = {**m, "tool_calls": [_arguments_as_object(c) for c in calls]}
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
