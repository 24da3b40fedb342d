"""What a Lark grammar's token masks cost: xgrammar's matcher on the converted EBNF, one mask per token of a text
the grammar accepts, with the embedded model's tokenizer (SmolLM2, 49,152 tokens).

For each workload the text is tokenized, then for every token the matcher fills the next-token bitmask (timed)
and accepts the token; that walk is repeated `--rounds` times on a fresh matcher and the per-round mean is
reported (ms per token), with compile time. The `+handwritten` rows are the like-for-like baselines: the
arithmetic and SQL languages written by hand in EBNF with a bare whitespace class between tokens. The converter measured is the one importable
as treadle_model_runner (for a before/after, run this script once with PYTHONPATH on an older worktree and
pass that JSON as `--before`).

Usage: python benchmarks/lark_mask_cpu.py [--rounds 5] [--before OLD.json] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ARITHMETIC = r"""
?start: sum
?sum: product | sum "+" product | sum "-" product
?product: atom | product ("*" | "/") atom
?atom: NUMBER | "-" atom | "(" sum ")" | NAME
NAME: /[a-z_]\w*/
%import common.NUMBER
%import common.WS_INLINE
%ignore WS_INLINE
"""
HANDWRITTEN = r"""root ::= sum ws
sum ::= product | sum ws "+" product | sum ws "-" product
product ::= atom | product ws [*/] atom
atom ::= ws number | ws "-" atom | ws "(" sum ws ")" | ws name
name ::= [a-z_] [0-9A-Z_a-z]*
number ::= float | int
int ::= [0-9]+
float ::= int exp | decimal exp?
exp ::= [eE] [+\-]? int
decimal ::= int "." int? | "." int
ws ::= [ \t]*
"""
HANDWRITTEN_SQL = r"""root ::= ws [Ss] [Ee] [Ll] [Ee] [Cc] [Tt] cols ws [Ff] [Rr] [Oo] [Mm] ws name where? ws
where ::= ws [Ww] [Hh] [Ee] [Rr] [Ee] ws name ws "=" ws [0-9]+
cols ::= ws "*" | ws name (ws "," ws name)*
name ::= [A-Z_a-z] [0-9A-Z_a-z]*
ws ::= [ \t\n\r]*
"""
JSON = r"""
?start: value
?value: object | array | string | SIGNED_NUMBER | "true" | "false" | "null"
array  : "[" [value ("," value)*] "]"
object : "{" [pair ("," pair)*] "}"
pair   : string ":" value
string : ESCAPED_STRING
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
"""
CONFIG = r"""
start: (entry | _NL)*
entry: KEY "=" value _NL
value: NUMBER | WORD | "[" [value ("," value)*] "]"
KEY: /[a-z_]+/
_NL: /\r?\n/
%import common.NUMBER
%import common.WORD
%import common.WS_INLINE
%import common.SH_COMMENT
%ignore WS_INLINE
%ignore SH_COMMENT
"""
SQL = r"""
start: "select"i cols "from"i NAME ["where"i NAME "=" NUMBER]
cols: "*" | NAME ("," NAME)*
NAME: /[a-z_][a-z0-9_]*/i
%import common.NUMBER
%import common.WS
%ignore WS
"""
WORKLOADS = {
    "arithmetic (%ignore WS_INLINE)": (ARITHMETIC, "x1 + 2.5 * (foo -  3)\t/ bar_baz + 12 * 7 - (a + b) * c"),
    "json (%ignore WS)": (JSON, '{"name": "treadle", "tags": ["a", "b"],\n "n": [1, 2.5, -3e4], "ok": true}'),
    "config (%ignore WS_INLINE, SH_COMMENT)": (
        CONFIG,
        "# settings\nname = treadle  # the engine\nsizes = [1, 2, 4]\n\nlimit = 3.5\n",
    ),
    "sql (case-insensitive, %ignore WS)": (SQL, "SELECT a, b_2 FROM table1 WHERE id = 42"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", help="an earlier run's JSON, kept in the output with the speed-ups")
    parser.add_argument("--out")
    args = parser.parse_args()

    import xgrammar as xgr
    from transformers import AutoTokenizer

    import treadle_model_runner
    from treadle_model_runner.grammar_lark import lark_to_ebnf
    from treadle_model_runner.loader.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    grammars = {name: (lark_to_ebnf(g), text) for name, (g, text) in WORKLOADS.items()}
    grammars["arithmetic+handwritten ([ \\t]*)"] = (
        HANDWRITTEN,
        WORKLOADS["arithmetic (%ignore WS_INLINE)"][1],
    )
    grammars["sql+handwritten"] = (HANDWRITTEN_SQL, WORKLOADS["sql (case-insensitive, %ignore WS)"][1])
    results = {}
    for name, (ebnf, text) in grammars.items():
        start = time.perf_counter()
        compiled = compiler.compile_grammar(ebnf)
        compile_ms = (time.perf_counter() - start) * 1e3
        ids = tokenizer.encode(text, add_special_tokens=False)
        rounds = []
        for _ in range(args.rounds):
            matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
            times = []
            for token in ids:
                start = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                times.append(time.perf_counter() - start)
                assert matcher.accept_token(token), (
                    f"{name}: the grammar refuses {tokenizer.decode([token])!r}"
                )
            assert matcher.is_terminated(), f"{name}: the text is not a whole member of the grammar"
            rounds.append(statistics.mean(times) * 1e3)
        results[name] = {
            "num_tokens": len(ids),
            "compile_ms": round(compile_ms, 1),
            "mask_ms_per_token_rounds": [round(r, 4) for r in rounds],
            "mask_ms_per_token_median": round(statistics.median(rounds), 4),
        }
        print(f"{name:45s} {len(ids):3d} tokens  mask {statistics.median(rounds):8.3f} ms/token (median of "
              f"{args.rounds})  compile {compile_ms:6.1f} ms", flush=True)  # fmt: skip
    out: dict = {
        "benchmark": "lark_mask_cpu",
        "machine": "2-core CPU (the shared development machine)",
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
        "tokenizer": "SmolLM2-135M-Instruct (embedded), 49,152 tokens",
        "xgrammar": xgr.__dict__.get("__version__") or _version("xgrammar"),
        "converter": str(Path(treadle_model_runner.__file__).parent),
        "commit": _commit(Path(treadle_model_runner.__file__).parent),
        "command": "python benchmarks/lark_mask_cpu.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "workloads": results,
    }
    if args.before:
        before = json.loads(Path(args.before).read_text())
        out["before"] = before
        out["speedup_median"] = {
            name: round(b["mask_ms_per_token_median"] / results[name]["mask_ms_per_token_median"], 1)
            for name, b in before["workloads"].items()
            if name in results
        }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _commit(where: Path) -> str:
    run = subprocess.run(
        ["git", "-C", str(where), "log", "-1", "--format=%h"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(where), "status", "--porcelain", "."], capture_output=True, text=True
    )
    return run.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    main()
