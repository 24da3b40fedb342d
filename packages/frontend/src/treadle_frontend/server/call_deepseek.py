"""DeepSeek's tool-call formats, vLLM's names (the markers are DeepSeek's tokens, spelled with the fullwidth bar
U+FF5C and the lower block U+2581, and replies are decoded with special tokens kept):
- `deepseek_v3` (DeepSeek-V3, R1-0528): a section of calls, each a type, the name, then the arguments in a fenced
  JSON block,

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f
    ```json
    {}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

- `deepseek_v31` (DeepSeek-V3.1): the same section, each call written
  `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜>`.
- `kimi_k2` (Kimi-K2, a DeepSeek-V3 model): V3.1's layout in Moonshot's markers, each call named by its id
  `functions.NAME:INDEX`, which the call keeps as its id (as vLLM's parser does: Kimi's template writes it back
  into the conversation) and whose NAME is the function's,

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>
    {"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

Text before the section is content, released as soon as it cannot be the start of its opening marker. A call is
committed once its head (name and the `{` opening its arguments) is read; its arguments then stream as written, up
to the object's closing `}` (strings and escapes tracked; arguments left unbalanced end at the call's end marker,
the call incomplete); the fence after them is dropped. A call whose head does
not read (another layout, arguments that are no object) stays in the content as written, from the section's opening
marker when it is the section's first call, and reading goes on after it as text; so does a section that ends
without calls. Text after the section is content; a further section opens further calls. The content around blocks
follows call_text.py.
Invariant: the same reply text gives the same content and calls whether it is fed whole or in any pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from treadle_frontend.server.call_scanner import WHITESPACE, JsonNesting
from treadle_frontend.server.call_text import ContentOut
from treadle_frontend.server.tool_calls import CallDelta, Piece, run_steps, tag_prefix

BAR, LOW = "\uff5c", "\u2581"  # ｜ and ▁, as DeepSeek's tokenizer spells its markers


def marker(*words: str) -> str:
    """`<｜tool▁calls▁begin｜>` from ("tool", "calls", "begin")."""
    return f"<{BAR}{LOW.join(words)}{BAR}>"


CALLS_BEGIN, CALLS_END = marker("tool", "calls", "begin"), marker("tool", "calls", "end")
CALL_BEGIN, CALL_END, SEP = (
    marker("tool", "call", "begin"),
    marker("tool", "call", "end"),
    marker("tool", "sep"),
)
_NAME = r"(?P<name>[\w.:\-]{1,256})"
# a call's head up to the `{` opening its arguments: V3's `TYPE<sep>NAME\n```json\n{`, V3.1's `NAME<sep>{`
V3_HEAD = re.compile(rf"\s*\w+{re.escape(SEP)}{_NAME}\s*(?:```(?:json)?\s*)?\{{")  # the fence may be left out
V31_HEAD = re.compile(rf"\s*{_NAME}\s*{re.escape(SEP)}\s*\{{")
MAX_HEAD = 512  # longer text after a call's marker without a head is no call


@dataclass(frozen=True)
class Layout:
    """One format's markers and call head (a regex up to the arguments' `{`, with the group `name` and, where the
    model names its calls, `id`)."""

    calls_begin: str
    calls_end: str
    call_begin: str
    call_end: str
    head: re.Pattern[str]


V3 = Layout(CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, V3_HEAD)
V31 = Layout(CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, V31_HEAD)
KIMI_CALLS_BEGIN, KIMI_CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KIMI_CALL_BEGIN, KIMI_CALL_END, KIMI_ARGS = (
    "<|tool_call_begin|>",
    "<|tool_call_end|>",
    "<|tool_call_argument_begin|>",
)
KIMI_K2 = Layout(
    KIMI_CALLS_BEGIN, KIMI_CALLS_END, KIMI_CALL_BEGIN, KIMI_CALL_END,
    re.compile(rf"\s*(?P<id>(?:functions\.)?(?P<name>[\w.\-]{{1,256}}?):\d{{1,9}})\s*{re.escape(KIMI_ARGS)}\s*\{{"),
)  # fmt: skip
LAYOUTS = {"deepseek_v3": V3, "deepseek_v31": V31, "kimi_k2": KIMI_K2}


class DeepSeekStream:
    """Reply text, fed in pieces, as content and call deltas (see the module docstring), in `layout`'s format."""

    def __init__(self, layout: Layout = V3) -> None:
        self._head = layout.head
        self._calls_begin, self._calls_end = layout.calls_begin, layout.calls_end
        self._call_begin, self._call_end = layout.call_begin, layout.call_end
        self._state = "text"  # text -> section -> head -> args -> tail -> section ... -> text
        self._buf = ""  # text not yet decided
        # what was read since the section opened or its last call ended: content, as written, if no call follows
        self._held = ""
        self._section_calls = 0  # calls in the open section
        self._out = ContentOut()
        self._call: CallDelta | None = None
        self._nesting = JsonNesting()  # the open call's arguments
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        return run_steps(self._step)

    def _step(self, pieces: list[Piece]) -> bool:
        """Read what the buffer decides in the current state; True when the state moved on."""
        if self._state == "text":
            self._buf, found = self._out.add_until(pieces, self._buf, self._calls_begin)
            if not found:
                return False
            self._state, self._held, self._section_calls = "section", self._calls_begin, 0
            self._buf = self._buf[len(self._calls_begin) :]
            return True
        if self._state == "section":
            return self._in_section(pieces)
        if self._state == "head":
            return self._read_head(pieces)
        assert self._call is not None, "arguments and tail belong to an open call"
        if self._state == "args":  # up to the object's `}`; a call's end marker ends unbalanced arguments
            stops = [at for m in (self._call_end, self._calls_end) if (at := self._buf.find(m)) >= 0]
            held = max(tag_prefix(self._buf, self._call_end), tag_prefix(self._buf, self._calls_end))
            upto = self._buf[: min(stops)] if stops else self._buf[: len(self._buf) - held]
            end = self._nesting.feed(upto)
            args = upto if end is None else upto[:end]
            if args:
                pieces.append(Piece(deltas=[self._call.then(args)]))
            self._buf = self._buf[len(args) :]
            if end is not None:
                self._state = "tail"
                return True
            if not stops:
                return False
            self._buf = self._buf.removeprefix(self._call_end)
            self._end_call(pieces, complete=False)
            return True
        # tail: the fence after the arguments, up to the call's end marker (or the next marker, if it was left out)
        ends = [
            at for m in (self._call_end, self._call_begin, self._calls_end) if (at := self._buf.find(m)) >= 0
        ]
        if not ends:
            return False
        at = min(ends)
        self._buf = (
            self._buf[at + len(self._call_end) :]
            if self._buf.startswith(self._call_end, at)
            else self._buf[at:]
        )
        self._end_call(pieces)
        return True

    def _in_section(self, pieces: list[Piece]) -> bool:
        """Between calls: the next call's marker, the section's end, or text (the section ended without it)."""
        body = self._buf.lstrip(WHITESPACE)
        space = self._buf[: len(self._buf) - len(body)]
        if body.startswith(self._call_begin):
            self._held += space + self._call_begin
            self._state, self._buf = "head", body[len(self._call_begin) :]
            return True
        if body.startswith(self._calls_end):
            if not self._section_calls:  # an empty section: content, as written
                self._out.add(pieces, self._held + space + self._calls_end)
            self._state, self._held, self._buf = "text", "", body[len(self._calls_end) :]
            return True
        if not body or self._call_begin.startswith(body) or self._calls_end.startswith(body):
            return False
        self._out.add(pieces, self._held)
        self._state, self._held = "text", ""
        return True

    def _read_head(self, pieces: list[Piece]) -> bool:
        """A call's head: its name and the `{` opening its arguments (committed), or no call (content)."""
        head = self._head.match(self._buf)
        if head is None:
            if self._call_end in self._buf or self._calls_end in self._buf or len(self._buf) > MAX_HEAD:
                self._out.add(pieces, self._held)  # the head is read again as text
                self._state, self._held = "text", ""
                return True
            return False
        self._out.block_opens()
        self._call = CallDelta.opening(self.num_calls, head.group("name"), "{")
        if "id" in head.groupdict():
            self._call.call.id = head.group("id")
        self._nesting = JsonNesting()
        self._nesting.feed("{")
        self.num_calls, self._section_calls = self.num_calls + 1, self._section_calls + 1
        pieces.append(Piece(deltas=[self._call]))
        self._state, self._held, self._buf = "args", "", self._buf[head.end() :]
        return True

    def _end_call(self, pieces: list[Piece], complete: bool = True) -> None:
        assert self._call is not None, "an open call ends"
        pieces.append(Piece(deltas=[self._call.last(complete)]))
        self._call, self._state = None, "section"
        self._out.block_closes()

    def finish(self) -> list[Piece]:
        """The rest when the reply ends: text, an uncommitted call as text, or the open call's last delta."""
        pieces: list[Piece] = []
        if self._state == "args" and self._call is not None:  # cut inside the arguments: as far as they got
            pieces.append(Piece(deltas=[self._call.last(complete=False)]))
        elif self._state == "tail":
            # a complete call whose end marker never came: text after its fence is content
            rest = self._buf[: len(self._buf) - tag_prefix(self._buf, self._call_end)]
            self._end_call(pieces)
            self._out.add(pieces, rest.strip(WHITESPACE).removeprefix("```"))
        elif self._state in ("section", "head"):
            self._out.add(pieces, self._held + self._buf)
        else:
            self._out.add(pieces, self._buf)
        self._out.finish(pieces, self.num_calls)
        self._state, self._buf, self._held, self._call = "text", "", "", None
        return pieces
