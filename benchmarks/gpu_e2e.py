"""Every end-to-end measurement of the GPU issue in one go, within one device call; a table last.

Items (`--only` picks some):
  ceilings    copy bandwidth (bytes read + written) and bf16 matmul rate (benchmarks/device_ceilings.py)
  latency     Llama-3.1-8B dummy, batch 1, 128 in / 128 out: mean of 3 timed iterations after a warm-up, / 128
              -> ms per output token; achieved GB/s = bytes one decode step reads (every weight except the
              embedding table: layers, final norm, lm_head) / that time
  throughput  Llama-3.1-8B, 1000 prompts random 1024 / 1024, ignore_eos: output tokens / wall time
  baseline    HF transformers `generate` (static cache, bf16; one batch of 32 x 1024/1024) on the same dummy Llama,
              and treadle on exactly that workload, in the same run -> ratio (target >= 5x). `--hf-baseline
              batch`: transformers' continuous batching (`generate_batch`, paged cache) on `--baseline-prompts`
              prompts of 1024/1024 instead
  cold_start  `treadle serve` from spawn to /health 200 (model init and CUDA-graph capture included)
  serve       then `treadle bench serve` random 1024 / 128 at max concurrency 1, 16, 64, 256 against it
  qwen        Qwen3-0.6B, 256 prompts, input and output lengths uniform in 100-1024 (nano-vllm's workload)
  moe_latency, moe_throughput   Qwen3-30B-A3B dummy: batch-1 128/128 latency, 1000 x 1024/1024 throughput,
              each against its roofline (benchmarks/roofline.py, gpu_e2e_moe.py)
  moe_latency_fp8  the batch-1 latency of the Qwen3-30B-A3B-FP8-shaped dummy (block-wise fp8, experts too), beside
              the same run's bf16 moe_latency and against its roofline at one byte a weight (gpu_e2e_moe.py)
  throughput_fp8  the throughput workload with an fp8 KV cache at 512 sequences (gpu_e2e_fp8.py)
  latency_wfp8, throughput_wfp8   the latency and throughput workloads with fp8 weights (`--quantization fp8`),
              each beside the same run's bf16 number (gpu_e2e_wfp8.py)

Steps, in run order, each a fresh process (a clean GPU each): ceilings; HF baseline; the server (cold_start,
serve); qwen; the MoE engine (moe_latency, moe_throughput); the fp8 MoE engine (moe_latency_fp8); last one Llama engine for latency, an unrecorded warm-up, treadle's side of the baseline and
throughput (`--worker`: one start-up instead of three; each phase has its own prompt seed, so no prefix-cache
hits across phases); then the fp8-weight engine (latency_wfp8, throughput_wfp8); then the fp8-cache engine
(throughput_fp8). The long throughput runs come last, so a cut at
the budget loses nothing else.
Budget: `--budget-s` bounds the whole run. An item whose usual minimum no longer fits is skipped (the last line
names the `--only` that runs what was skipped); a running one is cut at the budget. Each item writes
OUT/<item>.json (device, commit, command, numbers, same-run baseline, KV capacity in tokens, CUDA-graph mode,
max_model_len, dummy weights); OUT/summary.json (with each step's SM clock, power and share of samples at the
power cap, `gpu_state.py`) and OUT/table.md hold the table, OUT/serve_throughput.png the
plot (when matplotlib is installed), OUT/logs/ every subprocess's output.
`--smoke` runs the same plumbing on CPU on tiny configs derived from the real ones, in well under 90 s.

Usage on the GPU machine: source .whl/activate.sh; python3 benchmarks/gpu_e2e.py --out $OUT --commit <sha>
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from gpu_e2e_fp8 import step_fp8
from gpu_e2e_moe import step_moe, step_moe_fp8
from gpu_e2e_offline import offline_worker, step_ceilings, step_hf, step_llama, step_qwen
from gpu_e2e_report import plot_serve, render_table, table_rows
from gpu_e2e_serve import step_serve
from gpu_e2e_session import Plan, Session, Skip, smoke_plan, strict_json
from gpu_e2e_wfp8 import step_wfp8
from gpu_state import GpuStateSampler

ITEMS = (
    "ceilings",
    "latency",
    "throughput",
    "baseline",
    "serve",
    "cold_start",
    "qwen",
    "moe_latency",
    "moe_throughput",
    "moe_latency_fp8",
    "throughput_fp8",
    "latency_wfp8",
    "throughput_wfp8",
)

# (name, items it measures, the least time it needs, runner), in run order
STEPS = (
    ("ceilings", ("ceilings",), 25, step_ceilings),
    ("hf", ("baseline",), 60, step_hf),
    ("serve", ("cold_start", "serve"), 60, step_serve),
    ("qwen", ("qwen",), 40, step_qwen),
    ("moe", ("moe_latency", "moe_throughput"), 60, step_moe),
    ("moe_fp8", ("moe_latency_fp8",), 60, step_moe_fp8),
    ("llama", ("latency", "baseline", "throughput"), 60, step_llama),
    ("wfp8", ("latency_wfp8", "throughput_wfp8"), 60, step_wfp8),
    ("fp8", ("throughput_fp8",), 60, step_fp8),
)


def device_name(smoke: bool) -> str:
    """GPU 0's name from nvidia-smi (or torch, in a child: this process keeps off the GPU), else "cpu"."""
    if smoke:
        return "cpu"
    query = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    smi = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"]
    for cmd in (smi, [sys.executable, "-c", query]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
            if out:
                return out.splitlines()[-1]
    return "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", required=True, help="directory for the JSON results, table, plot and logs")
    ap.add_argument("--commit", default=None, help="commit recorded in every result (default: git rev-parse)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ITEMS)}")
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU: the plumbing, not the numbers")
    ap.add_argument("--num-prompts", type=int, default=None, help="throughput prompts (default 1000)")
    ap.add_argument("--concurrency", default=None, help="serving levels, e.g. 1,16,64,256")
    ap.add_argument("--prompts-per-concurrency", type=int, default=None, help="serving prompts per level")
    ap.add_argument(
        "--moe-prompts", type=int, default=None, help="Qwen3-30B-A3B throughput prompts (default 1000)"
    )
    ap.add_argument(
        "--hf-baseline", choices=("static", "batch"), default="static", help="HF's side of baseline"
    )
    ap.add_argument("--baseline-prompts", type=int, default=None, help="baseline prompts (default 32)")
    ap.add_argument(
        "--engine-args", default="", help="extra engine options for every treadle run, e.g. --enforce-eager"
    )
    args = ap.parse_args(argv)
    args.items = args.only.split(",") if args.only else list(ITEMS)
    if bad := [i for i in args.items if i not in ITEMS]:
        ap.error(f"unknown item(s) {bad} in --only; valid: {', '.join(ITEMS)}")
    return args


def run_steps(
    s: Session,
    args: argparse.Namespace,
    status: dict[str, str],
    skipped: list[str],
    gpu: GpuStateSampler,
    gpu_state: dict[str, object],
) -> None:
    """Run each step whose items were asked for and still fit the budget; fills ``status``, ``skipped`` and the
    step's SM clock and power (``gpu_state``)."""
    for step, measures, min_s, runner in STEPS:
        items = [i for i in measures if i in args.items and i not in status]
        if not items:
            continue
        min_s = 3 if args.smoke else min_s
        if s.remaining() < min_s:
            status.update({i: f"skipped: {s.remaining():.0f} s left < {min_s} s" for i in items})
            skipped += items
            continue
        t0 = time.monotonic()
        try:
            status.update(runner(s, items))
        except Skip as e:
            status.update({i: f"skipped: {e}" for i in items})
        except Exception as e:  # one failed step must not lose the others (nor its finished items)
            for i in items:
                if i in s.records:
                    status.setdefault(i, "ok")
                else:
                    status[i] = f"FAILED: {e}"
                    s.record(i, "", {}, error=f"{type(e).__name__}: {e}")
        done = ", ".join(f"{i} {status.get(i, 'ok')}" for i in items)
        state = gpu.summary(t0, time.monotonic())
        gpu_state[step] = state
        clock = (
            f" ({state['sm_clock_mhz_median']:.0f} MHz, {state['power_w_median']:.0f} W median)"
            if state
            else ""
        )
        print(f"[{time.monotonic() - t0:6.1f} s] {step}: {done}{clock}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return offline_worker(argv[1])
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu_e2e_") as tmp:
        plan = smoke_plan(Path(tmp)) if args.smoke else Plan()
        if args.num_prompts:
            plan = replace(plan, tp_prompts=args.num_prompts)
        if args.concurrency:
            plan = replace(plan, concurrencies=tuple(int(c) for c in args.concurrency.split(",")))
        if args.moe_prompts:
            plan = replace(plan, moe_prompts=args.moe_prompts)
        if args.engine_args:
            plan = replace(plan, engine=(*plan.engine, *args.engine_args.split()))
        plan = replace(plan, hf_mode=args.hf_baseline)
        if args.baseline_prompts:
            plan = replace(plan, base_prompts=args.baseline_prompts)
        if args.prompts_per_concurrency:
            plan = replace(plan, prompts_per_concurrency=args.prompts_per_concurrency)
        if args.smoke:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # subprocesses stay on the CPU
        s = Session(args, plan, device_name(args.smoke))
        print(
            f"gpu_e2e: {s.device}, commit {s.commit}, items {','.join(args.items)}, budget {args.budget_s:.0f} s"
        )
        status: dict[str, str] = {}
        skipped: list[str] = []
        gpu_state: dict[str, object] = {}  # per step: SM clock, power, share at the power cap (gpu_state.py)
        with GpuStateSampler() as gpu:
            run_steps(s, args, status, skipped, gpu, gpu_state)
        plot = plot_serve(s)
        rows = table_rows(s, status)
        table = render_table(rows)
        summary = {
            "device": s.device,
            "commit": s.commit,
            "status": status,
            "gpu_state": gpu_state,
            "plan": asdict(plan),
            "records": s.records,
            "table": rows,
            "plot": str(plot) if plot else None,
        }
        (s.out / "summary.json").write_text(strict_json(summary))
        (s.out / "table.md").write_text(table + "\n")
        skipped += [i for i, st in status.items() if "cut at the budget" in st]
        if skipped:
            print(f"out of budget: rerun with --only {','.join(dict.fromkeys(skipped))}")
        print(f"\n{s.device} | commit {s.commit[:12]} | dummy weights | results in {s.out}\n{table}")
    return 1 if any(st.startswith("FAILED") for st in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
