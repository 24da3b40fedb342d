"""Random texts for a Lark grammar (tests only): members by random expansion, and near-misses by mutation.

The expansion walks the grammar as treadle reads it (lark_syntax), with Lark's own common.lark for imported
terminals, and samples each regex with Python's own regex parser. Whether a text belongs is never decided here:
the tests ask Lark's parser.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import lark

from treadle_model_runner.lark_syntax import parse_lark
from treadle_model_runner.lark_tree import (
    Alt,
    Call,
    CharRange,
    Definition,
    Expr,
    Literal,
    Name,
    Pattern,
    Repeat,
    Seq,
)

try:  # Python 3.11+
    import re._constants as sre_c
    import re._parser as sre_parse
except ImportError:  # pragma: no cover
    import sre_constants as sre_c  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

# ASCII, whitespace, and characters where Unicode classes and case folding differ from ASCII: the Kelvin sign
# and long s fold to k and s, dotted / dotless i, an Arabic-Indic digit, a no-break space, an emoji.
ALPHABET = [chr(c) for c in range(32, 127)] + list(" \t\n\r\f") + list("éßKſİı٣\u00a0😀")
_CATEGORIES = {
    sre_c.CATEGORY_DIGIT: r"\d",
    sre_c.CATEGORY_NOT_DIGIT: r"\D",
    sre_c.CATEGORY_WORD: r"\w",
    sre_c.CATEGORY_NOT_WORD: r"\W",
    sre_c.CATEGORY_SPACE: r"\s",
    sre_c.CATEGORY_NOT_SPACE: r"\S",
}


class TooDeep(Exception):
    pass


class Sampler:
    def __init__(self, grammar: str, rng: random.Random) -> None:
        self.rng = rng
        common = Path(lark.__file__).parent / "grammars" / "common.lark"
        self.common = parse_lark(common.read_text()).definitions
        parsed = parse_lark(grammar)
        self.defs: dict[str, Definition] = dict(parsed.definitions)
        for name, local, _ in parsed.imports:
            self.defs[local] = self.common[name]
        self.ignored = parsed.ignored
        self.start = "start" if "start" in self.defs else next(iter(parsed.definitions))
        literals = [c for d in self.defs.values() for c in _literal_chars(d.body)]
        self.letters = ALPHABET + literals * 3  # mutations favour the grammar's own characters

    def member(self) -> str:
        for _ in range(50):
            try:
                return self.expand(self.defs[self.start].body, {}, 0, True) + self.ignore(True)
            except TooDeep:
                continue
        raise AssertionError("the grammar does not terminate within the depth limit")

    def ignore(self, in_rule: bool) -> str:
        if not in_rule or not self.ignored or self.rng.random() < 0.6:
            return ""
        return self.expand(self.rng.choice(self.ignored), {}, 0, False)

    def expand(self, e: Expr, env: dict[str, Expr], depth: int, in_rule: bool) -> str:
        rng = self.rng
        if depth > 40:
            raise TooDeep
        if isinstance(e, Name):
            if e.name in env:
                return self.expand(env[e.name], {}, depth + 1, in_rule)
            d = self.defs.get(e.name) or self.common[e.name]
            terminal = d.is_terminal
            text = self.expand(d.body, {}, depth + 1, in_rule and not terminal)
            return (self.ignore(in_rule) if terminal else "") + text
        if isinstance(e, Call):
            d = self.defs[e.name]
            args = {
                p: env.get(a.name, a) if isinstance(a, Name) else a
                for p, a in zip(d.params, e.args, strict=True)
            }
            return self.expand(d.body, args, depth + 1, in_rule)
        if isinstance(e, Literal):
            text = e.text
            if e.insensitive:
                text = "".join(rng.choice([c.upper(), c.lower(), *_folds(c)]) for c in text)
            return self.ignore(in_rule) + text
        if isinstance(e, CharRange):
            return self.ignore(in_rule) + chr(rng.randint(ord(e.low), ord(e.high)))
        if isinstance(e, Pattern):
            flags = re.IGNORECASE if "i" in e.flags else 0
            flags |= re.DOTALL if "s" in e.flags else 0
            return self.ignore(in_rule) + self.regex(list(sre_parse.parse(e.regex, flags)), flags)
        if isinstance(e, Repeat):
            high = e.low + 3 if e.high is None else e.high
            count = rng.randint(e.low, e.low if depth > 20 else high)
            return "".join(self.expand(e.item, env, depth + 1, in_rule) for _ in range(count))
        if isinstance(e, Seq):
            return "".join(self.expand(i, env, depth + 1, in_rule) for i in e.items)
        assert isinstance(e, Alt)
        return self.expand(rng.choice(e.options), env, depth + 1, in_rule)

    def regex(self, items: list[tuple[object, object]], flags: int) -> str:
        out = []
        for op, av in items:
            if op is sre_c.LITERAL:
                c = chr(av)  # type: ignore[arg-type]
                out.append(self.rng.choice([c.upper(), c.lower(), *_folds(c)]) if flags & re.I else c)
            elif op in (sre_c.ANY, sre_c.NOT_LITERAL, sre_c.IN):
                test = re.compile(_item_regex(op, av), flags)
                out.append(self.rng.choice([c for c in ALPHABET if test.fullmatch(c)]))
            elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None)):
                low, high, sub = av  # type: ignore[misc]
                count = self.rng.randint(low, min(high, low + 4))
                out += [self.regex(list(sub), flags) for _ in range(count)]
            elif op is sre_c.SUBPATTERN:
                out.append(self.regex(list(av[-1]), flags))  # type: ignore[index]
            elif op is sre_c.BRANCH:
                out.append(self.regex(list(self.rng.choice(av[1])), flags))  # type: ignore[index]
        return "".join(out)  # anchors and assertions add no text

    def mutant(self) -> str:
        """A member with one to three random edits, or a short random text."""
        rng = self.rng
        if rng.random() < 0.1:
            return "".join(rng.choice(self.letters) for _ in range(rng.randint(0, 6)))
        text = self.member()
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, len(text))
            kind = rng.randrange(5)
            if kind == 0 and i < len(text):
                text = text[:i] + text[i + 1 :]  # delete
            elif kind == 1:
                text = text[:i] + rng.choice(self.letters) + text[i:]  # insert
            elif kind == 2 and i < len(text):
                text = text[:i] + rng.choice(self.letters) + text[i + 1 :]  # replace
            elif kind == 3:
                j = rng.randint(i, min(len(text), i + 4))
                text = text[:j] + text[i:j] + text[j:]  # repeat a piece
            else:
                text = text[:i]  # cut the end
        return text


def _item_regex(op: object, av: object) -> str:
    if op is sre_c.ANY:
        return "."
    if op is sre_c.NOT_LITERAL:
        return "[^" + re.escape(chr(av)) + "]"  # type: ignore[arg-type]
    parts = []
    for kind, value in av:  # type: ignore[attr-defined]
        if kind is sre_c.NEGATE:
            parts.insert(0, "^")
        elif kind is sre_c.LITERAL:
            parts.append(re.escape(chr(value)))
        elif kind is sre_c.RANGE:
            parts.append(re.escape(chr(value[0])) + "-" + re.escape(chr(value[1])))
        elif kind is sre_c.CATEGORY:
            parts.append(_CATEGORIES[value])
    return "[" + "".join(parts) + "]"


def _folds(c: str) -> list[str]:
    """Characters Python's re takes for `c` under the i flag, from the test alphabet."""
    return [a for a in ALPHABET if re.fullmatch(re.escape(c), a, re.IGNORECASE)]


def _literal_chars(e: Expr) -> list[str]:
    if isinstance(e, Literal):
        return list(e.text)
    if isinstance(e, Repeat):
        return _literal_chars(e.item)
    if isinstance(e, (Seq, Alt)):
        return [c for i in (e.items if isinstance(e, Seq) else e.options) for c in _literal_chars(i)]
    return []
