"""gpt-oss's harmony format: a reply split into reasoning, content and tool calls (`--reasoning-parser
openai_gptoss`, chosen by itself for a gpt_oss model; `--tool-call-parser openai` for the calls), vLLM's names.

The prompt ends with `<|start|>assistant`; the reply is one or more messages, each a header, `<|message|>`, a
body and a terminator (`<|end|>`; `<|return|>` or `<|call|>`, which stop generation), the next opening with
`<|start|>` and its role:

    <|channel|>analysis<|message|>The user wants the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}

The header names the channel and may name a recipient (`to=...`, before or after the channel) and a content
type (`<|constrain|>json`, or a bare `json`). A body goes where its header sends it:
  to=functions.NAME               a call of NAME, its body the JSON arguments, when calls are read (else dropped);
  any other recipient             a built-in tool's call (browser, python): dropped;
  analysis                        reasoning (dropped when reasoning is not read);
  final, commentary, no channel   content (commentary without a recipient is a preamble meant for the user).
A message with no header at all (a reply constrained from its first token, or a model that skips the format) is
content. A header cut short by the reply's end is dropped; so are markers wherever they stand.

The markers are special tokens, which the default detokenization hides, so the routes decode these replies with
special tokens kept (reply.keeps_special_tokens) and this parser reads that text; token ids would serve as well,
but text is what every route's reply reader takes, and the markers decode to exactly these strings. No marker
reaches reasoning, content or arguments. A stop token is not in the text (unless include_stop_str_in_output):
the reply's end closes the open message, and a call is complete when its arguments parse as JSON.
`HarmonyStream.feed` takes the reply in any pieces and releases text as soon as it cannot be the start of a marker;
a call opens (name and id) once its header is read and its arguments stream as they are written. The same text
gives the same reasoning, content and calls whether fed whole or in pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from treadle_frontend.server.tool_calls import CallDelta, Piece, tag_prefix

HARMONY = "openai_gptoss"  # the reasoning parser (vLLM's name), chosen by itself for model_type gpt_oss
TOOL_PARSER = "openai"  # the tool-call parser (vLLM's name)
START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, RETURN, CALL = "<|end|>", "<|return|>", "<|call|>"
MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, END, RETURN, CALL)
FUNCTIONS = "functions."  # the namespace of the request's tools in recipients
_HEADER_OPENINGS = (
    START,
    CHANNEL,
    "to=",
)  # what a reply (or the text after a terminator) opens a header with


@dataclass(frozen=True)
class Header:
    """A message's header: the text between `<|start|>` (or the reply's start) and `<|message|>`."""

    channel: str | None  # analysis | commentary | final (None: the header names no channel)
    recipient: str | None  # `to=...`: functions.NAME for a call of a request's tool (None: for the user)

    @classmethod
    def read(cls, text: str) -> Header:
        role, has_channel, rest = text.partition(CHANNEL)
        after = rest.replace(CONSTRAIN, " ").split()
        words = role.replace(CONSTRAIN, " ").split() + after
        recipient = next((w[len("to=") :] for w in words if w.startswith("to=")), None)
        channel = next((w for w in after if not w.startswith("to=")), None) if has_channel else None
        return cls(channel, recipient or None)


def _first(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """(index, marker) of the earliest of `markers` in `text`; (-1, None) when none is there."""
    hits = [(at, m) for m in markers if (at := text.find(m)) >= 0]
    return min(hits) if hits else (-1, None)


def _add(pieces: list[Piece], reasoning: str = "", content: str = "", delta: CallDelta | None = None) -> None:
    """Appends to the last piece while that keeps the order (a piece is reasoning, then content, then deltas)."""
    last = pieces[-1] if pieces else None
    if reasoning:
        if last is None or last.content or last.deltas:
            pieces.append(last := Piece())
        last.reasoning += reasoning
    elif content:
        if last is None or last.deltas:
            pieces.append(last := Piece())
        last.content += content
    elif delta is not None:
        if last is None:
            pieces.append(last := Piece())
        last.deltas.append(delta)


class HarmonyStream:
    """One reply's messages, read as they arrive. `reasoning`: analysis is reasoning (else dropped); `calls`:
    messages to functions.NAME are tool calls (else dropped)."""

    def __init__(self, reasoning: bool = True, calls: bool = True) -> None:
        self._reasoning, self._calls = reasoning, calls
        self._state = "open"  # open (a message may begin) -> header -> body -> open ...
        self._buf = ""  # text not yet decided
        self._route = ""  # where the open body goes: reasoning | content | call | drop
        self._call: CallDelta | None = None  # the open call's latest delta
        self.num_calls = 0

    def feed(self, text: str, final: bool = False) -> list[Piece]:
        """The pieces this text (and, when `final`, the reply's end) decides, in order."""
        self._buf += text
        pieces: list[Piece] = []
        steps = {"open": self._open, "header": self._header, "body": self._body}
        while steps[self._state](pieces):
            pass
        if final:
            self._finish(pieces)
        return pieces

    def finish(self) -> list[Piece]:
        """The rest when the reply ends (as the other tool-call streams end)."""
        return self.feed("", final=True)

    def _open(self, pieces: list[Piece]) -> bool:
        head = self._buf.lstrip()
        if head.startswith(START):
            self._state, self._buf = "header", head[len(START) :]
        elif head.startswith(_HEADER_OPENINGS):
            self._state, self._buf = "header", head
        elif not head or any(m.startswith(head) for m in _HEADER_OPENINGS):
            return False  # may still open a header
        else:
            self._state, self._route = "body", "content"  # no header: a message for the user
        return True

    def _header(self, pieces: list[Piece]) -> bool:
        at, marker = _first(self._buf, (MESSAGE, START, END, RETURN, CALL))
        if marker is None:
            return False
        header, self._buf = self._buf[:at], self._buf[at + len(marker) :]
        if marker == MESSAGE:
            self._begin(Header.read(header), pieces)
        else:  # a header without a body: nothing of it is text
            self._state = "header" if marker == START else "open"
        return True

    def _begin(self, header: Header, pieces: list[Piece]) -> None:
        route = "content"
        if header.recipient is not None:
            name = header.recipient.removeprefix(FUNCTIONS)
            is_call = self._calls and header.recipient.startswith(FUNCTIONS) and bool(name)
            route = "call" if is_call else "drop"
            if is_call:
                self._call = CallDelta.opening(self.num_calls, name, "")
                self.num_calls += 1
                _add(pieces, delta=self._call)
        elif header.channel == "analysis":
            route = "reasoning" if self._reasoning else "drop"
        self._state, self._route = "body", route

    def _body(self, pieces: list[Piece]) -> bool:
        at, marker = _first(self._buf, MARKERS)
        if marker is None:
            cut = len(self._buf) - max(tag_prefix(self._buf, m) for m in MARKERS)
            self._emit(pieces, self._buf[:cut])
            self._buf = self._buf[cut:]
            return False
        self._emit(pieces, self._buf[:at])
        self._buf = self._buf[at + len(marker) :]
        if marker in (MESSAGE, CONSTRAIN):  # a stray header marker: not text
            return True
        self._close(pieces)
        if marker == CHANNEL:  # a new header without <|start|>
            self._state, self._buf = "header", CHANNEL + self._buf
        else:
            self._state = "header" if marker == START else "open"
        return True

    def _emit(self, pieces: list[Piece], text: str) -> None:
        if not text:
            return
        if self._route == "reasoning":
            _add(pieces, reasoning=text)
        elif self._route == "content":
            _add(pieces, content=text)
        elif self._route == "call" and self._call is not None:
            self._call = self._call.then(text)
            _add(pieces, delta=self._call)

    def _close(self, pieces: list[Piece]) -> None:
        """The open body ends: a call's last delta (complete when its arguments parse as JSON)."""
        if self._call is not None:
            _add(pieces, delta=self._call.last_if_json())
            self._call = None
        self._route = ""

    def _finish(self, pieces: list[Piece]) -> None:
        if self._state == "body":
            self._emit(pieces, self._buf)
            self._close(pieces)
        elif self._state == "open" and self._buf.strip():  # what might have opened a header is text after all
            _add(pieces, content=self._buf)
        self._state, self._buf = "open", ""


class ForcedCallHeader:
    """A forced call's harmony reply (structured.harmony_call): an analysis message or none, then the call's header,
    both held to that shape by the runner. `split` gives the analysis as reasoning and what follows the header (the
    arguments) as content, the markers and the header dropped. A reply that does not open with `<|channel|>` (a
    tokenizer without the markers: constrained from its first token) is content whole."""

    def __init__(self) -> None:
        self._state = "open"  # open (may yet open a header) -> header -> analysis -> header -> body
        self._buf = ""

    def split(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) this text (and, when `final`, the reply's end) decides."""
        self._buf += text
        reasoning = ""
        while self._state != "body":
            if self._state == "open":
                if not self._buf.startswith(CHANNEL) and CHANNEL.startswith(self._buf) and not final:
                    return reasoning, ""  # may still open the header
                self._state = "header" if self._buf.startswith(CHANNEL) else "body"
            elif self._state == "header":
                at = self._buf.find(MESSAGE)
                if at < 0:  # the header is not text (nor is one the reply's end cuts)
                    self._buf = "" if final else self._buf
                    return reasoning, ""
                header = Header.read(self._buf[:at].replace(START, " "))
                self._state = "analysis" if header == Header("analysis", None) else "body"
                self._buf = self._buf[at + len(MESSAGE) :]
            else:
                at = self._buf.find(END)
                cut = at if at >= 0 else len(self._buf) - (0 if final else tag_prefix(self._buf, END))
                reasoning += self._buf[:cut]
                self._buf = self._buf[cut + len(END) :] if at >= 0 else self._buf[cut:]
                if at < 0:
                    return reasoning, ""
                self._state = "header"
        content, self._buf = self._buf, ""
        return reasoning, content


def reasoning_token_count(tokenizer: Any, token_ids: list[int]) -> int:
    """The reply's tokens in analysis messages, each from its first token to its terminator (usage's
    reasoning_tokens); 0 when the tokenizer lacks the markers."""
    vocab = tokenizer.get_vocab()
    start, ends = vocab.get(START), {vocab.get(m) for m in (END, RETURN, CALL)}
    if start is None or None in ends:
        return 0
    count = 0
    message: list[int] = []  # the open message's tokens

    def tally(ids: list[int]) -> int:
        header = tokenizer.decode(ids, skip_special_tokens=False).partition(MESSAGE)
        is_analysis = bool(header[1]) and Header.read(header[0]) == Header("analysis", None)
        return len(ids) if is_analysis else 0

    for tok in token_ids:
        if tok == start and message:
            count, message = count + tally(message), []
        message.append(tok)
        if tok in ends:
            count, message = count + tally(message), []
    return count + (tally(message) if message else 0)
