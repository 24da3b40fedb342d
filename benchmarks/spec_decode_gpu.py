"""N-gram speculative decoding on a GPU with dummy weights: what a verification step costs against a plain decode.

No real weights reach the GPU machine, so the acceptance a real model would get cannot be measured there (see
spec_decode_cpu.py for the embedded model on the CPU). This runs the offline `LLM` on a config directory with dummy
weights (default benchmarks/configs/llama-3.1-8b, bf16), batch --batch-size, random prompts of --input-len tokens,
--output-len tokens greedy with ignore_eos, in two engines of one process: without speculation (the defaults, i.e.
async scheduling and full CUDA graphs for decode) and with --speculative-config (async scheduling off; a step with
drafts runs the mixed-batch path). Both are warmed up; then each is timed --iters times, alternating.

Reported per engine: output tok/s (best run), the drafts / accepted counts, the engine steps (output tokens minus
accepted drafts, per request) and the mean wall time of one step. The dummy model's greedy output is whatever its
random weights make: the acceptance here is not a real model's, only the step costs carry over.

Usage (GPU): python3 benchmarks/spec_decode_gpu.py --out OUT/spec_decode_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "configs" / "llama-3.1-8b"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--speculative-config", default=SPEC)
    # both engines live in one process, and the second's budget counts the first's memory as in use
    parser.add_argument("--gpu-memory-utilization", type=float, nargs=2, default=[0.4, 0.85])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from treadle_frontend import LLM
    from treadle_model_runner import SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(1000, 30000, (args.input_len,), generator=gen).tolist()}
        for _ in range(args.batch_size)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    common: dict[str, Any] = dict(load_format="dummy", dtype="bfloat16", max_model_len=4096)
    first, second = args.gpu_memory_utilization
    llms = {
        "baseline": LLM(args.model, gpu_memory_utilization=first, **common),
        "speculative": LLM(
            args.model, speculative_config=args.speculative_config, gpu_memory_utilization=second, **common
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in llms}
    tokens: dict[str, list[list[int]]] = {}
    stats: dict[str, list[Any]] = {}
    try:
        for name, llm in llms.items():
            llm.generate(prompts, params, use_tqdm=False)  # warm-up
            stats[name] = [llm.client.get_stats()]
        for _ in range(args.iters):
            for name, llm in llms.items():
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                times[name].append(time.perf_counter() - start)
                tokens[name] = [list(o.outputs[0].token_ids) for o in outs]
        for name, llm in llms.items():
            stats[name].append(llm.client.get_stats())
    finally:
        for llm in llms.values():
            llm.shutdown()
    results = {}
    for name in llms:
        before, after = stats[name]
        drafts = after.spec_num_drafts - before.spec_num_drafts
        drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
        accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        out_tokens = sum(len(t) for t in tokens[name])
        # per request: one step per output token, less the accepted drafts (they came in a step with others)
        steps = (out_tokens * args.iters - accepted) / args.batch_size / args.iters
        mean_s = sum(times[name]) / len(times[name])
        results[name] = {
            "elapsed_s": [round(t, 4) for t in times[name]],
            "output_tokens_per_second": round(out_tokens / min(times[name]), 2),
            "ms_per_output_token": round(1000 * mean_s / args.output_len, 3),
            "drafts": drafts,
            "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else None,
            "steps_per_request": round(steps, 1),
            "ms_per_step": round(1000 * mean_s / steps, 3),
        }
        print(name, json.dumps(results[name]), flush=True)
    record = {
        "benchmark": "spec_decode_gpu",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "command": " ".join(["python3", "benchmarks/spec_decode_gpu.py", *sys.argv[1:]]),
        "args": vars(args),
        "workload": f"dummy weights from {args.model}, bf16, batch {args.batch_size}, {args.input_len} random "
        f"prompt tokens, {args.output_len} out, greedy, ignore_eos; mean of {args.iters} runs after a warm-up",
        "results": results,
        "same_tokens": tokens["baseline"] == tokens["speculative"],
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
