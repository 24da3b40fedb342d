"""Acceptance 3 of issue 6: `treadle bench throughput` vs HF transformers `generate`, same model, dtype and run.

Runs, one after the other on this machine, (1) `treadle bench throughput` on the embedded default
(SmolLM2-135M-Instruct, fp32 on CPU; random token-id prompts of exactly --input-len tokens, --output-len tokens each
with ignore_eos, all submitted at once, timed end to end as vLLM does), greedy (`--temperature 0`, like the HF
baseline) and then sampled at temperature 1.0 (vLLM's throughput workload), and (2) `benchmarks/hf_baseline.py` on
the converted default directory (the same lengths, `min_new_tokens = max_new_tokens = output_len`, greedy: HF's
cheapest decoding, batches of --hf-batch-size). Both get the same torch thread count (--threads, through OMP_NUM_THREADS; default: torch's). The
1-minute load average is recorded around each run: the machine is shared, so compare only numbers of one file.

Ratio = treadle greedy output tokens/s / HF greedy output tokens/s (both exclude model loading); the sampled run
is recorded beside it (Gumbel-max noise over the vocabulary costs the sampled run time HF's greedy run never spends). Token ids differ between the two
prompt generators; with fixed lengths and EOS ignored, the work (FLOPs, KV traffic) is identical.

Usage: python benchmarks/cpu_throughput.py [--threads 1] [--out benchmarks/results/cpu_throughput_smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def run_json(cmd: list[str], out_file: Path, env: dict[str, str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Run `cmd` (which writes JSON to out_file); returns the JSON and the load averages around the run."""
    before = load_average()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    return json.loads(out_file.read_text()), {
        "load_average_1m_before": before,
        "load_average_1m_after": load_average(),
        "process_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (OMP_NUM_THREADS)")
    parser.add_argument("--device-name", default="cpu 2-core")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_throughput_smollm2.json"))
    args = parser.parse_args()

    from treadle_model_runner.loader import default_model_path

    model_dir = default_model_path()  # converts the embedded default once
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    workload = ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
                "--output-len", str(args.output_len)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, tuple[list[str], dict[str, Any], dict[str, float]]] = {}
        for name, temperature in (("greedy", "0"), ("sampled", "1.0")):
            out_file = Path(tmp) / f"treadle_{name}.json"
            cmd = [sys.executable, "-c", "import sys; from treadle.cli import main; sys.exit(main())",
                   "bench", "throughput", *workload, "--temperature", temperature,
                   "--output-json", str(out_file)]  # fmt: skip
            runs[name] = (cmd, *run_json(cmd, out_file, env))
        hf_file = Path(tmp) / "hf.json"
        hf_cmd = [sys.executable, str(ROOT / "benchmarks/hf_baseline.py"), "--model", str(model_dir),
                  "--dtype", "float32", *workload, "--batch-size", str(args.hf_batch_size),
                  "--out", str(hf_file)]  # fmt: skip
        hf, hf_load = run_json(hf_cmd, hf_file, env)

    import torch
    import transformers

    def treadle_record(name: str, sampling: str) -> dict[str, Any]:
        cmd, out, load = runs[name]
        return {
            "command": " ".join(["treadle", *cmd[3:-2]]),
            "sampling": sampling,
            "output_tokens_per_second": round(float(out["output_tokens_per_second"]), 2),
            "tokens_per_second": round(float(out["tokens_per_second"]), 2),
            "elapsed_s": round(float(out["elapsed_time"]), 1),
            **load,
        }

    ours = treadle_record("greedy", "greedy (temperature 0), like the HF baseline")
    sampled = treadle_record("sampled", "temperature 1.0, top_p 1.0 (Gumbel-max), vLLM's throughput workload")
    ours_tps, hf_tps = ours["output_tokens_per_second"], float(hf["output_tokens_per_second"])
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    record = {
        "benchmark": "cpu_throughput",
        "device": args.device_name,
        "cpu": platform.processor() or platform.machine(),
        "num_cpus": os.cpu_count(),
        "torch_threads": args.threads if args.threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit,
        "command": " ".join(["python", "benchmarks/cpu_throughput.py", *sys.argv[1:]]),
        "model": f"SmolLM2-135M-Instruct (embedded default, {model_dir})",
        "dtype": "float32",
        "workload": f"{args.num_prompts} prompts x {args.input_len} random token ids in, {args.output_len} out "
        "(ignore_eos / min_new_tokens), all submitted at once",
        "treadle": ours,
        "treadle_sampled": sampled,
        "hf_transformers": {
            "command": " ".join(
                ["python", *[Path(c).name if c.endswith(".py") else c for c in hf_cmd[1:-2]]]
            ),
            "sampling": "greedy (do_sample=False: HF's cheapest decoding)",
            "batch_size": args.hf_batch_size,
            "output_tokens_per_second": round(hf_tps, 2),
            "elapsed_s": round(float(hf["elapsed_s"]), 1),
            **hf_load,
        },
        "ratio_output_tokens_per_second": round(ours_tps / hf_tps, 3),
        "ratio_sampled_vs_hf_greedy": round(sampled["output_tokens_per_second"] / hf_tps, 3),
        "target_ratio": 2.0,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"treadle {ours_tps:.1f} (greedy) / {sampled['output_tokens_per_second']:.1f} (sampled) output tok/s, "
        f"HF {hf_tps:.1f}: {ours_tps / hf_tps:.2f}x -> {args.out}"
    )


if __name__ == "__main__":
    main()
