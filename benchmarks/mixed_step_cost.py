"""What a mixed step costs on a GPU: B decoding requests plus one new prompt of P tokens prefilled whole beside them,
on the mixed graphs (runner/batch_graphs.py) against the piecewise graphs around eager attention, in one process.

The ModelRunner (default benchmarks/configs/llama-3.1-8b, dummy bf16) is built with TREADLE_MIXED_GRAPHS=0, so it
captures the piecewise graphs; the mixed graphs are then captured beside them, and each measurement sets them on
the runner or aside (the piecewise path), alternating. Driven by the model-runner tests' scripted scheduler
(packages/model-runner/tests): B requests with random 128-token prompts decode; every step a new request with a
random P-token prompt joins them (prefilled in that step, then finished). Per (B, P): mean wall time of a mixed
step (host preparation to tokens on the host, stepped synchronously) on each path, and of a plain decode step of
the same B requests (full decode graphs).

Usage (GPU): python3 benchmarks/mixed_step_cost.py --out OUT/mixed_step_cost.json [--shapes 8x64,32x128,64x256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packages" / "model-runner" / "tests"))  # the scripted scheduler


def _timed(sched, plan: dict[str, int]) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    sched.step(plan)
    return time.perf_counter() - start


def measure(runner, mixed, batch: int, prompt_len: int, steps: int, seed: int) -> dict:
    import torch
    from test_runner_fakes import FakeScheduler

    from treadle_model_runner import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    greedy = SamplingParams(temperature=0.0)
    sched = FakeScheduler(runner)
    ids = [f"d{seed}-{i}" for i in range(batch)]
    for rid in ids:
        sched.add(
            rid, torch.randint(1000, 30000, (128,), generator=gen).tolist(), greedy, max_tokens=10 * steps
        )
    for first in range(0, batch, 32):  # the prompts' prefill, 4,096 tokens a step at most
        sched.step({rid: 128 for rid in ids[first : first + 32]})
    times: dict[str, list[float]] = {"mixed_graphs": [], "piecewise": [], "decode": []}
    for j in range(3 * steps):
        path = ("mixed_graphs", "piecewise", "decode")[j % 3]
        runner.mixed_graphs = mixed if path == "mixed_graphs" else None
        plan = {rid: 1 for rid in ids}
        if path != "decode":
            new = f"p{seed}-{j}"
            sched.add(new, torch.randint(1000, 30000, (prompt_len,), generator=gen).tolist(), greedy, 1)
            plan[new] = prompt_len
        times[path].append(_timed(sched, plan))
    runner.mixed_graphs = mixed
    for r in ids:
        sched.finish(r)
    result = {"batch": batch, "prompt_len": prompt_len}
    for path, ts in times.items():
        result[f"{path}_ms"] = round(1000 * statistics.mean(ts[2:]), 3)
    result["piecewise_over_mixed"] = round(result["piecewise_ms"] / result["mixed_graphs_ms"], 3)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "configs" / "llama-3.1-8b"))
    parser.add_argument("--shapes", default="1x64,8x64,32x128,64x256,128x128")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from treadle_model_runner import CacheConfig, ModelConfig
    from treadle_model_runner.runner import ModelRunner
    from treadle_model_runner.runner.batch_graphs import capture_batch_graphs

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    max_seqs = max(b for b, _ in shapes) + 1
    config = ModelConfig(args.model, dtype="bfloat16", load_format="dummy", max_model_len=4096)
    os.environ["TREADLE_MIXED_GRAPHS"] = "0"  # the piecewise graphs first
    runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=4096), max_seqs, 8192)
    runner.load_model()
    runner.initialize_kv_cache()
    os.environ["TREADLE_MIXED_GRAPHS"] = "1"
    if runner.device.type == "cuda":
        capture_batch_graphs(runner, None)
        assert runner.piecewise is not None and runner.mixed_graphs is not None, "both paths are needed"
    mixed = runner.mixed_graphs  # on a CPU (a smoke run) both paths are eager
    results = [measure(runner, mixed, b, p, args.steps, seed=i) for i, (b, p) in enumerate(shapes)]
    record = {
        "benchmark": "mixed_step_cost",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": os.environ.get("COMMIT", ""),
        "command": " ".join(["python3", "benchmarks/mixed_step_cost.py", *sys.argv[1:]]),
        "runner": runner.describe(),
        "workload": f"dummy weights from {args.model}, bf16; B decoding requests (128-token prompts) plus one new "
        f"P-token prompt a mixed step; {args.steps} steps of each path, alternating, the first 2 untimed",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
