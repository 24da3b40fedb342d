"""What structured outputs cost: the same number of tokens generated with and without a grammar, alternating, in
one process.

The grammar is a regex that should not finish within max_tokens (`[a-z ]{32 x tokens}`; a token can hold
many letters, and with ignore_eos a reply that does finish goes on under an EOS-only mask), so every reply runs
to max_tokens and every step masks its rows: the worst case for the host (xgrammar fills a bitmask row per
constrained request per step). Variants: `unconstrained`, `regex` (every request) and `mixed` (every fourth);
with `--logprobs N`, also `logprobs` (every request unconstrained, asking its sampled tokens' N top logprobs: the
other per-request feature whose steps used to wait for their tokens under async scheduling).

CPU (default): the embedded model (SmolLM2-135M, float32), 16 prompts x 64 tokens.
GPU: a model directory with dummy weights (`--model DIR --load-format dummy`); structured outputs need a
tokenizer, and a benchmark config has none, so `--tokenizer-from DIR` builds a directory from the config with
that directory's tokenizer files and vocabulary size (e.g. Llama-3.1-8B's shapes with SmolLM2's 49,152 tokens).
`--batches 1,64,256` runs each batch size in turn (batch 1 also reports ms per output token).

Usage: python benchmarks/structured_overhead.py [--model DIR --load-format dummy --tokenizer-from DIR]
       [--batches 16] [--tokens 64] [--rounds 2] [--logprobs N] [--engine-process] [--out F]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from treadle import LLM, SamplingParams, StructuredOutputsParams

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def with_tokenizer(model: str, tokenizer_dir: str) -> str:
    """A temporary model directory: `model`'s config.json with the tokenizer files (and vocabulary size, bos and
    eos ids) of `tokenizer_dir`."""
    src = Path(tokenizer_dir)
    out = Path(tempfile.mkdtemp(prefix="structured-model-"))
    config = json.loads((Path(model) / "config.json").read_text())
    donor = json.loads((src / "config.json").read_text())
    for key in ("vocab_size", "bos_token_id", "eos_token_id"):
        config[key] = donor[key]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return str(out)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def run_batch(llm: LLM, batch: int, tokens: int, rounds: int, logprobs: int = 0) -> dict:
    prompts = [f"Write a list of words about topic number {i}:" for i in range(batch)]
    grammar = StructuredOutputsParams(regex=f"[a-z ]{{{tokens * 32}}}")  # longer than max_tokens allows
    plain = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    regex = plain.clone(structured_outputs=grammar)
    variants = {
        "unconstrained": [plain] * batch,
        "regex": [regex] * batch,
        **({"mixed": [regex if i % 4 == 0 else plain for i in range(batch)]} if batch >= 4 else {}),
        **({"logprobs": [plain.clone(logprobs=logprobs)] * batch} if logprobs else {}),
    }
    llm.generate(prompts[:2], regex)  # warm-up: the tokenizer's vocabulary, the grammar compiled
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, params in variants.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            made = sum(len(o.outputs[0].token_ids) for o in outs)
            assert made == batch * tokens, (name, made)
            if name == "logprobs":
                assert all(len(o.outputs[0].logprobs or []) == tokens for o in outs), "logprobs missing"
            runs[name].append(made / elapsed)
            print(f"batch {batch} {name}: {made / elapsed:.1f} output tok/s")
    result: dict = {"output_tok_s": runs}
    mean = {name: sum(v) / len(v) for name, v in runs.items()}
    result["over_unconstrained"] = {
        n: m / mean["unconstrained"] for n, m in mean.items() if n != "unconstrained"
    }
    if batch == 1:
        result["ms_per_output_token"] = {n: 1000.0 / m for n, m in mean.items()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tokenizer-from", default=None, help="take the tokenizer files of this model directory")
    ap.add_argument("--batches", default="16", help="comma-separated batch sizes")
    ap.add_argument("--prompts", type=int, default=None, help="one batch size (the older option)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--logprobs", type=int, default=0, help="add a variant asking N top logprobs (0: none)")
    ap.add_argument("--engine-process", action="store_true", help="the engine core in its own process")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = args.model
    if args.tokenizer_from:
        if model is None:
            ap.error("--tokenizer-from needs --model")
        model = with_tokenizer(model, args.tokenizer_from)
    llm = LLM(model, load_format=args.load_format, engine_process=args.engine_process)
    batches = [args.prompts] if args.prompts else [int(b) for b in args.batches.split(",")]
    result = {
        "device": device_name(),
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "load_format": args.load_format,
        "tokenizer": args.tokenizer_from or "the model's",
        "engine_process": args.engine_process,
        "workload": f"batch sizes {batches} x {args.tokens} tokens, greedy, alternating, {args.rounds} rounds",
        "batches": {str(b): run_batch(llm, b, args.tokens, args.rounds, args.logprobs) for b in batches},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
