"""A Lark terminal's regex, literal or character range read into a tree of lark_tree items (lark_ebnf.py writes
it out as EBNF).

Lark matches terminals with Python's `re`, so that is the meaning kept here. The regular part maps one to one
onto the tree: concatenation (Seq), `|` (Alt), groups, `* + ?`, `{m}`, `{m,}`, `{m,n}` (Repeat). Every
single-character item (a class `[...]`, `.`, an escape such as `\\d`, `\\w` or `\\s`, a character under the
`i` flag) becomes `Chars`, its exact set of code points, found by running Python's `re` itself over every code
point once (cached), so Unicode classes and case folding match what Lark would accept (surrogates left out: a
UTF-8 reply cannot hold them). Constructs that are not regular or depend on how the match is searched are
refused by name: anchors and word boundaries, lookarounds, backreferences, lazy and possessive quantifiers,
inline flags and conditionals, and the `x` and `l` flags.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import warnings

from treadle_model_runner.lark_tree import (
    MAX_CODE_POINT,
    SURROGATES,
    Alt,
    Chars,
    Expr,
    Literal,
    Repeat,
    Seq,
    chars,
)

_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": 0, "u": 0}  # m: only anchors, which are refused anyway
_QUANTIFIER = re.compile(r"\{(\d*)(?:(,)(\d*))?\}")
_REFUSED_ESCAPES = {"A": "the anchor \\A", "Z": "the anchor \\Z", "b": "the word boundary \\b",
                    "B": "the word boundary \\B"}  # fmt: skip


@functools.cache
def _every_code_point() -> str:
    return "".join(map(chr, range(MAX_CODE_POINT + 1)))


@functools.lru_cache(maxsize=4096)
def code_points(item: str, flags: int) -> Chars:
    """The code point ranges a one-character Python regex `item` matches under `flags` (surrogates left out)."""
    text = _every_code_point()
    if not flags and item.startswith("[") and item.isascii() and "\\" not in item and "^" not in item:
        text = text[:128]  # a plain ASCII class: nothing past ASCII can match
    ranges = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pattern = re.compile(f"(?:{item})+", flags)
    for m in pattern.finditer(text):
        low, high = m.start(), m.end() - 1
        if low <= SURROGATES[1] and high >= SURROGATES[0]:  # cut the surrogates out
            ranges += [(low, SURROGATES[0] - 1)] if low < SURROGATES[0] else []
            ranges += [(SURROGATES[1] + 1, high)] if high > SURROGATES[1] else []
        else:
            ranges.append((low, high))
    return chars(ranges)


def literal_tree(text: str, insensitive: bool, what: str) -> Expr:
    """A Lark string literal ("text", "text"i) as a tree: itself, or under the i flag each character's case
    variants in turn."""
    if not text:
        raise ValueError(f"{what}: an empty string literal (Lark does not allow empty terminals)")
    if not insensitive:
        return Literal(text, False, 0)
    items = tuple(code_points(re.escape(c), re.IGNORECASE) for c in text)
    return items[0] if len(items) == 1 else Seq(items)


def _single_char(item: str) -> int | None:
    """The code point a character or an escape such as \\n, \\x41 or \\. stands for (None for \\d and the like)."""
    if len(item) == 1:
        return ord(item)
    c = item[1]
    if c in "dDwWsS":
        return None
    if c in "xuU":
        return int(item[2:], 16)
    if c == "N":
        return ord(unicodedata.lookup(item[3:-1]))
    if c.isdigit():
        return int(item[1:], 8)
    return ord({"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}.get(c, c))


@functools.lru_cache(maxsize=1024)
def regex_tree(regex: str, flags: str, what: str) -> Expr:
    """A Lark /regex/flags as a tree; ValueError naming `what` and the construct it cannot take."""
    for flag in flags:
        if flag not in _FLAGS:
            why = {"x": "verbose regexes", "l": "locale-dependent matching"}.get(flag, "an unknown flag")
            raise ValueError(
                f"{what}: the regex flag {flag!r} ({why}) is not supported; use flags i, s, m, u"
            )
    try:
        with warnings.catch_warnings():  # Python's notes on nested sets ("[[", "--"): its meaning is kept
            warnings.simplefilter("ignore", FutureWarning)
            re.compile(regex)
    except re.error as e:
        raise ValueError(f"{what}: /{regex}/ is not a valid regex ({e})") from None
    return _RegexReader(regex, functools.reduce(lambda a, f: a | _FLAGS[f], flags, 0), what).read()


class _RegexReader:
    def __init__(self, regex: str, flags: int, what: str) -> None:
        self.s, self.i, self.flags, self.what = regex, 0, flags, what

    def refuse(self, construct: str) -> ValueError:
        return ValueError(f"{self.what}: {construct} in /{self.s}/ is not supported (xgrammar's EBNF has no "
                          "equivalent; write the terminal without it)")  # fmt: skip

    def read(self) -> Expr:
        out = self.alternatives()
        if self.i < len(self.s):  # an unmatched ")" (re.compile has already refused it)
            raise self.refuse(f"{self.s[self.i]!r} at position {self.i}")
        return out

    def alternatives(self) -> Expr:
        options = [self.sequence()]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def sequence(self) -> Expr:
        items: list[Expr] = []
        while self.i < len(self.s) and self.s[self.i] not in "|)":
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def quantified(self, atom: Expr) -> Expr:
        s, i = self.s, self.i
        if i < len(s) and s[i] in "*+?":
            (low, high), self.i = {"*": (0, None), "+": (1, None), "?": (0, 1)}[s[i]], i + 1
        elif (m := _QUANTIFIER.match(s, i)) and m.group() != "{}":  # else "{" is a literal, as in re
            low = int(m.group(1) or "0")
            high = low if not m.group(2) else int(m.group(3)) if m.group(3) else None
            self.i = m.end()
        else:
            return atom
        if self.i < len(s) and s[self.i] in "?+":
            raise self.refuse("a lazy quantifier" if s[self.i] == "?" else "a possessive quantifier")
        return Repeat(atom, low, high)

    def atom(self) -> Expr:
        s, i = self.s, self.i
        c = s[i]
        if c == "(":
            return self.group()
        if c in "^$":
            raise self.refuse(f"the anchor {c!r}")
        if c == "[":
            end = i + 1 + (s[i + 1] == "^")
            end += s[end] == "]"  # a "]" first is a member
            while s[end] != "]":
                end += 2 if s[end] == "\\" else 1
            self.i = end + 1
            return self.nonempty(code_points(s[i : end + 1], self.flags), f"{self.what}: {s[i : end + 1]}")
        if c == ".":
            self.i = i + 1
            return self.nonempty(code_points(".", self.flags), self.what)
        if c == "\\":
            return self.escape()
        self.i = i + 1
        return self.one(re.escape(c))

    def one(self, item: str) -> Chars:
        """One character or class escape (under the i flag: every case variant Python's re takes for it)."""
        cp = None if self.flags & re.IGNORECASE else _single_char(item)
        if cp is not None:
            return Chars(((cp, cp),))
        return self.nonempty(code_points(item, self.flags & re.IGNORECASE), self.what)

    @staticmethod
    def nonempty(c: Chars, what: str) -> Chars:
        if not c.ranges:
            raise ValueError(f"{what} matches no character")
        return c

    def escape(self) -> Chars:
        s, i = self.s, self.i
        c = s[i + 1]
        if c in _REFUSED_ESCAPES:
            raise self.refuse(_REFUSED_ESCAPES[c])
        if m := re.compile(r"0[0-7]{0,2}|[0-7]{3}").match(s, i + 1):
            end = m.end()  # an octal escape
        elif c.isdigit():
            raise self.refuse(f"the backreference \\{c}")
        else:
            width = {"x": 2, "u": 4, "U": 8}.get(c, 0)
            end = s.index("}", i) + 1 if c == "N" else i + 2 + width
        self.i = end
        return self.one(s[i:end])

    def group(self) -> Expr:
        s, i = self.s, self.i
        if s.startswith("(?", i) and not s.startswith(("(?:", "(?P<"), i):
            kinds = {"(?=": "a lookahead", "(?!": "a negative lookahead", "(?<=": "a lookbehind",
                     "(?<!": "a negative lookbehind", "(?P=": "a backreference", "(?(": "a conditional",
                     "(?>": "an atomic group", "(?#": "a comment group"}  # fmt: skip
            opening = next((k for k in kinds if s.startswith(k, i)), "(?flags")
            raise self.refuse(f"{kinds.get(opening, 'an inline flag group')} {opening}...)")
        if s.startswith("(?:", i):
            self.i = i + 3
        else:  # a group, named or not: its name does not change what it matches
            self.i = s.index(">", i) + 1 if s.startswith("(?P<", i) else i + 1
        inner = self.alternatives()
        self.i += 1  # the ")"
        return inner
