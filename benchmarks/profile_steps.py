"""Where a step's time goes on the GPU: torch.profiler over batch-1 decode steps and over one prefill step.

    python3 benchmarks/profile_steps.py --out DIR [--model benchmarks/configs/llama-3.1-8b]

Prints, for each phase, the wall time per step and the profiler's top CUDA kernels and CPU ops, and writes
DIR/<phase>.trace.json (chrome://tracing) for the gaps between kernels (host overhead between CUDA-graph
replays, eager launch costs in a prefill step).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from treadle_frontend import LLM
from treadle_model_runner import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ids(rng: random.Random, n: int, vocab: int) -> dict[str, list[int]]:
    return {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(n)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=str(ROOT / "benchmarks" / "configs" / "llama-3.1-8b"))
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="rank 0's GPU is profiled")
    ap.add_argument("--phases", default="decode_b1,decode_b64,prefill_8x1024",
                    help="comma-separated subset of decode_b1, decode_b1_greedy, decode_b64, prefill_8x1024")  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=args.model, load_format="dummy", max_model_len=4096, attention_backend=args.attention_backend,
              kv_cache_space=0.2, tensor_parallel_size=args.tensor_parallel_size)  # fmt: skip
    rng, vocab = random.Random(0), llm.vocab_size
    phases = {
        # (prompts, prompt length, new tokens)
        "decode_b1": (1, 128, 64),
        "decode_b1_greedy": (1, 128, 64),  # temperature 0: the sampler is one argmax
        "decode_b64": (64, 128, 32),
        "prefill_8x1024": (8, 1024, 1),
    }
    summary: dict[str, dict[str, object]] = {}
    for name, (n, length, new) in phases.items():
        if name not in args.phases.split(","):
            continue
        temperature = 0.0 if name.endswith("_greedy") else 1.0
        params = SamplingParams(temperature=temperature, max_tokens=new, ignore_eos=True)
        llm.generate([ids(rng, length, vocab) for _ in range(n)], params, use_tqdm=False)  # warm-up
        batch = [ids(rng, length, vocab) for _ in range(n)]
        sync()
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        sync()
        wall = time.perf_counter() - t0
        batch = [ids(rng, length, vocab) for _ in range(n)]
        # a small trace
        few = SamplingParams(temperature=temperature, max_tokens=min(new, 8), ignore_eos=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(batch, few, use_tqdm=False)
            sync()
        trace = out / f"{name}.trace.json"
        prof.export_chrome_trace(str(trace))
        summary[name] = kernel_summary(trace, len(batch), min(new, 8))
        summary[name]["wall_ms_per_step"] = wall * 1e3 / new
        print(f"==== {name}: {n} x {length} in, {new} out: {wall * 1e3:.1f} ms wall "
              f"({wall * 1e3 / new:.2f} ms per step)", flush=True)  # fmt: skip
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        print(table, flush=True)
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60
        )
        print(table, flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def kernel_summary(trace: Path, num_prompts: int, steps: int) -> dict[str, object]:
    """GPU kernels of a chrome trace: count, busy time, the span they cover (busy / span = how full the GPU
    was), and the top kernels by total time; per step = over the `steps` decode steps (+ prefill) traced."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"kernels": 0}
    busy = sum(e["dur"] for e in kernels)
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e["name"][:90], []).append(e["dur"])
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]
    ordered = sorted(kernels, key=lambda e: e["ts"])
    gaps = [
        (b["ts"] - (a["ts"] + a["dur"]), a["name"][:60], b["name"][:60])
        for a, b in itertools.pairwise(ordered)
    ]
    gaps = [g for g in gaps if g[0] > 0]
    buckets = {"<=2us": (0, 2), "2-10us": (2, 10), "10-100us": (10, 100), ">100us": (100, float("inf"))}
    return {
        "prompts": num_prompts,
        "steps_traced": steps,
        "kernels": len(kernels),
        "gpu_busy_us": round(busy, 1),
        "gpu_span_us": round(span, 1),
        "busy_fraction": round(busy / span, 4) if span else None,
        # idle GPU time between consecutive kernels, by gap size: small gaps are launch latency inside a CUDA
        # graph; large ones are the host (the profiler's own host overhead inflates them)
        "idle_us_by_gap": {
            k: {
                "gaps": sum(1 for g in gaps if lo < g[0] <= hi),
                "total_us": round(sum(g[0] for g in gaps if lo < g[0] <= hi), 1),
            }
            for k, (lo, hi) in buckets.items()
        },
        "largest_gaps": [
            {"us": round(g[0], 1), "after": g[1], "before": g[2]}
            for g in sorted(gaps, key=lambda g: -g[0])[:8]
        ],
        "top": [
            {"kernel": k, "calls": len(v), "total_us": round(sum(v), 1), "mean_us": round(sum(v) / len(v), 2)}
            for k, v in top
        ],
        "decode_region": decode_region(ordered, events),
    }


def decode_region(ordered: list[dict], events: list[dict]) -> dict[str, object] | None:
    """The decode steps alone: kernels from the first fused decode attention kernel on (the prefill before it
    is left out), their busy time against the span, every gap over 3 us with the kernels around it, and the
    host's CUDA-graph launches in that span (interval between launches, time each launch call took)."""
    first = next((i for i, e in enumerate(ordered) if e["name"].startswith("decode_attention")), None)
    if first is None:
        return None
    region = ordered[first:]
    start, end = region[0]["ts"], max(e["ts"] + e["dur"] for e in region)
    gaps = [
        (b["ts"] - (a["ts"] + a["dur"]), a["name"][:50], b["name"][:50], a["ts"] + a["dur"] - start)
        for a, b in itertools.pairwise(region)
    ]
    launches = sorted(
        (e for e in events if e.get("name") == "cudaGraphLaunch" and start <= e.get("ts", -1) <= end),
        key=lambda e: e["ts"],
    )
    intervals = [b["ts"] - a["ts"] for a, b in itertools.pairwise(launches)]
    return {
        "span_us": round(end - start, 1),
        "busy_us": round(sum(e["dur"] for e in region), 1),
        "small_gaps_us": round(sum(g[0] for g in gaps if 0 < g[0] <= 3), 1),
        "small_gaps": sum(1 for g in gaps if 0 < g[0] <= 3),
        "gaps_over_3us": [
            {"us": round(g[0], 1), "at_us": round(g[3], 1), "after": g[1], "before": g[2]}
            for g in gaps
            if g[0] > 3
        ][:40],
        "graph_launches": len(launches),
        "graph_launch_interval_us": [round(i, 1) for i in intervals],
        "graph_launch_call_us": [round(e.get("dur", 0), 1) for e in launches],
    }


if __name__ == "__main__":
    main()
