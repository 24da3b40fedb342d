"""`treadle bench throughput` and `treadle bench latency`: offline benchmarks printing what `vllm bench` prints.

throughput: the random dataset (token-id prompts, lengths `--input-len`/`--output-len`, optionally spread by
`--random-range-ratio`, or drawn uniformly from `--input-len-range LO,HI` / `--output-len-range LO,HI`, the
workload of nano-vllm's table: 100,1024 for both), all submitted at once to the offline `LLM` with ignore_eos,
timed end to end: output tokens / wall time, exactly as vLLM measures it.
latency: one batch of `--batch-size` requests, fixed lengths, timed per iteration after warm-up.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import numpy as np


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine options the offline benchmarks pass through to `LLM`."""
    from treadle_model_runner.config import KV_CACHE_DTYPES, QUANTIZATIONS

    parser.add_argument("--model", default=None, help="model directory / .gguf / config dir (dummy)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--kv-cache-space", type=float, default=None)
    parser.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES)
    parser.add_argument(
        "--quantization", "-q", default=None, choices=QUANTIZATIONS,
        help="online weight quantization (fp8: dense projections to float8_e4m3fn at load); a pre-quantized "
        "checkpoint's method (compressed-tensors, awq, gptq) loads it as it is, as leaving it unset does",
    )  # fmt: skip
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    parser.add_argument(
        "--enable-expert-parallel", action="store_true",
        help="MoE models with --tensor-parallel-size > 1: each GPU holds whole experts, as `treadle serve` takes it",
    )  # fmt: skip
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--speculative-config", default=None, metavar="JSON",
        help='speculative decoding, as `treadle serve` takes it: {"method": "ngram", "num_speculative_tokens": 5, ...}',
    )  # fmt: skip
    parser.add_argument("--no-enable-prefix-caching", action="store_true")
    parser.add_argument(
        "--engine-process",
        action="store_true",
        help="run the engine core in its own process (LLM(engine_process=True))",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None, help="write the result as JSON here")


def at_least(lowest: int) -> Any:
    """An argparse type: an integer >= `lowest` (a bad value is a usage error, never a run of another workload)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value

    return parse


def range_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument(
        "--temperature", type=float, default=1.0,
        help="sampling temperature (default 1.0 as vLLM; 0 = greedy, like an HF generate baseline)",
    )  # fmt: skip
    parser.add_argument(
        "--dataset-name", default="random", choices=["random"], help="random token prompts only"
    )
    parser.add_argument("--num-prompts", type=at_least(1), default=1000)
    parser.add_argument("--input-len", "--random-input-len", dest="input_len", type=at_least(1), default=1024)
    parser.add_argument(
        "--output-len", "--random-output-len", dest="output_len", type=at_least(1), default=128
    )
    parser.add_argument("--random-range-ratio", type=range_ratio, default=0.0)
    for kind in ("input", "output"):
        parser.add_argument(
            f"--{kind}-len-range",
            default=None,
            metavar="LO,HI",
            help=f"{kind} lengths uniform in [LO, HI] (replaces --{kind}-len and --random-range-ratio)",
        )


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--input-len", type=at_least(1), default=32)
    parser.add_argument("--output-len", type=at_least(1), default=128)
    parser.add_argument("--num-iters-warmup", type=at_least(0), default=1)
    parser.add_argument("--num-iters", type=at_least(1), default=3)


def make_llm(args: argparse.Namespace) -> Any:
    from treadle_frontend import LLM

    options: dict[str, Any] = {"load_format": args.load_format, "dtype": args.dtype, "seed": args.seed}
    for name in (
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "gpu_memory_utilization",
        "kv_cache_space",
        "kv_cache_dtype",
        "quantization",
        "attention_backend",
        "async_scheduling",
        "tensor_parallel_size",
        "speculative_config",
    ):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.enforce_eager:
        options["enforce_eager"] = True
    if args.enable_expert_parallel:
        options["enable_expert_parallel"] = True
    if args.no_enable_prefix_caching:
        options["enable_prefix_caching"] = False
    return LLM(model=args.model, engine_process=args.engine_process, **options)


def length_bounds(mean: int, ratio: float, span: str | None = None) -> tuple[int, int]:
    """(lo, hi) of uniformly drawn lengths: `span` "LO,HI" if given, else mean * (1 -/+ ratio)."""
    if span is None:
        return max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    try:
        lo, hi = (int(x) for x in span.split(","))
    except ValueError:
        raise ValueError(f"a length range must be LO,HI (two integers), got {span!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"a length range needs 1 <= LO <= HI, got {span!r}")
    return lo, hi


def random_token_prompts(num: int, lo: int, hi: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    top = max(11, min(vocab_size, 32000))
    return [[rng.randrange(10, top) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def run_throughput(args: argparse.Namespace, llm: Any = None) -> dict[str, Any]:
    """`llm`: an already started engine to reuse (several workloads on one start-up), else one from `args`."""
    from treadle_model_runner import SamplingParams

    in_lo, in_hi = length_bounds(args.input_len, args.random_range_ratio, args.input_len_range)
    lo, hi = length_bounds(args.output_len, args.random_range_ratio, args.output_len_range)
    llm = llm if llm is not None else make_llm(args)
    vocab = int(getattr(llm, "vocab_size", 32000))
    prompts = random_token_prompts(args.num_prompts, in_lo, in_hi, vocab, args.seed)
    rng = random.Random(args.seed + 1)
    params = [
        SamplingParams(
            temperature=getattr(args, "temperature", 1.0),
            top_p=1.0,
            ignore_eos=True,
            max_tokens=rng.randint(lo, hi),
        )
        for _ in prompts
    ]
    requests = [{"prompt_token_ids": p} for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_prompt = sum(len(p) for p in prompts)
    num_output = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result = {
        "elapsed_time": elapsed,
        "num_requests": len(prompts),
        "total_num_tokens": num_prompt + num_output,
        "total_prompt_tokens": num_prompt,
        "total_output_tokens": num_output,
        "requests_per_second": len(prompts) / elapsed,
        "tokens_per_second": (num_prompt + num_output) / elapsed,
        "output_tokens_per_second": num_output / elapsed,
    }
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s"
    )
    print(f"Total num prompt tokens:  {num_prompt}")
    print(f"Total num output tokens:  {num_output}")
    _save(args, result, llm)
    return result


def run_latency(args: argparse.Namespace, llm: Any = None) -> dict[str, Any]:
    from treadle_model_runner import SamplingParams

    llm = llm if llm is not None else make_llm(args)
    vocab = int(getattr(llm, "vocab_size", 32000))
    prompts = random_token_prompts(args.batch_size, args.input_len, args.input_len, vocab, args.seed)
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)

    def once() -> float:
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in range(args.num_iters_warmup):
        once()
    latencies = np.array([once() for _ in range(args.num_iters)])
    print(f"Avg latency: {latencies.mean()} seconds")
    percentiles = [10, 25, 50, 75, 90, 99]
    for pct, value in zip(percentiles, np.percentile(latencies, percentiles), strict=True):
        print(f"{pct}% percentile latency: {value} seconds")
    result = {
        "avg_latency": float(latencies.mean()),
        "latencies": latencies.tolist(),
        "percentiles": {
            str(p): float(v) for p, v in zip(percentiles, np.percentile(latencies, percentiles), strict=True)
        },
        "ms_per_output_token": float(latencies.mean()) * 1000.0 / args.output_len,
    }
    _save(args, result, llm)
    return result


def provenance() -> dict[str, str | None]:
    """treadle's version and, run from a source checkout, its commit (+ "-dirty" with uncommitted changes).
    $TREADLE_SOURCE_COMMIT, where set, names the commit instead: a copy of the tree without its own git history
    (a benchmark machine) sets it, since a stale .git there would name the wrong one."""
    import os
    import subprocess
    from pathlib import Path

    import treadle

    root = Path(treadle.__file__).resolve().parents[2]  # <root>/src/treadle/__init__.py

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        if done.returncode:
            raise subprocess.SubprocessError(done.stderr)
        return done.stdout.strip()

    commit = os.environ.get("TREADLE_SOURCE_COMMIT") or None
    if commit is None and (root / ".git").exists() and (root / "pyproject.toml").is_file():
        try:
            commit = git("rev-parse", "--short", "HEAD")
            if git("status", "--porcelain", "--untracked-files=no"):
                commit += "-dirty"
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"version": treadle.__version__, "commit": commit}


def _save(args: argparse.Namespace, result: dict[str, Any], llm: Any) -> None:
    if not args.output_json:
        return
    info = getattr(llm, "engine_info", None)
    record = {  # vLLM's keys at the top (a parser of `vllm bench --output-json` reads both), then the context
        **result,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "treadle": provenance(),
    }
    if callable(info):
        record["engine"] = (
            info()
        )  # model, max_model_len, KV capacity, device, dtypes, backend, CUDA graphs, weights
    with open(args.output_json, "w") as f:
        json.dump(record, f, indent=2, default=str)
