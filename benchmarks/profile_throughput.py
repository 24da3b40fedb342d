"""Where the offline-throughput run's decode time goes: GPU kernel time per decode step at a large batch, by kind.

    python3 benchmarks/profile_throughput.py --out F.json [--num-prompts 512] [--input-len 1024] [--output-len 129]
        [--kv-cache-dtype fp8] [--max-num-seqs 512]

Two runs of the same batch on one engine, each timed without the profiler and then traced with it (CUDA kernels
only): the prompts with one output token (prefill alone), then with ``output_len`` tokens. The second minus the first
is ``output_len - 1`` decode steps of the whole batch at contexts ``input_len`` ... ``input_len + output_len``: the
wall time per step, and each kernel's time per step, grouped into attention, GEMMs and the rest. The GPU time the
kernels do not cover is host time (scheduling, sampling on the host, launch gaps).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from treadle_frontend import LLM
from treadle_model_runner import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
KINDS = (
    ("attention", re.compile(r"paged_attention|reduce_splits|decode_attention")),
    ("gemm", re.compile(r"nvjet|gemm|xmma|cutlass|cublas|small_m_linear", re.I)),
    ("kv_write", re.compile(r"reshape_and_cache")),
    ("norm", re.compile(r"rms_norm")),
    ("rotary", re.compile(r"rotary")),
    ("activation", re.compile(r"act_and_mul")),
    ("sampling", re.compile(r"argmax|sampl|gumbel|topk|softmax|exponential|log_softmax", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


Prompts = Callable[[], list[dict[str, list[int]]]]


def run(llm: LLM, prompts: Prompts, tokens: int) -> tuple[float, dict[str, float], dict[str, Any]]:
    """Wall seconds of a batch without the profiler, then (another batch of the same shape, so the prefix cache
    serves neither) its CUDA kernel microseconds by name and the idle gaps between its kernels."""
    params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True)
    sync()
    t0 = time.perf_counter()
    llm.generate(prompts(), params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - t0
    batch = prompts()
    cuda = torch.cuda.is_available()
    with profile(
        activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]
    ) as prof:  # CPU: plumbing
        llm.generate(batch, params, use_tqdm=False)
        sync()
    kernels: dict[str, float] = defaultdict(float)
    spans = []
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels[event.name] += event.time_range.elapsed_us()
            spans.append((event.time_range.start, event.time_range.end, event.name))
    return wall, dict(kernels), gaps(sorted(spans))


def gaps(spans: list[tuple[float, float, str]]) -> dict[str, Any]:
    """Idle GPU time between consecutive kernels (us), by size, and the largest gaps with their neighbours."""
    idle = []
    end, last = (spans[0][1], spans[0][2]) if spans else (0.0, "")
    for start, stop, name in spans[1:]:
        if start > end:
            idle.append((start - end, last[:60], name[:60]))
        if stop > end:
            end, last = stop, name
    buckets = {"<=5us": (0, 5), "5-50us": (5, 50), "50-500us": (50, 500), ">500us": (500, float("inf"))}
    return {
        "span_us": round(end - spans[0][0], 1) if spans else 0.0,
        "idle_us": {
            k: round(sum(g for g, _, _ in idle if lo < g <= hi), 1) for k, (lo, hi) in buckets.items()
        },
        "count": {k: sum(1 for g, _, _ in idle if lo < g <= hi) for k, (lo, hi) in buckets.items()},
        "largest": [
            {"us": round(g, 1), "after": a, "before": b} for g, a, b in sorted(idle, reverse=True)[:12]
        ],
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=str(ROOT / "benchmarks" / "configs" / "llama-3.1-8b"))
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=129)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--engine-args", default="{}", help="more LLM(...) keyword arguments, as JSON")
    args = ap.parse_args()
    llm = LLM(model=args.model, load_format="dummy", max_model_len=4096, gpu_memory_utilization=0.9,
              kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs, **json.loads(args.engine_args))  # fmt: skip
    rng = random.Random(0)

    def prompts() -> list[dict[str, list[int]]]:
        return [
            {"prompt_token_ids": [rng.randrange(10, llm.vocab_size) for _ in range(args.input_len)]}
            for _ in range(args.num_prompts)
        ]

    llm.generate(prompts()[:8], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    wall_prefill, k_prefill, gaps_prefill = run(llm, prompts, 1)
    wall_all, k_all, gaps_all = run(llm, prompts, args.output_len)
    steps = args.output_len - 1
    per_step = {n: (t - k_prefill.get(n, 0.0)) / steps for n, t in k_all.items()}
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in per_step.items():
        by_kind[kind_of(name)] += us
    step_ms = (wall_all - wall_prefill) * 1e3 / steps
    kernel_ms = sum(by_kind.values()) / 1e3
    result = {
        "args": vars(args),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "wall_s": {"prefill_only": round(wall_prefill, 3), "with_decode": round(wall_all, 3)},
        "decode_step_ms": round(step_ms, 3),
        "decode_tok_per_s": round(args.num_prompts / step_ms * 1e3, 1),
        "kernel_ms_per_step": round(kernel_ms, 3),
        "not_covered_ms_per_step": round(step_ms - kernel_ms, 3),
        "gpu_idle_prefill_only": gaps_prefill,
        "gpu_idle_with_decode": gaps_all,
        "by_kind_ms_per_step": {
            k: round(v / 1e3, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top_kernels_us_per_step": {
            n[:100]: round(us, 1) for n, us in sorted(per_step.items(), key=lambda kv: -kv[1])[:25]
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels_us_per_step"}, indent=1))
    for name, us in result["top_kernels_us_per_step"].items():
        print(f"{us:10.1f} us  {name}")
    llm.shutdown()


if __name__ == "__main__":
    main()
