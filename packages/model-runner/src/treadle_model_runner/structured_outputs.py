"""Structured outputs: a request's reply constrained to a JSON schema, any JSON object, a regex, one of a list of
strings, or a grammar, in xgrammar's EBNF or in Lark's syntax (vLLM's `StructuredOutputsParams`;
`SamplingParams.structured_outputs`).

Exactly one constraint is set. A JSON schema is kept as JSON text, so the params travel between processes as
plain data. `build()` makes the xgrammar Grammar and raises ValueError naming the constraint when it is
invalid; `key()` identifies the compiled grammar for caching. The runner masks each step's logits to the tokens
the grammar allows (runner/structured.py), so a reply always parses, and once the grammar is complete only an
end-of-sequence token may follow (for gpt-oss, `<|return|>` among its generation_config's eos ids). A thinking
model's reasoning comes before the constrained part (the `reasoning` fields, set by the server).
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any

from treadle_model_runner.grammar_lark import is_lark, lark_to_ebnf

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(slots=True)
class StructuredOutputsParams:
    json: str | None = None  # a JSON schema (JSON text; a dict is serialised at creation)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # the reply is exactly one of these strings
    # an EBNF grammar (xgrammar's dialect, GBNF-like, root rule `root`), or a Lark grammar (no `::=`, as vLLM
    # tells them apart; converted by grammar_lark.py)
    grammar: str | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens (vLLM's option)
    # A thinking model's reasoning block comes first, unconstrained (set by the server's reasoning parser):
    # "deepseek_r1" the reply starts inside the block; "qwen3" only a reply whose first token is think_start_id
    # opens one. The constraint holds from the token after think_end_id.
    # "harmony" (gpt-oss): the constraint holds from the token after the first run of reasoning_end_ids in the
    # reply (the header that opens the constrained message, `<|channel|>final<|message|>` as the tokenizer
    # writes it), the messages before it (analysis) unconstrained.
    reasoning: str | None = None
    think_start_id: int | None = None
    think_end_id: int | None = None
    reasoning_end_ids: tuple[int, ...] | None = None  # harmony: the token ids that open the constrained part
    # harmony: reasoning_end_ids are forced one token a step (a forced tool call's header, `<|channel|>commentary
    # to=functions.NAME <|constrain|>json<|message|>`), from the reply's first token, or after an analysis
    # message when analysis_open_ids / analysis_close_ids are set (runner/forced_call.py), then the grammar
    is_header_forced: bool = False
    analysis_open_ids: tuple[int, ...] | None = None  # `<|channel|>analysis<|message|>`
    # `<|end|><|start|>assistant`: its first id ends the analysis body, the rest is forced before the header
    analysis_close_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = jsonlib.dumps(self.json)
        for name in ("json", "regex", "grammar"):  # a JSON schema arrives as text or, above, a dict
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(
                    f"structured_outputs.{name}: a string is required, got {type(value).__name__}"
                )
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(
                f"structured_outputs: set exactly one of {', '.join(KINDS)}; got {set_ or 'none'}"
            )
        self._check_reasoning()
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice: a non-empty list of non-empty strings")

    def _check_reasoning(self) -> None:
        """The reasoning hold-off's fields agree with its mode (ValueError naming them otherwise)."""
        for name in ("reasoning_end_ids", "analysis_open_ids", "analysis_close_ids"):
            if getattr(self, name) is not None:  # a list after a JSON round trip
                setattr(self, name, tuple(getattr(self, name)))
        ends = self.reasoning_end_ids
        analysis = (self.analysis_open_ids, self.analysis_close_ids)
        if analysis != (None, None) and (
            not self.is_header_forced
            or not all(ids and all(isinstance(t, int) for t in ids) for ids in analysis)
        ):
            raise ValueError("structured_outputs: analysis_open_ids and analysis_close_ids go together, non-empty, "
                             "with is_header_forced")  # fmt: skip
        if self.reasoning == "harmony":
            if not ends or not all(isinstance(t, int) and t >= 0 for t in ends):
                raise ValueError("structured_outputs.reasoning harmony: reasoning_end_ids must be a non-empty "
                                 f"sequence of token ids (the final message's header), got {ends!r}")  # fmt: skip
            if self.think_start_id is not None or self.think_end_id is not None:
                raise ValueError("structured_outputs.reasoning harmony: set reasoning_end_ids, not "
                                 "think_start_id / think_end_id")  # fmt: skip
            return
        if ends is not None or self.is_header_forced:
            raise ValueError("structured_outputs: reasoning_end_ids and is_header_forced are for reasoning "
                             f"harmony, not {self.reasoning!r}")  # fmt: skip
        if self.reasoning is not None and (
            self.reasoning not in ("qwen3", "deepseek_r1")
            or self.think_end_id is None
            or (self.reasoning == "qwen3" and self.think_start_id is None)
        ):
            raise ValueError("structured_outputs.reasoning: qwen3 (with think_start_id and think_end_id), "
                             "deepseek_r1 (with think_end_id) or harmony (with reasoning_end_ids)")  # fmt: skip

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        value = getattr(self, self.kind)
        text = jsonlib.dumps(value) if isinstance(value, (list, bool)) else str(value)
        return self.kind, text + (" compact" if self.disable_any_whitespace else "")

    def build(self) -> Any:
        """The xgrammar Grammar; ValueError naming the constraint when it is invalid."""
        xgr = import_xgrammar()
        kind = self.kind
        try:
            spaces = not self.disable_any_whitespace
            if kind == "json":
                return xgr.Grammar.from_json_schema(self.json, any_whitespace=spaces)
            if kind == "json_object":  # an object, as OpenAI (and vLLM) define it: not an array or a scalar
                return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=spaces)
            if kind == "regex":
                return xgr.Grammar.from_regex(self.regex)
            if kind == "choice":
                assert self.choice is not None
                return xgr.Grammar.from_ebnf("root ::= " + " | ".join(map(ebnf_string, self.choice)))
            assert self.grammar is not None
            ebnf = lark_to_ebnf(self.grammar) if is_lark(self.grammar) else self.grammar
            return xgr.Grammar.from_ebnf(ebnf)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"structured_outputs.{kind}: {_first_line(e)}") from None


def ebnf_string(text: str) -> str:
    """`text` as an EBNF string literal: quotes, backslashes and line breaks escaped, every other character as it
    is (JSON's \\u escapes would write a character outside the BMP as two surrogates, which the grammar reads as two
    lone code points, so such a choice could never be written)."""
    for raw, escaped in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = text.replace(raw, escaped)
    return f'"{text}"'


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a dependency; a broken install is named
        raise ValueError(f"structured outputs need the xgrammar package ({e})") from None
    return xgrammar


def _first_line(e: Exception) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
