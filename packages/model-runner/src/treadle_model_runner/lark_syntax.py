"""A Lark grammar's text read into definitions (lark_tree.py), which grammar_lark.py writes out as EBNF.

Lark's grammar language: `name: expansions` defines a rule (lowercase) or a terminal (UPPERCASE), optionally
prefixed `?` or `!`, with template parameters `name{a, b}` and a priority `.N`; alternatives are separated by
`|`, and an alternative may continue on the next line when that line starts with `|`; an alternative may end
with `-> alias`. Items are names, "strings" (with an `i` flag: case-insensitive), /regexes/flags, "a".."z"
ranges, (groups), [optional] items, the operators `? * +`, `~ n` and `~ n..m`, and template uses `name{args}`.
Statements: `%import`, `%ignore`, `%declare`, `%override`, `%extend`. Comments start with `//` or `#`; a
backslash at the end of a line continues it. Tree-shaping marks (`?`, `!`, `_`, aliases, priorities) change the
parse tree Lark builds, not the language, so they are read and dropped. A construct this reader does not know
is a ValueError naming the line.
"""

from __future__ import annotations

import re

from treadle_model_runner.lark_tree import (
    Alt,
    Call,
    CharRange,
    Definition,
    Expr,
    LarkGrammar,
    Literal,
    Name,
    Pattern,
    Repeat,
    Seq,
    is_terminal_name,
)

# One Lark grammar token: newline runs, skipped space / comments / line continuations, then the tokens proper.
# STRING and REGEXP are Lark's own token shapes (plus 'single-quoted' strings, which vLLM's converter takes).
_TOKEN = re.compile(
    r"""(?P<nl>(?:[ \t]*(?:(?://|\#)[^\n]*)?\r?\n)+)
      | (?P<skip>[ \t]+|(?://|\#)[^\n]*|\\[ ]*\r?\n)
      | (?P<string>"(?:\\"|\\\\|[^"\n])*?"i?|'(?:\\'|\\\\|[^'\n])*?'i?)
      | (?P<regexp>/(?!/)(?:\\/|\\\\|[^/])*?/[a-z]*)
      | (?P<directive>%[a-z]+)
      | (?P<name>[_a-zA-Z][_a-zA-Z0-9]*)
      | (?P<number>[+-]?\d+)
      | (?P<op>->|\.\.|[:|()\[\]{},?*+~.!])""",
    re.VERBOSE,
)
_RULE = re.compile(r"_?[a-z][_a-z0-9]*")


def lark_escapes(text: str) -> str:
    """A literal's or regex's body with Lark's escapes applied: \\n \\f \\t \\r \\xHH \\uHHHH \\UHHHHHHHH become
    the character, \\" a quote, \\\\ a backslash pair; any other backslash stays with the character after it."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "\\":
            out.append(text[i])
            i += 1
            continue
        if i + 1 == len(text):
            raise ValueError(f"a literal ends with a lone backslash: {text!r}")
        c = text[i + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(c, 0)
        if width:
            digits = text[i + 2 : i + 2 + width]
            if not re.fullmatch(f"[0-9a-fA-F]{{{width}}}", digits):
                raise ValueError(f"bad \\{c} escape in {text!r}: {width} hex digits expected")
            out.append(chr(int(digits, 16)))
        else:
            controls = {"n": "\n", "f": "\f", "t": "\t", "r": "\r", '"': '"', "\\": "\\\\"}
            out.append(controls.get(c, "\\" + c))
        i += 2 + width
    return "".join(out)


class _Parser:
    """Recursive descent over the token list; each error names the line and what it found."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int]] = []  # (kind, text, line); kinds: nl, string, ..., op, end
        line, pos, depth = 1, 0, 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ValueError(f"Lark grammar line {line}: unexpected character {text[pos]!r}")
            kind = m.lastgroup or ""
            if kind == "op":
                depth += m.group() in "([{"
                depth -= m.group() in ")]}"
            # a newline inside brackets is only space; a run of newlines (and comment lines) is one token
            if kind not in ("skip", "nl") or (kind == "nl" and depth <= 0 and self._last() != "nl"):
                self.tokens.append((kind, m.group(), line))
            line += m.group().count("\n")
            pos = m.end()
        self.tokens.append(("end", "", line))
        self.pos = 0

    def _last(self) -> str:
        return self.tokens[-1][0] if self.tokens else "nl"

    def peek(self, ahead: int = 0) -> tuple[str, str, int]:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        self.pos += 1
        return token

    def at(self, *texts: str) -> bool:
        kind, text, _ = self.peek()
        return kind == "op" and text in texts

    def expect(self, text: str, what: str) -> None:
        kind, got, line = self.take()
        if kind != "op" or got != text:
            raise ValueError(f"Lark grammar line {line}: expected {text!r} {what}, got {got or 'the end'!r}")

    def fail(self, message: str) -> ValueError:
        _, got, line = self.peek()
        return ValueError(f"Lark grammar line {line}: {message}, got {got.strip() or 'the end'!r}")

    def grammar(self) -> LarkGrammar:
        out = LarkGrammar()
        while self.peek()[0] != "end":
            kind, _, line = self.peek()
            if kind == "nl":
                self.take()
            elif kind == "directive":
                self.directive(out)
            else:
                definition = self.definition()
                if definition.name in out.definitions:
                    raise ValueError(f"Lark grammar line {line}: {definition.name} is defined twice "
                                     f"(first on line {out.definitions[definition.name].line})")  # fmt: skip
                out.definitions[definition.name] = definition
        return out

    def definition(self) -> Definition:
        while self.at("?", "!"):  # inline / keep-all-tokens marks: the parse tree's shape only
            self.take()
        kind, name, line = self.take()
        if kind != "name" or not (_RULE.fullmatch(name) or is_terminal_name(name)):
            self.pos -= 1
            raise self.fail("expected a rule (lowercase) or TERMINAL (uppercase) name to define")
        params: list[str] = []
        if self.at("{"):
            self.take()
            while True:
                pkind, param, pline = self.take()
                if pkind != "name" or not _RULE.fullmatch(param):
                    raise ValueError(f"Lark grammar line {pline}: a template parameter is a lowercase name, "
                                     f"got {param!r}")  # fmt: skip
                params.append(param)
                if not self.at(","):
                    break
                self.take()
            self.expect("}", f"after {name}'s template parameters")
        if self.at("."):  # priority: which parse Lark prefers, not what it accepts
            self.take()
            if self.take()[0] != "number":
                self.pos -= 1
                raise self.fail(f"expected a number after {name}.")
        self.expect(":", f"after {name}")
        body = self.expansions()
        self.end_of_statement(f"the definition of {name}")
        return Definition(name, tuple(params), body, line)

    def end_of_statement(self, what: str) -> None:
        if self.peek()[0] not in ("nl", "end"):
            raise self.fail(f"expected the end of the line after {what}")

    def expansions(self) -> Expr:
        options = [self.alias()]
        while self.at("|") or (self.peek()[0] == "nl" and self.peek(1)[:2] == ("op", "|")):
            self.pos += 1 if self.at("|") else 2
            options.append(self.alias())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def alias(self) -> Expr:
        items: list[Expr] = []
        while self.peek()[0] in ("name", "string", "regexp") or self.at("(", "["):
            items.append(self.expr())
        if self.at("->"):  # names the tree node only
            self.take()
            if self.take()[0] != "name":
                self.pos -= 1
                raise self.fail("expected a name after ->")
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def expr(self) -> Expr:
        atom = self.atom()
        if self.at("?", "*", "+"):
            low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[self.take()[1]]
            return Repeat(atom, low, high)
        if self.at("~"):
            self.take()
            low = high = self.number("~")
            if self.at(".."):
                self.take()
                high = self.number("~ n..")
            if high < low:
                raise self.fail(f"~ {low}..{high}: the upper bound is below the lower one")
            return Repeat(atom, low, high)
        return atom

    def number(self, after: str) -> int:
        kind, text, _ = self.take()
        if kind != "number" or int(text) < 0:
            self.pos -= 1
            raise self.fail(f"expected a count after {after}")
        return int(text)

    def atom(self) -> Expr:
        if self.at("(", "["):
            close = ")" if self.take()[1] == "(" else "]"
            inner = self.expansions()
            self.expect(close, "to close the group")
            return inner if close == ")" else Repeat(inner, 0, 1)
        return self.value()

    def value(self) -> Expr:
        kind, text, line = self.take()
        if kind == "regexp":
            end = text.rindex("/")
            if "\n" in text:
                raise ValueError(f"Lark grammar line {line}: a regex spans lines (Lark allows that only "
                                 "with the x flag, which is not supported here)")  # fmt: skip
            return Pattern(lark_escapes(text[1:end]), text[end + 1 :], line)
        if kind == "string":
            insensitive = text.endswith("i")
            body = text[1 : -2 if insensitive else -1]
            if text.startswith("'"):  # vLLM's converter reads 'text' as "text"; so does this one
                body = body.replace("\\'", "'")
            if not self.at(".."):
                return Literal(lark_escapes(body).replace("\\\\", "\\"), insensitive, line)
            self.take()
            hkind, high, _ = self.take()
            low_char, high_char = lark_escapes(body), lark_escapes(high[1:-1]) if hkind == "string" else ""
            if len(low_char) != 1 or len(high_char) != 1 or high_char < low_char:
                raise ValueError(f'Lark grammar line {line}: a range is "a".."z", one character to one '
                                 f"character not below it; got {text}..{high}")  # fmt: skip
            return CharRange(low_char, high_char, line)
        if kind == "name":
            if not self.at("{"):
                return Name(text, line)
            self.take()
            args = [self.value()]
            while self.at(","):
                self.take()
                args.append(self.value())
            self.expect("}", f"after the arguments of template {text}")
            return Call(text, tuple(args), line)
        self.pos -= 1
        raise self.fail("expected a name, a string, a /regex/, (, or [")

    def directive(self, out: LarkGrammar) -> None:
        _, word, line = self.take()
        if word == "%ignore":
            out.ignored.append(self.expansions())
        elif word == "%import":
            self.import_(out, line)
        else:
            why = {
                "%declare": "it declares terminals a postlexer makes, which have no text to match here",
                "%override": "it changes an imported grammar; define the rule or terminal itself instead",
                "%extend": "it changes an imported grammar; define the rule or terminal itself instead",
            }
            raise ValueError(f"Lark grammar line {line}: {word} is not supported: "
                             f"{why.get(word, 'Lark has no such statement')}")  # fmt: skip
        self.end_of_statement(word)

    def import_(self, out: LarkGrammar, line: int) -> None:
        path = [self.take()[1]]
        while self.at("."):
            self.take()
            path.append(self.take()[1])
        if path[0] != "common" or len(path) > 2:
            raise ValueError(f"Lark grammar line {line}: %import {'.'.join(path)} is not supported: only "
                             "Lark's common terminals can be imported (%import common.NAME)")  # fmt: skip
        if len(path) == 2:
            local = path[1]
            if self.at("->"):
                self.take()
                local = self.take()[1]
            out.imports.append((path[1], local, line))
            return
        self.expect("(", "after %import common (or use %import common.NAME)")
        while True:
            name = self.take()[1]
            out.imports.append((name, name, line))
            if not self.at(","):
                break
            self.take()
        self.expect(")", "to close the %import list")


def parse_lark(text: str) -> LarkGrammar:
    """`text` read as a Lark grammar; ValueError naming the line of what it cannot read."""
    return _Parser(text).grammar()
