"""What one verification step costs on a GPU: a decode step with k drafts a request against a plain decode step.

Dummy weights (default benchmarks/configs/llama-3.1-8b, bf16) give no real model's acceptance, so this drives the
ModelRunner directly with the model-runner tests' scripted scheduler (packages/model-runner/tests): B requests with
random 128-token prompts decode 64 tokens greedily without drafts (the reference, timing each plain step: full CUDA
graphs), then the same prompts again, each step feeding every request the reference's next k tokens as drafts (the
runner keeps those its own samples equal: all, unless a bf16 near tie differs between the two paths). Per k: mean
wall time of a step (host preparation to tokens on the host), tokens a request got per step, and so the time per
output token against the plain step's. The break-even: drafts pay when the tokens a real model's step yields exceed
step(k) / step(0). With `--compare-verify-graphs` each k runs twice in the same process: on the runner's verify
graphs (runner/verify_graphs.py), then with them set aside (the piecewise path: key "<k>-piecewise").

Usage (GPU): python3 benchmarks/spec_verify_cost.py --out OUT/spec_verify_cost.json [--batch-sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packages" / "model-runner" / "tests"))  # the scripted scheduler


def _timed_steps(sched, plan_of, drafts_of, steps: int) -> tuple[list[float], int]:
    """Mean wall time per step over `steps` steps, and the tokens produced."""
    import torch

    times, produced = [], 0
    for _ in range(steps):
        plan, drafts = plan_of(), drafts_of()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = sched.step(plan, drafts)
        times.append(time.perf_counter() - start)
        produced += sum(len(t) for t in out.sampled_token_ids)
    return times, produced


def measure(
    runner, batch: int, ks: list[int], new_tokens: int, input_len: int, seed: int, compare: bool = False
) -> dict:
    import torch
    from test_runner_fakes import FakeScheduler

    from treadle_model_runner import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1000, 30000, (input_len,), generator=gen).tolist() for _ in range(batch)]
    greedy = SamplingParams(temperature=0.0)
    sched = FakeScheduler(runner)
    ref_ids = [f"ref{seed}-{i}" for i in range(batch)]
    for rid, p in zip(ref_ids, prompts, strict=True):
        sched.add(rid, p, greedy, max_tokens=new_tokens + 1)
    sched.step({rid: input_len for rid in ref_ids})
    plain, _ = _timed_steps(sched, lambda: {r: 1 for r in ref_ids}, lambda: None, new_tokens)
    refs = [sched.done_outputs[r] for r in ref_ids]
    result = {"batch": batch, "plain_ms_per_step": 1000 * sum(plain[4:]) / len(plain[4:]), "k": {}}
    verify = runner.verify_graphs
    for k, piecewise in [(k, p) for k in ks for p in ((False, True) if compare else (False,))]:
        runner.verify_graphs = None if piecewise else verify
        key = f"{k}-piecewise" if piecewise else str(k)
        ids = [f"k{key}-{seed}-{i}" for i in range(batch)]
        for rid, p in zip(ids, prompts, strict=True):
            sched.add(rid, p, greedy, max_tokens=new_tokens + 1)
        sched.step({rid: input_len for rid in ids})
        times, produced, steps = [], 0, 0
        while all(r in sched.requests for r in ids):
            done = [len(sched.requests[r].output) for r in ids]
            room = min(new_tokens - d for d in done) - 1
            if room < 1:
                break
            kk = min(k, room)
            drafts = {r: refs[i][done[i] : done[i] + kk] for i, r in enumerate(ids)}
            t, p = _timed_steps(
                sched, lambda d=drafts: {r: 1 + len(v) for r, v in d.items()}, lambda d=drafts: d, 1
            )
            times += t
            produced += p
            steps += 1
        for r in ids:
            if r in sched.requests:
                sched.finish(r)
        step_ms = 1000 * sum(times[2:]) / max(1, len(times[2:]))
        per_req = produced / steps / batch
        result["k"][key] = {
            "steps": steps,
            "ms_per_step": round(step_ms, 3),
            "tokens_per_request_per_step": round(per_req, 3),
            "ms_per_output_token": round(step_ms / per_req, 3),
            "step_cost_vs_plain": round(step_ms / result["plain_ms_per_step"], 3),
        }
        print(batch, key, result["k"][key], flush=True)
    runner.verify_graphs = verify
    result["plain_ms_per_step"] = round(result["plain_ms_per_step"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "configs" / "llama-3.1-8b"))
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--ks", default="1,3,5")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--num-blocks", type=int, default=8192)
    parser.add_argument("--compare-verify-graphs", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from treadle_model_runner import CacheConfig, ModelConfig, SpeculativeConfig
    from treadle_model_runner.runner import ModelRunner

    batches = [int(b) for b in args.batch_sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    config = ModelConfig(args.model, dtype="bfloat16", load_format="dummy", max_model_len=4096)
    cache = CacheConfig(block_size=16, num_gpu_blocks_override=args.num_blocks)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = ModelRunner(config, cache, max(batches), max(batches) * args.input_len, device,
                         speculative_config=SpeculativeConfig(num_speculative_tokens=max(ks)))  # fmt: skip
    runner.load_model()
    runner.initialize_kv_cache()
    compare = args.compare_verify_graphs
    results = [
        measure(runner, b, ks, args.new_tokens, args.input_len, i, compare) for i, b in enumerate(batches)
    ]
    record = {
        "benchmark": "spec_verify_cost",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "commit": os.environ.get("COMMIT", ""),
        "runner": runner.describe(),
        "command": " ".join(["python3", "benchmarks/spec_verify_cost.py", *sys.argv[1:]]),
        "workload": f"dummy weights from {args.model}, bf16, random {args.input_len}-token prompts, greedy, "
        f"{args.new_tokens} tokens a phase; the first 4 plain steps and the first 2 steps of each k untimed",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
