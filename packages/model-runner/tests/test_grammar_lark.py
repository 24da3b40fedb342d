"""Lark grammars as structured outputs: the converted EBNF accepts exactly what Lark's parser accepts.

Lark (the PyPI package, a test dependency only) is the oracle: for each grammar, random members (by random
expansion) and near-misses (random edits) are judged by Lark's Earley parser with the complete dynamic lexer
(a terminal may match any text its pattern matches, as in a context-free grammar: grammar_lark.py says why)
and by xgrammar running the converted grammar; the two must agree on every text."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import lark
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lark_judges import xgrammar_judge
from lark_sampler import Sampler

from treadle_model_runner import SamplingParams
from treadle_model_runner.grammar_lark import is_lark, lark_to_ebnf
from treadle_model_runner.structured_outputs import StructuredOutputsParams as S

ARITHMETIC = r"""
?start: sum
?sum: product
    | sum "+" product   -> add
    | sum "-" product   -> sub
?product: atom
    | product ("*" | "/") atom
?atom: NUMBER | "-" atom | "(" sum ")" | NAME
NAME: /[a-z_]\w*/       // \w: every Unicode word character, as in Python's re
%import common.NUMBER
%import common.WS_INLINE
%ignore WS_INLINE
"""

JSON = r"""
?start: value
?value: object
      | array
      | string
      | SIGNED_NUMBER      -> number
      | "true"             -> true
      | "false"            -> false
      | "null"             -> null
array  : "[" [value ("," value)*] "]"
object : "{" [pair ("," pair)*] "}"
pair   : string ":" value
string : ESCAPED_STRING
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
"""

OPTIONAL = r"""
start: "(" [_sep{elem, ","}] ")" ["!"] tail?
_sep{x, sep}: x (sep x)*
?elem: atom | pair
!pair: atom ":" atom
atom: "x" | "y" "z"? | "w"~2 | ("v" "u")~1..3
tail: ("." DIGIT)+
%import common.DIGIT
"""

REGEX = r"""
start: item (";" item)* [";"]
?item: ident "=" value | HEX | "@" WORD~1..2
ident: ID
value: NUM | QUOTED | DATE
ID: /[a-zA-Z_][a-zA-Z0-9_]{0,4}/
HEX: /0x[0-9a-fA-F]{2,4}/
NUM: /-?\d+(\.\d*)?([eE][+-]?\d{1,2})?/
QUOTED: /'[^'\n]*'/
DATE: /\d{4}-\d\d-(0[1-9]|[12]\d|3[01])/
WORD: /[^\W\d_]+/
"""

CASELESS = r"""
start: "select"i _WS cols _WS "from"i _WS NAME [_WS "desk"i] [_WS KEYWORD]
cols: "*" | NAME ("," NAME)*
NAME: /[a-z]+/i
KEYWORD: /(asc|desc)/i
_WS: " "+
"""


@pytest.mark.parametrize(
    ("grammar", "seed"),
    [(ARITHMETIC, 0), (JSON, 1), (OPTIONAL, 2), (REGEX, 3), (CASELESS, 4)],
    ids=["arithmetic", "json", "optional-templates", "regex", "case-insensitive"],
)
def test_the_conversion_accepts_what_lark_accepts(grammar: str, seed: int) -> None:
    oracle = lark.Lark(grammar, parser="earley", lexer="dynamic_complete")
    accepts = xgrammar_judge(grammar)
    sampler = Sampler(grammar, random.Random(seed))
    texts = [sampler.member() for _ in range(150)] + [sampler.mutant() for _ in range(250)]
    verdicts = {True: 0, False: 0}
    for text in dict.fromkeys(texts):
        try:
            oracle.parse(text)
            expected = True
        except lark.exceptions.LarkError:
            expected = False
        assert accepts(text) == expected, (text, expected)
        verdicts[expected] += 1
    assert verdicts[True] >= 60 and verdicts[False] >= 60, verdicts  # both sides were tried


def test_it_is_lark_as_vllm_tells() -> None:
    assert is_lark('start: "a"') and is_lark("rule: 'abc'  # a comment with ::= in it")
    assert not is_lark('root ::= "a"') and not is_lark('root ::= x\n// a: b\nx ::= "y"') and not is_lark("")
    assert not is_lark(None) and not is_lark(3)
    # EBNF grammars go to xgrammar as they are; single-quoted strings are read as vLLM's converter reads them
    assert S(grammar='root ::= "a" [0-9]').build() is not None
    assert '\nrule ::= "abc"\n' in lark_to_ebnf("rule: 'abc'")


@pytest.mark.parametrize(
    ("grammar", "accepted", "refused"),
    [
        ('start: "a"+ B\nB: /[0-9]/', ["a1", "aaa9"], ["1", "a", "a12"]),
        # no start rule: the first one is the root, as in vLLM; a rule named root does not clash with EBNF's
        ('greeting: root "!"\nroot: "hi"i', ["hi!", "HI!"], ["hi"]),
        # "\\" is one backslash; escapes in strings; a line continued with a backslash
        ('start: "\\\\" "\\x41" \\\n "\\t"', ["\\A\t"], ["\\\\A\t"]),
        # the ignored text before the first and after the last terminal; not inside a terminal
        ('start: "ab" INT\n%import common.INT\n%ignore " "', ["ab1", "  ab 12 "], ["a b1", "ab1 2"]),
        # common's helpers are private: the grammar's own DIGIT does not change common.INT
        ('start: INT DIGIT\nDIGIT: "x"\n%import common.INT', ["12x"], ["123"]),
        # %import common (A, B) and -> aliases
        (
            'start: N "," W\n%import common.SIGNED_NUMBER -> N\n%import common (WORD, INT)\nW: WORD',
            ["-1.5e3,ab"],
            ["1,"],
        ),
        # a class member written as an escape, then a hex digit ("-" then "A" is not one code point 0x2dA)
        ("start: /[a-fA-]+/", ["-A", "a-"], ["g", "-g"]),
        # the i flag on a regex follows Python's case folding (the Kelvin sign is a k)
        ("start: /k[a-c]{2}/i", ["Kab", "\u212aCA"], ["k", "kd1"]),
    ],
)
def test_what_a_lark_grammar_accepts(grammar: str, accepted: list[str], refused: list[str]) -> None:
    accepts = xgrammar_judge(grammar)
    oracle = lark.Lark(grammar, parser="earley", lexer="dynamic_complete", start=grammar.split(":")[0])
    for text in accepted + refused:
        assert accepts(text) == (text in accepted), text
        try:
            oracle.parse(text)
            assert text in accepted, text
        except lark.exceptions.LarkError:
            assert text in refused, text


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ("start: A\nA: /(?=a)a/", r"line 2 \(A\): a lookahead \(\?=\.\.\.\) in /\(\?=a\)a/ is not supported"),
        ("start: /a+?/", r"line 1 \(start\): a lazy quantifier in /a\+\?/ is not supported"),
        ("start: /^a/", r"line 1 \(start\): the anchor '\^'"),
        ("start: /(a)\\1/", r"line 1 \(start\): the backreference \\1"),
        ("start: /a\\b/", r"line 1 \(start\): the word boundary \\b"),
        ("start: /a/x", r"line 1 \(start\): the regex flag 'x' \(verbose regexes\) is not supported"),
        ('start: "a"\n%declare B', r"line 2: %declare is not supported"),
        ('start: "a"\n%import python.NAME', r"line 2: %import python\.NAME is not supported"),
        ('start: "a"\n%import common.NOPE', r"line 2: %import common\.NOPE: common has no such terminal"),
        ("start: other", r"line 1 \(start\): other is used but not defined"),
        ("start: NUMBER", r"line 1 \(start\): NUMBER is used but not defined \(%import common\.NUMBER\?\)"),
        ('start: t{"a"}\nt{x, y}: x y', r"line 1 \(start\): template t takes 2 arguments \(x, y\), got 1"),
        ('start: "a" = "b"', r"line 1: unexpected character '='"),
        ('A: b\nb: "x"', r"line 1 \(A\): the rule b is used inside a terminal"),
        (
            'start: A\nA: "a" B\nB: A?',
            r"line 2 \(A\): the terminal A refers to itself; recursion is only allowed",
        ),
        ('start: ""', r"line 1 \(start\): an empty string literal"),
    ],
)
def test_what_cannot_be_converted_is_named(grammar: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"structured_outputs\.grammar: Lark grammar " + message):
        S(grammar=grammar).build()


def test_offline_params_keep_their_key_and_compile() -> None:
    text = 'start: "yes" | "no"'
    params = SamplingParams(structured_outputs=S(grammar=text))
    assert params.structured_outputs is not None and params.structured_outputs.key() == ("grammar", text)
    from xgrammar.testing import _is_grammar_accept_string as accepts

    grammar = params.structured_outputs.build()
    assert [accepts(grammar, t) for t in ("yes", "no", "maybe")] == [True, True, False]
