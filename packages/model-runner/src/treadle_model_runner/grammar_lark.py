"""Lark grammars for structured outputs: detected as vLLM detects them, written out as xgrammar EBNF.

vLLM takes a `grammar` with no `::=` on any line (comments aside) to be Lark and converts it before xgrammar
compiles it; `is_lark` is that test. `lark_to_ebnf` reads the grammar (lark_syntax.py) and writes one EBNF rule
per Lark rule and terminal; the root is `start` (or, as in vLLM, the first definition when there is no
`start`). Terminals keep Python `re`'s meaning (lark_regex.py). `%import common.NAME` brings in Lark's common
terminals (their helpers under private names, so a grammar's own DIGIT does not change common.INT), and
templates are instantiated once per distinct argument list.

What "accepts" means: the EBNF is a context-free grammar over characters, where a terminal may match any text
its pattern matches. That is Lark's Earley parser with `lexer="dynamic_complete"`. Lark's default dynamic
lexer tries only the first match of each terminal's regex at a position (usually the longest), so it can
refuse a text this accepts (`start: WORD "a"` on "aa"); and for a regex whose alternatives are prefixes of one
another (`/a|ab/`) Python's `re` never returns the longer one, where the EBNF allows both.

`%ignore X`: Lark skips X between any two tokens, before the first and after the last, each time taking the one
match Python's `re` finds (a comment runs to the end of its line). In rules (not inside terminals) every token
is preceded by a gap rule that accepts exactly such chains of matches for the common shapes of ignored
terminals (lark_ignore.py says which, and where it stays approximate), and the root ends with one. Regexes and
literals are read into trees of characters (lark_regex.py) and written in the shapes xgrammar masks fastest
(lark_ebnf.py): whitespace gaps become one `[...]*`.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable

from treadle_model_runner.lark_ebnf import merge_single_chars, repeat, write_tree
from treadle_model_runner.lark_ignore import Gaps, Terminals
from treadle_model_runner.lark_regex import literal_tree, regex_tree
from treadle_model_runner.lark_syntax import parse_lark
from treadle_model_runner.lark_tree import (
    Alt,
    Call,
    CharRange,
    Chars,
    Definition,
    Expr,
    LarkGrammar,
    Literal,
    Name,
    Pattern,
    Repeat,
    Seq,
)

# Lark's common.lark, with its one lazy, lookbehind-using string pattern written as the language it matches
# (a quote, then characters or backslash escapes, no line break, up to the first unescaped quote) and the C
# comment likewise (up to the first "*/").
_COMMON = r"""
DIGIT: "0".."9"
HEXDIGIT: "a".."f"|"A".."F"|DIGIT
INT: DIGIT+
SIGNED_INT: ["+"|"-"] INT
DECIMAL: INT "." INT? | "." INT
_EXP: ("e"|"E") SIGNED_INT
FLOAT: INT _EXP | DECIMAL _EXP?
SIGNED_FLOAT: ["+"|"-"] FLOAT
NUMBER: FLOAT | INT
SIGNED_NUMBER: ["+"|"-"] NUMBER
ESCAPED_STRING: "\"" /([^"\\\n]|\\[^\n])*/ "\""
LCASE_LETTER: "a".."z"
UCASE_LETTER: "A".."Z"
LETTER: UCASE_LETTER | LCASE_LETTER
WORD: LETTER+
CNAME: ("_"|LETTER) ("_"|LETTER|DIGIT)*
WS_INLINE: (" "|/\t/)+
WS: /[ \t\f\r\n]/+
CR : /\r/
LF : /\n/
NEWLINE: (CR? LF)+
SH_COMMENT: /#[^\n]*/
CPP_COMMENT: /\/\/[^\n]*/
C_COMMENT: /\/\*([^*]|\*+[^*\/])*\*+\//
SQL_COMMENT: /--[^\n]*/
"""
_MAX_INSTANCES = 256  # template instances in one grammar


def is_lark(grammar: object) -> bool:
    """vLLM's test: a non-empty text where no line (with `#` and `//` comments cut) holds EBNF's `::=`."""
    if not isinstance(grammar, str) or not grammar:
        return False
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.split("\n"))


@functools.cache
def _common() -> dict[str, Definition]:
    return parse_lark(_COMMON).definitions


def lark_to_ebnf(text: str) -> str:
    """The Lark grammar `text` as xgrammar EBNF (root rule `root`); ValueError naming the construct and line of
    what cannot be converted."""
    return _Writer(parse_lark(text)).write()


def _ebnf_name(name: str) -> str:
    return "root-rule" if name == "root" else name


class _Writer:
    def __init__(self, grammar: LarkGrammar) -> None:
        self.grammar = grammar
        self.defs = dict(grammar.definitions)  # the user's, then the imported ones
        self.rules: list[str] = []  # EBNF rules written so far
        self.instances: dict[tuple[str, str], str] = {}  # (template, its arguments written out) -> instance
        self.pending: list[tuple[str, Definition, tuple[Expr, ...]]] = []  # instances to write
        for common, local, line in grammar.imports:
            self.import_(common, local, line)
        self.terminals = Terminals(self.defs)
        self.gaps: Gaps | None = None  # the ignored texts between tokens (lark_ignore.py), made in write()

    def import_(self, common: str, local: str, line: int) -> None:
        if common not in _common() or common.startswith("_"):
            names = ", ".join(n for n in _common() if not n.startswith("_"))
            raise ValueError(f"Lark grammar line {line}: %import common.{common}: common has no such terminal; "
                             f"it has {names}")  # fmt: skip
        if local in self.defs:
            raise ValueError(f"Lark grammar line {line}: %import brings in {local}, which is already defined")
        self.defs[local] = Definition(local, (), Name(f"common-{common}", line), line)
        todo = [common]
        while todo:  # the common terminal and what it uses, under private names
            name = todo.pop()
            if f"common-{name}" not in self.defs:
                d = _common()[name]
                self.defs[f"common-{name}"] = Definition(f"common-{name}", (), _rename(d.body), d.line)
                todo += _names(d.body)

    def write(self) -> str:
        if not self.grammar.definitions:
            raise ValueError('Lark grammar: no rule is defined (write e.g. `start: "yes" | "no"`)')
        start = "start" if "start" in self.defs else next(iter(self.grammar.definitions))
        if self.defs[start].params:
            raise ValueError(f"Lark grammar: the start rule {start} is a template; give it no parameters")
        for d in self.defs.values():  # every literal and regex read once, so that an error names its owner
            _leaves(d.body, d.name, self.tree)
        for e in self.grammar.ignored:
            _leaves(e, "%ignore", self.tree)
        for d in self.defs.values():
            if d.is_terminal and d.name in self.terminal_names(d.body):
                raise ValueError(f"Lark grammar line {d.line} ({d.name}): the terminal {d.name} refers to "
                                 "itself; recursion is only allowed in rules, not terminals")  # fmt: skip
        plain = [d for d in self.defs.values() if not d.params]
        # terminals and ignored items first: what the gaps look into is then known to be well defined
        bodies = {d.name: self.expr(d.body, d, {}) for d in plain if d.is_terminal}
        if self.grammar.ignored:
            for e in self.grammar.ignored:
                self.expr(e, _IGNORED, {})
            self.gaps = Gaps(self.grammar.ignored, self.terminals, lambda e: self.expr(e, _IGNORED, {}))
        bodies |= {d.name: self.expr(d.body, d, {}) for d in plain if not d.is_terminal}
        self.rules.append(f"root ::= {_ebnf_name(start)}{' ' + self.gaps.end() if self.gaps else ''}")
        self.rules += [f"{_ebnf_name(d.name)} ::= {bodies[d.name]}" for d in plain]
        while self.pending:
            name, template, args = self.pending.pop()
            params = dict(zip(template.params, args, strict=True))
            self.rules.append(f"{name} ::= {self.expr(template.body, template, params)}")
        return "\n".join(self.rules + (self.gaps.rules if self.gaps else [])) + "\n"

    def expr(self, e: Expr, owner: Definition, params: dict[str, Expr]) -> str:
        """`e`, inside definition `owner` (a terminal, a rule or the ignored items), as EBNF; `params` maps a
        template's parameters to its arguments."""
        in_rule = not owner.is_terminal and owner is not _IGNORED
        where = f"Lark grammar line {getattr(e, 'line', owner.line)} ({owner.name})"
        if isinstance(e, Name):
            if e.name in params:
                return self.expr(params[e.name], owner, {})
            d = self.defs.get(e.name)
            if d is None:
                raise ValueError(f"{where}: {e.name} is used but not defined"
                                 + (" (%import common." + e.name + "?)" if e.name in _common() else ""))  # fmt: skip
            if d.params:
                raise ValueError(f"{where}: {e.name} is a template; use it as {e.name}{{...}}")
            if not in_rule and not d.is_terminal:
                raise ValueError(f"{where}: the rule {e.name} is used inside a terminal (terminals can only "
                                 "use terminals)")  # fmt: skip
            return self.token(e, _ebnf_name(e.name)) if in_rule and d.is_terminal else _ebnf_name(e.name)
        if isinstance(e, (Literal, Pattern, CharRange, Chars)):
            tree = self.tree(e, where)
            return self.token(tree, write_tree(tree)) if in_rule else write_tree(tree)
        if isinstance(e, Repeat):
            inner = self.expr(e.item, owner, params)
            return repeat(inner, e.low, e.high, None if in_rule else self.single(e.item, params))
        if isinstance(e, Seq):
            return "(" + " ".join(self.expr(i, owner, params) for i in e.items) + ")" if e.items else '""'
        if isinstance(e, Alt):
            options = merge_single_chars(e.options, lambda o: self.single(o, params))
            if len(options) == 1:
                return self.expr(options[0], owner, params)
            return "(" + " | ".join(self.expr(o, owner, params) for o in options) + ")"
        return self.call(e, owner, params, where)

    def terminal_names(self, e: Expr) -> set[str]:
        """The terminals `e` uses, directly or through other terminals."""
        seen: set[str] = set()
        todo = [n for n in _names(e) if n in self.defs and self.defs[n].is_terminal]
        while todo:
            if (name := todo.pop()) not in seen:
                seen.add(name)
                todo += [
                    n for n in _names(self.defs[name].body) if n in self.defs and self.defs[n].is_terminal
                ]
        return seen

    def token(self, e: Expr, ebnf: str) -> str:
        """A token of a rule (a terminal, a literal, a regex), after the ignored text that may come before it."""
        return self.gaps.before(e, ebnf) if self.gaps else ebnf

    @staticmethod
    def tree(e: Expr, where: str) -> Expr:
        """A literal, regex or range read into a tree of characters (lark_regex.py)."""
        if isinstance(e, Literal):
            return literal_tree(e.text, e.insensitive, where)
        if isinstance(e, Pattern):
            return regex_tree(e.regex, e.flags, where)
        if isinstance(e, CharRange):
            return Chars(((ord(e.low), ord(e.high)),))
        return e

    def single(self, e: Expr, params: dict[str, Expr]) -> Chars | None:
        """The characters `e` matches when each of its matches is one character (template parameters are
        their arguments; rules and template uses are not one character)."""
        if isinstance(e, Name) and e.name in params:
            return self.single(params[e.name], {})
        if isinstance(e, Alt):
            sets = [self.single(o, params) for o in e.options]
            return None if None in sets else functools.reduce(operator.or_, sets)  # type: ignore[arg-type]
        if isinstance(e, Name):
            d = self.defs.get(e.name)
            return self.terminals.single(e) if d is not None and d.is_terminal and not d.params else None
        return None if isinstance(e, (Call, Repeat, Seq)) else self.terminals.single(e)

    def call(self, e: Call, owner: Definition, params: dict[str, Expr], where: str) -> str:
        template = self.defs.get(e.name)
        if template is None or not template.params:
            raise ValueError(f"{where}: {e.name}{{...}} uses {e.name}, which is not a template")
        if len(e.args) != len(template.params):
            raise ValueError(f"{where}: template {e.name} takes {len(template.params)} arguments "
                             f"({', '.join(template.params)}), got {len(e.args)}")  # fmt: skip
        args = tuple(_substitute(a, params) for a in e.args)
        key = (e.name, re.sub(r"line=\d+", "", repr(args)))  # the same arguments wherever the use stands
        if key not in self.instances:
            if len(self.instances) >= _MAX_INSTANCES:
                raise ValueError(f"{where}: more than {_MAX_INSTANCES} template instances (a template that "
                                 "instantiates itself with ever new arguments?)")  # fmt: skip
            self.instances[key] = f"{e.name}-{len(self.instances) + 1}"
            self.pending.append((self.instances[key], template, args))
        return self.instances[key]


_IGNORED = Definition("%ignore", (), Seq(()), 0)  # the owner of the ignored items: written as terminals


def _leaves(e: Expr, owner: str, read: Callable[[Expr, str], object]) -> None:
    """`read(leaf, where)` called on each literal, regex and range in `e`, a part of `owner`."""
    if isinstance(e, (Literal, Pattern, CharRange)):
        read(e, f"Lark grammar line {e.line} ({owner})")
    parts = {Seq: "items", Alt: "options", Call: "args"}.get(type(e))
    for item in (e.item,) if isinstance(e, Repeat) else getattr(e, parts) if parts else ():
        _leaves(item, owner, read)


def _names(e: Expr) -> list[str]:
    if isinstance(e, Name):
        return [e.name]
    if isinstance(e, Repeat):
        return _names(e.item)
    if isinstance(e, (Seq, Alt)):
        return [n for i in (e.items if isinstance(e, Seq) else e.options) for n in _names(i)]
    return []


def _substitute(e: Expr, names: dict[str, Expr]) -> Expr:
    """`e` with each Name in `names` replaced by what it maps to."""
    if isinstance(e, Name):
        return names.get(e.name, e)
    if isinstance(e, Repeat):
        return Repeat(_substitute(e.item, names), e.low, e.high)
    if isinstance(e, Seq):
        return Seq(tuple(_substitute(i, names) for i in e.items))
    if isinstance(e, Alt):
        return Alt(tuple(_substitute(o, names) for o in e.options))
    if isinstance(e, Call):
        return Call(e.name, tuple(_substitute(a, names) for a in e.args), e.line)
    return e


def _rename(e: Expr) -> Expr:
    """A common definition's body with its references made private (common-NAME)."""
    return _substitute(e, {n: Name(f"common-{n}", 0) for n in _names(e)})
