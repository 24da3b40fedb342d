"""Scheduler overhead: host time of schedule() + update_from_output() per step with a zero-cost runner.

Workload: N running decode requests (prompt 128 tokens, distinct prompts, ignore_eos, unbounded output), prefix
caching on, block size 16, stats on. After all prompts are prefilled, each step schedules N one-token decodes;
the runner returns one token per request instantly (its time is not counted). Reports mean / median / p99 of
schedule, update and their sum over the measured steps. Targets (issue 5, 2-core CPU): <= 2 ms at N=256,
<= 8 ms at N=1024.

    python benchmarks/scheduler_overhead.py --num-requests 256 1024 --steps 300 --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from treadle_engine_core.config import SchedulerConfig
from treadle_engine_core.request import Request
from treadle_engine_core.scheduler import Scheduler
from treadle_model_runner import (
    KVCacheConfig,
    KVCacheGroupSpec,
    ModelRunnerOutput,
    SamplingParams,
    SchedulerOutput,
)

PROMPT_LEN = 128
BLOCK_SIZE = 16
TARGETS_MS = {256: 2.0, 1024: 8.0}


def zero_cost_runner(so: SchedulerOutput) -> ModelRunnerOutput:
    """One token per request whose scheduled tokens reach its end (here: every decode)."""
    ids = list(so.num_scheduled_tokens)
    return ModelRunnerOutput(ids, {r: i for i, r in enumerate(ids)}, [[7] for _ in ids])


def measure(num_requests: int, steps: int, warmup: int) -> dict[str, float | int]:
    max_len = PROMPT_LEN + warmup + steps + 64
    num_blocks = 1 + num_requests * (-(-max_len // BLOCK_SIZE)) + 16
    kv = KVCacheConfig(num_blocks, BLOCK_SIZE, (KVCacheGroupSpec((0,), None),), bytes_per_block=0)
    config = SchedulerConfig(
        max_num_seqs=num_requests, max_num_batched_tokens=8192, max_model_len=max_len, async_scheduling=False
    )
    sched = Scheduler(config, kv, enable_prefix_caching=True, eos_token_ids={1})
    params = SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0)
    for i in range(num_requests):
        prompt = [2 + (i * 7919 + j) % 30000 for j in range(PROMPT_LEN)]
        sched.add_request(Request(f"req-{i}", prompt, params, 0.0, max_model_len=max_len))
    # Prefill everything, then warm up the decode loop.
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.requests.values()):
        so = sched.schedule()
        sched.update_from_output(so, zero_cost_runner(so))
    for _ in range(warmup):
        so = sched.schedule()
        sched.update_from_output(so, zero_cost_runner(so))
    t_sched: list[float] = []
    t_update: list[float] = []
    gc.collect()
    for _ in range(steps):
        t0 = time.perf_counter()
        so = sched.schedule()
        t1 = time.perf_counter()
        out = zero_cost_runner(so)
        t2 = time.perf_counter()
        sched.update_from_output(so, out)
        t3 = time.perf_counter()
        assert len(so.num_scheduled_tokens) == num_requests and so.total_num_scheduled_tokens == num_requests
        t_sched.append((t1 - t0) * 1e3)
        t_update.append((t3 - t2) * 1e3)
    total = [a + b for a, b in zip(t_sched, t_update, strict=True)]

    def p99(xs: list[float]) -> float:
        return sorted(xs)[int(0.99 * (len(xs) - 1))]

    return {
        "num_running_decode_requests": num_requests,
        "steps_measured": steps,
        "schedule_ms_mean": round(statistics.fmean(t_sched), 4),
        "update_ms_mean": round(statistics.fmean(t_update), 4),
        "total_ms_mean": round(statistics.fmean(total), 4),
        "total_ms_median": round(statistics.median(total), 4),
        "total_ms_p99": round(p99(total), 4),
        "target_ms": TARGETS_MS.get(num_requests, float("nan")),
        "meets_target_mean": statistics.fmean(total) <= TARGETS_MS.get(num_requests, float("inf")),
    }


def _commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--device", default=f"cpu {os.cpu_count()}-core")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    results = [measure(n, args.steps, args.warmup) for n in args.num_requests]
    record = {
        "benchmark": "scheduler_overhead",
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "load_average_1m_before": round(load_before, 2),  # the CI machine is shared: other jobs add noise
        "commit": _commit(),
        "command": "python " + " ".join(sys.argv),
        "workload": (
            f"N running decode requests, prompt {PROMPT_LEN} tokens, block size {BLOCK_SIZE}, prefix caching on, "
            "zero-cost runner (1 token per request per step, not timed), stats on"
        ),
        "baseline": "targets from issue 5: <= 2 ms at 256, <= 8 ms at 1024 requests (schedule + update per step)",
        "results": results,
    }
    for r in results:
        print(
            f"N={r['num_running_decode_requests']:5d}  schedule {r['schedule_ms_mean']:.3f} ms  "
            f"update {r['update_ms_mean']:.3f} ms  total mean {r['total_ms_mean']:.3f} ms  "
            f"median {r['total_ms_median']:.3f} ms  p99 {r['total_ms_p99']:.3f} ms  (target {r['target_ms']} ms)"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
