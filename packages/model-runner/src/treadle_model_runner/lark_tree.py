"""A Lark grammar as data: its definitions, each a tree of items (what lark_syntax.py reads and grammar_lark.py
writes out as EBNF).

A definition is a rule (lowercase name) or a terminal (UPPERCASE name); a rule may be a template with
parameters. Items: names, literals, /regexes/, "a".."z" ranges, repetitions (`? * + ~`), sequences,
alternatives and template uses. Only what decides the language is kept: Lark's tree-shaping marks are dropped
when the text is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TERMINAL = re.compile(r"_?[A-Z][_A-Z0-9]*")


@dataclass(frozen=True, slots=True)
class Name:
    name: str  # a rule, a terminal or a template parameter
    line: int  # where it is used (1-based)


@dataclass(frozen=True, slots=True)
class Literal:
    text: str  # after Lark's escape processing
    insensitive: bool  # the `i` flag
    line: int


@dataclass(frozen=True, slots=True)
class Pattern:
    regex: str  # Python `re` syntax, after Lark's escape processing
    flags: str  # Lark's regex flags, a subset of "imslux"
    line: int


@dataclass(frozen=True, slots=True)
class CharRange:
    low: str  # one character
    high: str  # one character, not below low
    line: int


@dataclass(frozen=True, slots=True)
class Repeat:
    item: Expr
    low: int  # fewest repetitions
    high: int | None  # most repetitions (None: unbounded)


@dataclass(frozen=True, slots=True)
class Seq:
    items: tuple[Expr, ...]  # one after the other; empty: the empty string


@dataclass(frozen=True, slots=True)
class Alt:
    options: tuple[Expr, ...]  # any one of them


@dataclass(frozen=True, slots=True)
class Call:
    name: str  # a template rule
    args: tuple[Expr, ...]  # its arguments, in parameter order
    line: int


Expr = Name | Literal | Pattern | CharRange | Repeat | Seq | Alt | Call


@dataclass(frozen=True, slots=True)
class Definition:
    name: str
    params: tuple[str, ...]  # template parameters (a rule only); () for a plain definition
    body: Expr
    line: int

    @property
    def is_terminal(self) -> bool:
        return is_terminal_name(self.name.removeprefix("common-"))  # an imported terminal's private name


@dataclass(slots=True)
class LarkGrammar:
    definitions: dict[str, Definition] = field(default_factory=dict)  # in the order they were written
    ignored: list[Expr] = field(default_factory=list)  # every `%ignore` statement's item
    imports: list[tuple[str, str, int]] = field(default_factory=list)  # (common name, local name, line)


def is_terminal_name(name: str) -> bool:
    return bool(_TERMINAL.fullmatch(name))
