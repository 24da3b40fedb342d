"""A Lark grammar as data: its definitions, each a tree of items (what lark_syntax.py reads and grammar_lark.py
writes out as EBNF).

A definition is a rule (lowercase name) or a terminal (UPPERCASE name); a rule may be a template with
parameters. Items: names, literals, /regexes/, "a".."z" ranges, repetitions (`? * + ~`), sequences,
alternatives and template uses. Only what decides the language is kept: Lark's tree-shaping marks are dropped
when the text is read. A regex, once read (lark_regex.py), is a tree of the same items whose leaves are `Chars`:
one character out of a set of code points.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
class Chars:
    ranges: tuple[tuple[int, int], ...]  # code point ranges (low, high), sorted, disjoint, not adjacent

    def __and__(self, other: Chars) -> Chars:
        out = []
        for a, b in self.ranges:
            out += [(max(a, c), min(b, d)) for c, d in other.ranges if max(a, c) <= min(b, d)]
        return chars(out)

    def __or__(self, other: Chars) -> Chars:
        return chars(self.ranges + other.ranges)

    def __sub__(self, other: Chars) -> Chars:
        out, last = [], -1  # other's complement (surrogates left out), then intersected
        for low, high in (*(other | Chars((SURROGATES,))).ranges, (MAX_CODE_POINT + 1, MAX_CODE_POINT + 1)):
            out += [(last + 1, low - 1)] if last + 1 <= low - 1 else []
            last = high
        return self & chars(out)


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


Expr = Name | Literal | Pattern | CharRange | Chars | Repeat | Seq | Alt | Call
MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)  # never in a Chars: a UTF-8 reply cannot hold them


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


def chars(ranges: Iterable[tuple[int, int]]) -> Chars:
    """The set of code points in `ranges` (any order, overlaps allowed), normalized."""
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return Chars(tuple(out))
