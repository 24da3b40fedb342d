"""What Lark's `%ignore` skips between two tokens, written as EBNF rules that accept exactly those gaps.

Lark's Earley scanner, at a position where tokens may start, also matches each ignored terminal there with
Python's `re` and carries the parse past that one match; then again, from its end. So a gap is a chain of
*maximal* matches: with `%ignore SH_COMMENT` (`/#[^\n]*/`) a comment runs to the end of its line, and in
`(a #c b)` no gap ends before `b` (nor before `)`). A grammar that let a gap be any sequence of ignored texts
accepts that; these rules do not. (xgrammar's lookahead assertions, `rule ::= body (= "\n")`, cannot say it:
xgrammar 0.2.9 reads them but does not enforce them when matching, `c ::= "a" (= "b")` followed by "x" still
accepts "ax"; they are hints for its mask cache.)

Each ignored item is sorted by shape (`Terminals.tail`):
- `P C*` with P prefix-free (e.g. a fixed string) and C one character class, and `C{n,}` runs: `re` returns
  the longest match, so a match is Lark's exactly when the character after it is not in C (or the text ends).
  SH_COMMENT, CPP_COMMENT, SQL_COMMENT, WS, WS_INLINE and /[ \t]+/-like terminals are so.
- Anything else is taken with no condition after it. That is exact when the terminal's language is prefix-free
  (no match is a proper prefix of another: C_COMMENT, a quoted string, a single character) and approximate
  otherwise: NEWLINE's `(\r?\n)+` before a token that starts with a line break, and `/a|ab/`-like terminals,
  where `re` may return a shorter match than the longest.
An alternation whose options start with different characters is split into its options first.

A gap is then a walk over items where each item's first character is not in the previous item's C, and the
token after it must not start with a character in the last item's C. One gap rule is written per set of items
a gap may end with (which the first characters of the next token decide); a token whose first characters are
partly in some C is written twice: whole after gaps that do not end with such an item, and cut to the
characters outside C after gaps that do. When every item is a run or a single character and the token starts
with none of them, the gap is simply `[all of them]*`, the shape xgrammar masks fastest (lark_ebnf.py).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping

from treadle_model_runner.lark_ebnf import single_chars, write_chars
from treadle_model_runner.lark_regex import literal_tree, regex_tree
from treadle_model_runner.lark_tree import (
    MAX_CODE_POINT,
    Alt,
    CharRange,
    Chars,
    Definition,
    Expr,
    Literal,
    Name,
    Pattern,
    Repeat,
    Seq,
)


class Terminals:
    """Language facts about terminal-level trees (Names resolve through `defs`)."""

    def __init__(self, defs: Mapping[str, Definition]) -> None:
        self.defs = defs

    def leaf(self, e: Expr) -> Expr:
        """`e` with a Name, Pattern, CharRange or case-insensitive Literal at its top made a plain tree."""
        while isinstance(e, (Name, Pattern, CharRange)) or (isinstance(e, Literal) and e.insensitive):
            if isinstance(e, Name):
                e = self.defs[e.name].body
            elif isinstance(e, Pattern):
                e = regex_tree(e.regex, e.flags, f"Lark grammar line {e.line}")
            elif isinstance(e, CharRange):
                e = Chars(((ord(e.low), ord(e.high)),))
            else:
                e = literal_tree(e.text, True, f"Lark grammar line {e.line}")
        return e

    def single(self, e: Expr) -> Chars | None:
        """The characters `e` matches, when each of its matches is one character."""
        e = self.leaf(e)
        if isinstance(e, Alt):
            sets = [self.single(o) for o in e.options]
            return None if None in sets else functools.reduce(operator.or_, sets)  # type: ignore[arg-type]
        if isinstance(e, Seq) and len(e.items) == 1:
            return self.single(e.items[0])
        return single_chars(e)

    def nullable(self, e: Expr) -> bool:
        e = self.leaf(e)
        if isinstance(e, Seq):
            return all(map(self.nullable, e.items))
        if isinstance(e, Alt):
            return any(map(self.nullable, e.options))
        if isinstance(e, Repeat):
            return e.low == 0 or self.nullable(e.item)
        return False  # Chars, a non-empty Literal

    def first(self, e: Expr) -> Chars:
        """The characters a non-empty match of `e` can start with."""
        e = self.leaf(e)
        if isinstance(e, Chars):
            return e
        if isinstance(e, Literal):
            return Chars(((ord(e.text[0]), ord(e.text[0])),))
        if isinstance(e, Repeat):
            return self.first(e.item) if e.high != 0 else Chars(())
        out = Chars(())
        for item in e.items if isinstance(e, Seq) else e.options:  # type: ignore[union-attr]
            out |= self.first(item)
            if isinstance(e, Seq) and not self.nullable(item):
                break
        return out

    def restrict(self, e: Expr, allowed: Chars) -> Expr | None:
        """The non-empty matches of `e` that start with a character in `allowed` (None: there are none)."""
        e = self.leaf(e)
        first = self.first(e)
        if not (first & allowed).ranges:
            return None
        if not (first - allowed).ranges and not self.nullable(e):
            return e
        if isinstance(e, Chars):
            return e & allowed
        if isinstance(e, Repeat):  # the first non-empty repetition starts the match
            high = None if e.high is None else e.high - 1
            rest = Repeat(e.item, 0 if self.nullable(e.item) else max(e.low - 1, 0), high)
            return _seq(self.restrict(e.item, allowed), *([rest] if high != 0 else []))
        if isinstance(e, Alt):
            return _alt([self.restrict(o, allowed) for o in e.options])
        assert isinstance(e, Seq), f"{e!r} has one first character, so it was returned above"
        options = []
        for i, item in enumerate(e.items):  # the first non-empty item starts the match
            options.append(_seq(self.restrict(item, allowed), *e.items[i + 1 :]))
            if not self.nullable(item):
                break
        return _alt(options)

    def is_prefix_free(self, e: Expr) -> bool:
        """Whether no match of `e` is a proper prefix of another (a sufficient test, by shape)."""
        e = self.leaf(e)
        if isinstance(e, (Chars, Literal)):
            return True
        if isinstance(e, Seq):
            return all(map(self.is_prefix_free, e.items))
        if isinstance(e, Repeat):
            return e.low == e.high and self.is_prefix_free(e.item)
        assert isinstance(e, Alt), f"not a terminal-level item: {e!r}"
        return (not _overlap([self.first(o) for o in e.options]) and not any(map(self.nullable, e.options))
                and all(map(self.is_prefix_free, e.options)))  # fmt: skip

    def tail(self, e: Expr) -> Chars:
        """For an ignored item: C when it is `P C*` with P prefix-free (or `C{n,}`), the characters whose
        coming next means `re`'s match went on; empty for any other shape (no condition)."""
        items = self.flat(e)
        last = self.leaf(items[-1])
        if not isinstance(last, Repeat) or last.high is not None or (c := self.single(last.item)) is None:
            return Chars(())
        if not (items[:-1] or last.low) or not all(map(self.is_prefix_free, items[:-1])):
            return Chars(())
        return c

    def flat(self, e: Expr) -> list[Expr]:
        """`e` as a sequence of items, a nested sequence at the end (also behind a Name) opened."""
        e = self.leaf(e)
        if not isinstance(e, Seq) or not e.items:
            return [e]
        return [*e.items[:-1], *self.flat(e.items[-1])]

    def split(self, e: Expr) -> list[Expr]:
        """An ignored item as separate items: the options of an alternation that start with different
        characters (`re` can then match only one of them at a place) are each an item."""
        leaf = self.leaf(e)
        if isinstance(leaf, Alt) and not _overlap([self.first(o) for o in leaf.options]):
            return [i for o in leaf.options for i in self.split(o)]
        return [e]


def _overlap(sets: list[Chars]) -> bool:
    seen = Chars(())
    for s in sets:
        if (seen & s).ranges:
            return True
        seen |= s
    return False


def _seq(head: Expr | None, *rest: Expr) -> Expr | None:
    return None if head is None else Seq((head, *rest)) if rest else head


def _alt(options: list[Expr | None]) -> Expr | None:
    kept = [o for o in options if o is not None]
    return None if not kept else kept[0] if len(kept) == 1 else Alt(tuple(kept))


_ANY = Chars(((0, MAX_CODE_POINT),)) - Chars(())  # every character (surrogates left out)
_State = tuple[Chars, bool]  # in a gap: the last item's tail (empty: none yet), whether the gap may end here


class Gaps:
    """The gap rules of one grammar: `before(token, ebnf)` is the EBNF for a gap then that token, `end()` the
    rule for the gap before the end of the text; `rules` holds the rules written so far."""

    def __init__(self, ignored: list[Expr], terminals: Terminals, write: Callable[[Expr], str]) -> None:
        self.terminals, self.write = terminals, write
        self.items = [i for e in ignored for i in terminals.split(e)]
        self.tails = [terminals.tail(i) for i in self.items]
        self.rules: list[str] = []
        self.names: dict[frozenset[int], str] = {}  # the items a gap may end with -> its rule

    def before(self, token: Expr, token_ebnf: str) -> str:
        first = self.terminals.first(token)
        ends = frozenset(j for j, t in enumerate(self.tails) if not (t & first).ranges)
        options = [f"{self.gap(ends)} {token_ebnf}"]
        for tail in dict.fromkeys(t for j, t in enumerate(self.tails) if j not in ends):
            cut = self.terminals.restrict(token, first - tail)  # the token's matches a gap ending so allows
            if cut is not None:
                more = ends | {j for j, t in enumerate(self.tails) if t == tail}
                options.append(f"{self.gap(more)} {self.write(cut)}")
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"

    def end(self) -> str:
        return self.gap(frozenset(range(len(self.items))))

    def gap(self, ends: frozenset[int]) -> str:
        """The rule for gaps whose last item is one of `ends` (or that are empty)."""
        if ends in self.names:
            return self.names[ends]
        name = self.names[ends] = f"ignore-{len(self.names) + 1}"
        runs = [r for i in self.items if (r := self.terminals.single(i) or self._run(i)) is not None]
        if len(ends) == len(runs) == len(self.items):  # any text of these characters
            self.rules.append(
                f"{name} ::= {write_chars(functools.reduce(operator.or_, runs), as_class=True)}*"
            )
            return name
        start: _State = (Chars(()), True)
        moves: dict[_State, list[tuple[Expr, _State]]] = {}  # state -> (item's text, next state)
        todo = [start]
        while todo:
            state = todo.pop()
            moves[state] = []
            for j, item in enumerate(self.items):
                cut = self.terminals.restrict(item, _ANY - state[0]) if state[0].ranges else item
                then = (self.tails[j], j in ends or not self.tails[j].ranges)
                if cut is not None:
                    moves[state].append((cut, then))
                    todo += [then] if then not in moves and then not in todo else []
        live = {s for s in moves if s[1]}  # states from which the gap can still end
        while grown := {s for s in moves if s not in live and any(t in live for _, t in moves[s])}:
            live |= grown
        names = {start: name} | {s: f"{name}-{i}" for i, s in enumerate(sorted(live - {start}, key=repr), 1)}
        for state in names:
            moving = [f"{self.write(cut)} {names[t]}" for cut, t in moves[state] if t in live]
            options = ['""'] * state[1] + moving
            self.rules.append(f"{names[state]} ::= {' | '.join(options)}")
        return name

    def _run(self, item: Expr) -> Chars | None:
        """C, for an item that is `C+`."""
        e = self.terminals.leaf(item)
        if isinstance(e, Repeat) and e.low == 1 and e.high is None:
            return self.terminals.single(e.item)
        return None
