"""Trees of lark_tree items written as xgrammar EBNF, in the shapes xgrammar matches fastest.

xgrammar (0.2.9) keeps a bare character class under a star, `[ \\t]*`, as one element of its rule; every other
repetition, `([ \\t])*`, `(" " | "\\t")+` or `rule*`, becomes a recursive helper rule. Between tokens that
matters: with the gap before each token written as `[\\t ]*` a token mask of the arithmetic grammar takes
0.02 ms on SmolLM2's vocabulary, written any other way 10-20 ms (benchmarks/lark_mask_cpu.py). So the writer
- writes an alternation whose options are single characters (`" " | "\\t"`, `"a".."f" | DIGIT`, `/x/ | "y"i`)
  as one class `[\\t ]`: the same language, one element;
- writes a repeated single character as `[...]*`, and `+` as `[...] [...]*`, with no group around the class;
- writes runs of plain characters in a sequence as one string.
A class is written as its members or, where shorter, as the negation of what it leaves out.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

from treadle_model_runner.lark_tree import MAX_CODE_POINT, SURROGATES, Alt, Chars, Expr, Literal, Repeat, Seq


def char(cp: int) -> str:
    """Code point `cp` as it may stand inside an EBNF string or class."""
    c = chr(cp)
    if c.isascii() and (c.isalnum() or c in " _!#$%&'()*+,./:;<=>?@{|}~`"):
        return c
    # \\u and \\U take a fixed number of digits; xgrammar's \\x reads every hex digit that follows
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def write_chars(c: Chars, as_class: bool = False) -> str:
    """`c` as a string (one code point, unless `as_class`) or a class, negated where that is shorter."""
    assert c.ranges, "an empty character set has no EBNF (the reader refuses it)"
    if len(c.ranges) == 1 and c.ranges[0][0] == c.ranges[0][1] and not as_class:
        return f'"{char(c.ranges[0][0])}"'
    gaps, last = [], -1
    for low, high in (*c.ranges, (MAX_CODE_POINT + 1, MAX_CODE_POINT + 1)):
        gaps += [(a, b) for a, b in [(last + 1, low - 1)] if a <= b and (a, b) != SURROGATES]
        last = high
    negate = len(gaps) < len(c.ranges)
    body = "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in (gaps if negate else c.ranges))
    return f"[{'^' if negate else ''}{body}]"


def write_literal(text: str) -> str:
    return '"' + "".join(char(ord(c)) for c in text) + '"'


def merge_single_chars(options: tuple[Expr, ...], single: Callable[[Expr], Chars | None]) -> list[Expr]:
    """`options` with those that are one character each (as `single` tells) joined into one Chars, where
    there are two or more of them; the others kept in order."""
    sets = [c for o in options if (c := single(o)) is not None]
    if len(sets) < 2:
        return list(options)
    merged = functools.reduce(operator.or_, sets)
    out: list[Expr] = []
    for o in options:
        if single(o) is None:
            out.append(o)
        elif merged not in out:
            out.append(merged)
    return out


def repeat(inner: str, low: int, high: int | None, item_chars: Chars | None) -> str:
    """`inner` (the written item) repeated `low` to `high` times; a character class stays bare under `*`."""
    if item_chars is not None and high is None and low <= 1:
        star = write_chars(item_chars, as_class=True) + "*"
        return star if low == 0 else f"({inner} {star})"
    count = {(0, 1): "?", (0, None): "*", (1, None): "+"}.get((low, high))
    return f"({inner}){count or '{' + str(low) + ',' + ('' if high is None else str(high)) + '}'}"


def single_chars(e: Expr) -> Chars | None:
    """The characters `e` matches, when it is a tree item that matches exactly one character."""
    if isinstance(e, Chars):
        return e
    if isinstance(e, Literal) and not e.insensitive and len(e.text) == 1:
        return Chars(((ord(e.text), ord(e.text)),))
    if isinstance(e, Alt) and all(single_chars(o) is not None for o in e.options):
        return merge_single_chars(e.options, single_chars)[0]  # type: ignore[return-value]
    return None


def write_tree(e: Expr) -> str:
    """A tree of Chars, plain Literals, Seq, Alt and Repeat (a read regex or literal) as EBNF."""
    if isinstance(e, Chars):
        return write_chars(e)
    if isinstance(e, Literal):
        assert not e.insensitive, "an insensitive literal is read into Chars first (lark_regex.literal_tree)"
        return write_literal(e.text)
    if isinstance(e, Repeat):
        return repeat(write_tree(e.item), e.low, e.high, single_chars(e.item))
    if isinstance(e, Seq):
        items: list[Expr] = []
        for item in e.items:  # runs of plain characters: one string
            text = _plain(item)
            if text is not None and items and (before := _plain(items[-1])) is not None:
                items[-1] = Literal(before + text, False, 0)
            else:
                items.append(item)
        if not items:
            return '""'
        return write_tree(items[0]) if len(items) == 1 else "(" + " ".join(map(write_tree, items)) + ")"
    assert isinstance(e, Alt), f"not a tree of characters: {e!r}"
    options = merge_single_chars(e.options, single_chars)
    return write_tree(options[0]) if len(options) == 1 else "(" + " | ".join(map(write_tree, options)) + ")"


def _plain(e: Expr) -> str | None:
    if isinstance(e, Literal) and not e.insensitive:
        return e.text
    if isinstance(e, Chars) and len(e.ranges) == 1 and e.ranges[0][0] == e.ranges[0][1]:
        return chr(e.ranges[0][0])
    return None
