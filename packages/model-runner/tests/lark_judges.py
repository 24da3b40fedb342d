"""Two judges of whether a text belongs to a Lark grammar (tests only): Lark's own Earley parser with the
complete dynamic lexer (the oracle; grammar_lark.py says why that lexer), and xgrammar running treadle's
conversion of the grammar."""

from __future__ import annotations

from collections.abc import Callable

import lark
import pytest

from treadle_model_runner.structured_outputs import StructuredOutputsParams as S


def xgrammar_judge(grammar: str) -> Callable[[str], bool]:
    xgr = pytest.importorskip("xgrammar")
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_grammar(
        S(grammar=grammar).build()
    )

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        return bool(matcher.accept_string(text) and matcher.is_terminated())

    return accepts


def lark_judge(grammar: str, start: str = "start") -> Callable[[str], bool]:
    oracle = lark.Lark(grammar, parser="earley", lexer="dynamic_complete", start=start)

    def accepts(text: str) -> bool:
        try:
            oracle.parse(text)
        except lark.exceptions.LarkError:
            return False
        return True

    return accepts
