"""Host time of the in-process pipeline per decode step: LLM.generate with a tiny dummy model on CPU.

Workload: N prompts of 32 random token ids, ``--steps`` + 1 output tokens each (ignore_eos, temperature 1), a
2-layer Llama of hidden size 64 and vocabulary 512 built here (dummy weights), async scheduling on, everything in
one process. Each repetition runs the batch once with one output token (prefill alone) and once with all of them;
the difference over ``steps`` is a decode step's wall time and the main thread's CPU time (scheduler, engine-core
update, frontend output processing). The worker thread's share (input preparation, the tiny forward, sampling)
is in the wall time only.

    python benchmarks/host_overhead.py --num-requests 512 --steps 64 --repeats 3 --out F.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from treadle_frontend import LLM
from treadle_model_runner import SamplingParams

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
}  # fmt: skip


def measure(llm: LLM, num_requests: int, steps: int, rng: random.Random) -> tuple[float, float]:
    """(wall ms, main-thread CPU ms) of one decode step of the whole batch."""

    def run(tokens: int) -> tuple[float, float]:
        prompts = [
            {"prompt_token_ids": [rng.randrange(10, 500) for _ in range(32)]} for _ in range(num_requests)
        ]
        params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True)
        wall, cpu = time.perf_counter(), time.thread_time()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - wall, time.thread_time() - cpu

    wall_1, cpu_1 = run(1)
    wall_n, cpu_n = run(steps + 1)
    return (wall_n - wall_1) * 1e3 / steps, (cpu_n - cpu_1) * 1e3 / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as model:
        (Path(model) / "config.json").write_text(json.dumps(TINY_LLAMA))
        llm = LLM(model=model, load_format="dummy", max_num_seqs=args.num_requests, kv_cache_space=1,
                  async_scheduling=True, max_model_len=1024)  # fmt: skip
        rng = random.Random(0)
        llm.generate([{"prompt_token_ids": [5] * 8}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        runs = [measure(llm, args.num_requests, args.steps, rng) for _ in range(args.repeats)]
        llm.shutdown()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "host_overhead",
        "device": f"cpu {platform.machine()}",
        "commit": commit,
        "command": "python benchmarks/host_overhead.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "workload": f"{args.num_requests} requests x 32-token prompts, {args.steps} decode steps, tiny Llama",
        "decode_step_wall_ms": [round(w, 2) for w, _ in runs],
        "decode_step_main_thread_cpu_ms": [round(c, 2) for _, c in runs],
        "median_wall_ms": round(statistics.median(w for w, _ in runs), 2),
        "median_main_thread_cpu_ms": round(statistics.median(c for _, c in runs), 2),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
