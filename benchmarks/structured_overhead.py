"""Structured outputs' host cost on CPU: the embedded model (SmolLM2-135M) generating the same number of tokens
with and without a grammar (a regex that cannot finish within max_tokens, so every reply runs to max_tokens and
every step masks its rows), alternating, in one process.

Usage: python benchmarks/structured_overhead.py [--prompts 16] [--tokens 64] [--rounds 2] [--out F]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from treadle import LLM, SamplingParams, StructuredOutputsParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM()
    prompts = [f"Write a list of words about topic number {i}:" for i in range(args.prompts)]
    grammar = StructuredOutputsParams(regex=f"[a-z ]{{{args.tokens * 8}}}")  # longer than max_tokens allows
    variants = {
        "unconstrained": SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True),
        "regex": SamplingParams(temperature=0, max_tokens=args.tokens, structured_outputs=grammar),
    }
    llm.generate(prompts[:2], variants["regex"])  # warm-up: the tokenizer's vocabulary, the grammar compiled
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, params in variants.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            assert tokens == args.prompts * args.tokens, (name, tokens)
            runs[name].append(tokens / elapsed)
            print(f"{name}: {tokens / elapsed:.1f} output tok/s")
    result = {
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "model": "SmolLM2-135M-Instruct (embedded), float32",
        "workload": f"{args.prompts} prompts x {args.tokens} tokens, greedy, alternating, {args.rounds} rounds",
        "output_tok_s": runs,
        "regex_over_unconstrained": sum(runs["regex"]) / sum(runs["unconstrained"]),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
