"""A chat reply split into reasoning, content and tool calls: `--reasoning-parser` and `--tool-call-parser`.

Reasoning (vLLM's `reasoning_content`) is the text a thinking model writes between `<think>` and `</think>`:
  qwen3        reasoning only when the reply opens with `<think>` (after any whitespace); without it every word
               is content (Qwen3 with `enable_thinking: false` writes no block, or an empty one);
  glm45        the same as qwen3 (an alias): GLM-4.5 / 4.6 open their reply with `<think>` when they think, and their
               template puts an empty block in the prompt when thinking is off (vLLM's glm45 parser reads the
               block likewise);
  deepseek_r1  the template opens the block in the prompt, so the reply is reasoning from its first word until
               `</think>` (a `<think>` the model writes anyway is dropped); a reply cut before `</think>` is all
               reasoning.
The newlines around the block are not content. Content then goes through the tool-call parser when it is on.
  openai_gptoss  gpt-oss's harmony format (harmony.py): the analysis channel is reasoning, the final channel
               content, and with `--tool-call-parser openai` messages to functions.NAME are the calls; it reads
               the whole reply, calls included, so it takes no other tool-call parser. Its markers are special
               tokens: these replies are decoded with special tokens kept (`keeps_special_tokens`).
`ReplyParser.feed` takes the reply in any pieces and releases what is decided, as `Piece`s in order (reasoning,
content, call deltas); the same reply text gives the same reasoning, content and calls whether fed whole or in
pieces (a possible tag held back until the next piece).
"""

from __future__ import annotations

from typing import Any

from treadle_frontend.server.call_deepseek import LAYOUTS, DeepSeekStream
from treadle_frontend.server.call_glm45 import Glm45Stream
from treadle_frontend.server.call_granite import GraniteStream
from treadle_frontend.server.call_granite_fc import GraniteFcStream
from treadle_frontend.server.call_mistral import MistralStream
from treadle_frontend.server.call_phi4 import phi4_mini_stream
from treadle_frontend.server.call_pythonic import PythonicStream
from treadle_frontend.server.call_sequence import Llama3JsonStream
from treadle_frontend.server.call_xml import Qwen3CoderStream
from treadle_frontend.server.harmony import HARMONY, TOOL_PARSER, HarmonyStream
from treadle_frontend.server.tool_calls import (
    SPECIAL_TOKEN_PARSERS,
    Piece,
    ToolCall,
    ToolCallStream,
    merged,
    tag_prefix,
)

THINK_PARSERS = ("deepseek_r1", "glm45", "qwen3")  # the parsers of a <think> block
REASONING_PARSERS = ("deepseek_r1", HARMONY, "qwen3", "glm45", "deepseek_v3")
THINK_ALIASES = {"glm45": "qwen3"}  # a <think> parser read as another's semantics
START, END = "<think>", "</think>"


# hybrid parsers: the chat template kwarg that turns a request's thinking on, and the parser its reply then takes
HYBRID_THINKING = {"deepseek_v3": ("thinking", "deepseek_r1")}


def request_reasoning_parser(parser: str | None, template_kwargs: dict[str, Any] | None) -> str | None:
    """The reasoning parser a request's reply is read with. A hybrid one (`deepseek_v3`, DeepSeek-V3.1's thinking)
    reads as its thinking parser (deepseek_r1) when the request's chat template kwargs set its kwarg (`thinking`:
    the template then opens the <think> block) and as no reasoning parser otherwise, as vLLM's deepseek_v3 parser
    chooses; the others as they are."""
    if parser not in HYBRID_THINKING:
        return parser
    kwarg, thinking_parser = HYBRID_THINKING[parser]
    return thinking_parser if (template_kwargs or {}).get(kwarg) else None


def thinking_template_kwargs(parser: str | None, thinking: bool) -> dict[str, Any]:
    """The chat template kwargs that turn a hybrid parser's thinking on, for a request that asks to think
    (/v1/messages' `thinking: enabled`); nothing for the other parsers, whose templates think by their own rule."""
    return {HYBRID_THINKING[parser][0]: True} if thinking and parser in HYBRID_THINKING else {}


def keeps_special_tokens(reasoning_parser: str | None, tool_parser: str | None) -> bool:
    """Whether a reply read by these parsers must be decoded with its special tokens, which mark its parts."""
    return reasoning_parser == HARMONY or tool_parser in SPECIAL_TOKEN_PARSERS


class ReasoningStream:
    def __init__(self, parser: str) -> None:
        if parser not in THINK_PARSERS:
            raise ValueError(f"reasoning parser {parser!r} is not one of: {', '.join(THINK_PARSERS)}")
        parser = THINK_ALIASES.get(parser, parser)
        self._state = "opening" if parser == "qwen3" else "reasoning"  # opening -> reasoning -> content
        self._buf = ""
        self._started = False  # any reasoning released yet
        self._head_read = parser != "deepseek_r1"  # R1: a leading <think> read (dropped) once
        self._lead_done = False  # the block's leading newlines dropped

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) decided by this piece."""
        self._buf += text
        reasoning = ""
        if self._state == "opening":
            head = self._buf.lstrip()
            if head.startswith(START):
                self._state, self._buf = "reasoning", head[len(START) :]
            elif not head or START.startswith(head):
                return "", ""  # still could be the opening tag
            else:
                self._state = "content"
        if self._state == "reasoning":
            if not self._head_read:
                head = self._buf.lstrip()
                if not head or (START.startswith(head) and head != START):
                    return "", ""
                if head.startswith(START):
                    self._buf = head[len(START) :]
                self._head_read = True
            end = self._buf.find(END)
            if end < 0:
                cut = len(self._buf) - tag_prefix(self._buf, END)
                reasoning, self._buf = self._buf[:cut], self._buf[cut:]
                self._started = self._started or bool(reasoning)
                return self._lead(reasoning), ""
            reasoning, self._buf = self._buf[:end], self._buf[end + len(END) :]
            self._state = "after"
            reasoning = self._lead(reasoning)
        if self._state == "after":  # the newlines right after </think> are not content
            self._buf = self._buf.lstrip()
            if not self._buf:
                return reasoning, ""
            self._state = "content"
        content, self._buf = self._buf, ""
        return reasoning, content

    def _lead(self, reasoning: str) -> str:
        """The block's first newline(s) are not reasoning."""
        if not self._lead_done and reasoning:
            reasoning = reasoning.lstrip("\n")
            self._lead_done = bool(reasoning)
        return reasoning

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) decided by this piece, and, when it is the reply's last, by its end."""
        reasoning, content = self.feed(text)
        if final:
            more_r, more_c = self.finish()
            reasoning, content = reasoning + more_r, content + more_c
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self._buf = self._buf, ""
        if self._state == "reasoning":
            return self._lead(rest), ""
        return "", rest if self._state in ("opening", "content") else ""


ToolStream = (
    ToolCallStream | Llama3JsonStream | MistralStream | PythonicStream | Qwen3CoderStream | HarmonyStream
    | Glm45Stream | GraniteStream | GraniteFcStream | DeepSeekStream
)  # fmt: skip


def tool_stream(parser: str, schemas: dict[str, dict[str, Any]] | None = None) -> ToolStream:
    """The streaming reader of `--tool-call-parser` `parser` (tool_calls.PARSERS); `schemas`: the request's tools'
    parameter schemas by name (call_xml.tool_schemas), for formats whose values carry no JSON type."""
    # harmony's calls alone: its analysis channel is dropped (ReplyParser reads it when reasoning is read)
    if parser == TOOL_PARSER:
        return HarmonyStream(reasoning=False, calls=True)
    if parser == "mistral":
        return MistralStream()
    if parser == "qwen3_coder":
        return Qwen3CoderStream(schemas)
    if parser == "pythonic":
        return PythonicStream()
    if parser == "glm45":
        return Glm45Stream(schemas)
    if parser == "granite":
        return GraniteStream()
    if parser == "granite-20b-fc":
        return GraniteFcStream()
    if parser == "phi4_mini_json":
        return phi4_mini_stream()
    if parser in LAYOUTS:
        return DeepSeekStream(LAYOUTS[parser])
    return Llama3JsonStream() if parser == "llama3_json" else ToolCallStream()


class ReplyParser:
    """Reasoning first (when a reasoning parser is on), then tool calls in the content (when tools are on); a
    harmony reply (either parser's harmony name) is read whole by one HarmonyStream."""

    def __init__(
        self,
        reasoning_parser: str | None,
        tool_parser: str | None,
        schemas: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.harmony = None
        if reasoning_parser == HARMONY or tool_parser == TOOL_PARSER:
            self.harmony = HarmonyStream(
                reasoning=reasoning_parser == HARMONY, calls=tool_parser == TOOL_PARSER
            )
            reasoning_parser = tool_parser = None
        self.reasoning = ReasoningStream(reasoning_parser) if reasoning_parser else None
        self.tools = tool_stream(tool_parser, schemas) if tool_parser else None

    @property
    def num_calls(self) -> int:
        if self.harmony is not None:
            return self.harmony.num_calls
        return self.tools.num_calls if self.tools else 0

    def feed(self, text: str, final: bool = False) -> list[Piece]:
        """The pieces this text (and, when `final`, the reply's end) decides, in order; reasoning comes first."""
        if self.harmony is not None:
            return [p for p in self.harmony.feed(text, final) if p.reasoning or p.content or p.deltas]
        reasoning, content = self.reasoning.split(text, final) if self.reasoning else ("", text)
        if not self.tools:
            pieces = [Piece(content=content)]
        else:
            pieces = self.tools.feed(content) + (self.tools.finish() if final else [])
        if reasoning:
            pieces = [Piece(reasoning=reasoning), *pieces]
        return [p for p in pieces if p.reasoning or p.content or p.deltas]


def parse_whole(
    text: str, reasoning_parser: str | None, tool_parser: str | None
) -> tuple[str | None, str | None, list[ToolCall]]:
    """A finished reply's (reasoning or None, content or None where calls or reasoning stand alone, calls)."""
    return whole_reply(ReplyParser(reasoning_parser, tool_parser).feed(text, final=True), reasoning_parser)


def whole_reply(
    pieces: list[Piece], reasoning_parser: str | None
) -> tuple[str | None, str | None, list[ToolCall]]:
    """A finished reply's pieces as (reasoning or None, content or None where calls or reasoning stand alone,
    calls)."""
    piece = merged(pieces)
    reasoning = (piece.reasoning or None) if reasoning_parser else None
    content: str | None = piece.content
    if not content and (piece.calls or reasoning is not None):
        content = None
    return reasoning, content, piece.calls
