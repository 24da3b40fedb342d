"""Lark grammars with `%ignore`, and the EBNF shapes xgrammar masks fast.

The converted grammar must accept exactly what Lark's parser accepts (lark_judges.py) where Lark skips ignored
text by maximal munch: a `#` comment runs to the end of its line, so `a #c b` is refused; a whitespace run is
taken whole, so a token that starts with whitespace cannot follow one. And an alternation of single characters
(`" " | "\\t"`, HEXDIGIT's options, `"*" | "/"`) is written as one character class, the whitespace between
tokens as one bare `[...]*`."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lark_judges import lark_judge, xgrammar_judge
from lark_sampler import Sampler

from treadle_model_runner.grammar_lark import lark_to_ebnf

SH_COMMENTS = r"""
start: item+
item: NAME | NUMBER | "(" item* ")"
NAME: /[a-z]+/
%import common.NUMBER
%import common.WS
%import common.SH_COMMENT
%ignore WS
%ignore SH_COMMENT
"""

C_COMMENTS = r"""
start: NAME ("," NAME)* ";"?
NAME: /[a-z_]+/
%import common.WS_INLINE
%import common.CPP_COMMENT
%import common.C_COMMENT
%import common.NEWLINE
%ignore WS_INLINE
%ignore CPP_COMMENT
%ignore C_COMMENT
%ignore NEWLINE
"""

# a newline token after an ignored comment: the comment may end right before it
NEWLINE_TOKEN = r"""
start: (stmt _NL)* stmt?
stmt: NAME "=" NAME
_NL: /(\r?\n)+/
NAME: /[a-z]+/
%import common.WS_INLINE
%import common.SQL_COMMENT
%ignore WS_INLINE
%ignore SQL_COMMENT
"""

# tokens that start with ignored characters: whole (" x"), partly (/\s*z/) or with the comment's "#"
IGNORED_STARTS = r"""
start: "a" (" x" | "\ty" | /\s*z/ | "#q")+
%import common.WS
%import common.SH_COMMENT
%ignore WS
%ignore SH_COMMENT
"""

# single-character alternations in terminals and rules, from strings, ranges, regexes and common.*
CLASSES = r"""
start: item ("," item)*
item: HEX | OP | KEY | LETTERS | NUM | ("<" | ">")
HEX: "0x" HEXDIGIT~1..4
OP: "+" | "-" | ("*" | "/")
KEY: ("k"i | "v"i | "_") ("e"i "y"i)?
LETTERS: /[a-c]|d|\t/+
NUM: DIGIT+ ("." DIGIT | "e"i DIGIT)?
%import common.HEXDIGIT
%import common.DIGIT
%import common.WS_INLINE
%ignore WS_INLINE
"""


@pytest.mark.parametrize(
    ("grammar", "seed"),
    [(SH_COMMENTS, 10), (C_COMMENTS, 11), (NEWLINE_TOKEN, 12), (IGNORED_STARTS, 13), (CLASSES, 14)],
    ids=["sh-comments", "c-comments", "newline-token", "ignored-starts", "classes"],
)
def test_ignored_text_is_skipped_as_lark_skips_it(grammar: str, seed: int) -> None:
    expected, accepts = lark_judge(grammar), xgrammar_judge(grammar)
    sampler = Sampler(grammar, random.Random(seed))
    texts = [sampler.member() for _ in range(150)] + [sampler.mutant() for _ in range(250)]
    verdicts = {True: 0, False: 0}
    for text in dict.fromkeys(texts):
        verdict = expected(text)
        assert accepts(text) == verdict, (text, verdict)
        verdicts[verdict] += 1
    assert verdicts[True] >= 40 and verdicts[False] >= 40, verdicts  # both sides were tried


@pytest.mark.parametrize(
    ("grammar", "accepted", "refused"),
    [
        # a comment swallows the rest of its line (")", " b)"); a newline (part of WS) ends it; at the end of
        # the text it may swallow what would otherwise be tokens ("a #c b" is the item a and a comment)
        (SH_COMMENTS, ["(a #c\n)", "(a #c\n#d\n b)", "(a)#c", "a #c b"], ["(a #c)", "(a #c b)", "(a#c\t)"]),
        # // runs to the end of the line, /* */ to its close
        (C_COMMENTS, ["a, //c\nb", "a /*c*/ ,b", "a, /*c*/b", "a //c ,b"], ["a, //c b", "a, /*c*/ //d b"]),
        # a comment right before the newline token
        (NEWLINE_TOKEN, ["a=b --c\nd=e", "a = b--c\n"], ["a= --c b", "a=b --c\nd= --x e"]),
        # after a whitespace run the next token cannot start with whitespace, nor after a comment with
        # anything but a newline
        (
            IGNORED_STARTS,
            ["a x", "a\ty", "a \nz", "a #c\nz", "a #c\n\n z"],
            ["a  x", "a \ty", "a #c#q", "a #c\n x"],
        ),
    ],
    ids=["sh-comments", "c-comments", "newline-token", "ignored-starts"],
)
def test_near_misses_of_ignored_comments(grammar: str, accepted: list[str], refused: list[str]) -> None:
    expected, accepts = lark_judge(grammar), xgrammar_judge(grammar)
    for text in accepted + refused:
        assert expected(text) == (text in accepted), f"Lark itself: {text!r}"  # the cases mean what they say
        assert accepts(text) == (text in accepted), text


# an EBNF alternation of two one-character strings: what should have been a class
_CHAR_ALTERNATION = re.compile(r'"(?:\\u[0-9a-f]{4}|[^"\\])" \| "(?:\\u[0-9a-f]{4}|[^"\\])"')


@pytest.mark.parametrize(
    ("ignore", "gap"),
    [
        ("%import common.WS_INLINE\n%ignore WS_INLINE", r"[\u0009 ]*"),
        ("%import common.WS\n%ignore WS", r"[\u0009-\u000a\u000c-\u000d ]*"),
        ('%ignore /[ \\t]+/\n%ignore "\\n"', r"[\u0009-\u000a ]*"),
        ('%ignore " "', "[ ]*"),
    ],
    ids=["WS_INLINE", "WS", "regex-and-string", "one-space"],
)
def test_whitespace_between_tokens_is_one_bare_class(ignore: str, gap: str) -> None:
    grammar = CLASSES.split("%import common.WS_INLINE")[0] + ignore
    ebnf = lark_to_ebnf(grammar)
    assert f"ignore-1 ::= {gap}\n" in ebnf, ebnf
    assert not _CHAR_ALTERNATION.search(ebnf), ebnf
    # HEXDIGIT's ranges and DIGIT, the rule's "<" | ">", OP's "*" | "/", KEY's "k"i | "v"i | "_"
    merged = ["common-HEXDIGIT ::= [0-9A-Fa-f]", r"OP ::= [*-+\u002d/]", r"KEY ::= ([KV_kv\u212a] "]
    for rule in [*merged, r"ignore-1 HEX | ignore-1 [*-+\u002d/<>] | "]:  # OP | "<" | ">" in a rule too
        assert rule in ebnf, (rule, ebnf)
    expected, accepts = lark_judge(grammar), xgrammar_judge(grammar)
    for text in ["0x1f, 0XAB", "ke , _, 12.5 ,a\tb", "12e3,<", "0x", "ab ,\t a", "ke y", "* /"]:
        assert accepts(text) == expected(text), text
