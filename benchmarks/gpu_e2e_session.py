"""The plan and the session of benchmarks/gpu_e2e.py: what each item runs, and the budget it runs within.

`Plan` holds every workload (model configs, lengths, prompt counts, concurrency levels); `smoke_plan()` derives
tiny CPU versions from the real configs. `Session` owns the run: the wall-clock deadline, the output folder and
the records. Invariants: every subprocess runs in its own process group (`start_new_session`), so
`stop_process_group` ends it with everything it started; `remaining()` always keeps RESERVE_S back for the
table and the plot; a record is written to OUT/<item>.json the moment it is known, so a later cut loses nothing
already measured. `parse_log` reads the start-up facts (KV capacity, CUDA-graph mode) every record carries.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "benchmarks" / "configs"
RESERVE_S = 10.0  # kept for the table and the plot


@dataclass(frozen=True)
class Plan:
    """The workloads of every item; `smoke_plan()` shrinks each of them for a CPU run."""

    llama: Path = CONFIGS / "llama-3.1-8b"
    qwen: Path = CONFIGS / "qwen3-0.6b"
    moe: Path = CONFIGS / "qwen3-30b-a3b"
    moe_fp8: Path = CONFIGS / "qwen3-30b-a3b-fp8"  # its quantization_config: block-wise fp8 (moe_latency_fp8)
    moe_prompts: int = 1000
    engine: tuple[str, ...] = ("--max-model-len", "4096", "--gpu-memory-utilization", "0.9")
    max_model_len: int = 4096
    latency_len: int = 128  # input = output tokens, batch 1
    tp_prompts: int = 1000
    tp_len: int = 1024  # input = output tokens
    fp8_max_num_seqs: int = (
        512  # throughput_fp8: the fp8 cache holds twice the tokens, so twice the sequences fit
    )
    qwen_prompts: int = 256
    qwen_range: str = "100,1024"
    hf_mode: str = "static"  # HF's side: "static" (generate, static cache) or "batch" (generate_batch)
    base_prompts: int = 32  # one batch of HF generate
    base_in: int = 1024
    base_out: int = 1024  # the throughput workload's lengths, one HF batch of prompts
    hf_dtype: str = "bfloat16"
    serve_in: int = 1024
    serve_out: int = 128
    concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    prompts_per_concurrency: int = 4
    min_serve_prompts: int = 16
    dtype_bytes: int = 2

    @property
    def hf_name(self) -> str:
        return "HF generate_batch" if self.hf_mode == "batch" else "HF generate"

    @property
    def base_workload(self) -> str:
        return f"--num-prompts {self.base_prompts} --input-len {self.base_in} --output-len {self.base_out}"

    def serve_prompts(self, concurrency: int) -> int:
        return max(self.min_serve_prompts, self.prompts_per_concurrency * concurrency)


def smoke_plan(tmp: Path) -> Plan:
    """Tiny Llama (2 layers, hidden 64, vocab 512), Qwen3 and Qwen3-MoE (bf16 and block-fp8, 16 x 16 blocks)
    configs, tiny lengths and counts, CPU KV cache."""
    tiny = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    dirs = []
    for name in ("llama-3.1-8b", "qwen3-0.6b", "qwen3-30b-a3b", "qwen3-30b-a3b-fp8"):
        config = {**json.loads((CONFIGS / name / "config.json").read_text()), **tiny}
        if "quantization_config" in config:  # blocks that divide the tiny shapes
            config["quantization_config"] = {**config["quantization_config"], "weight_block_size": [16, 16]}
        (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / name / "config.json").write_text(json.dumps(config))
        dirs.append(tmp / name)
    return Plan(
        llama=dirs[0],
        qwen=dirs[1],
        moe=dirs[2],
        moe_fp8=dirs[3],
        moe_prompts=4,
        engine=("--max-model-len", "256", "--kv-cache-space", "0.05"),
        max_model_len=256,
        latency_len=8,
        tp_prompts=6,
        tp_len=16,
        qwen_prompts=6,
        qwen_range="4,24",
        base_prompts=4,
        base_in=16,
        base_out=8,
        hf_dtype="float32",
        serve_in=16,
        serve_out=8,
        concurrencies=(1, 4),
        prompts_per_concurrency=2,
        min_serve_prompts=2,
        dtype_bytes=4,
    )


def parse_log(text: str) -> dict[str, Any]:
    """KV capacity and CUDA-graph mode as the engine logs them at start-up."""
    out: dict[str, Any] = {}
    if m := re.search(r"KV (?:cache )?capacity:? (\d+) tokens", text):
        out["kv_capacity_tokens"] = int(m.group(1))
    captures = re.findall(
        r"CUDA graphs captured for decode batch sizes (.*?) in ([\d.]+) s(?:, using (\d+) MiB)?", text
    )  # the last one: before it, the graph-memory probe logs its own capture of two sizes
    if captures:
        sizes, seconds, mib = captures[-1]
        out["cuda_graphs"] = f"full decode graphs, sizes {sizes}, captured in {seconds} s"
        if mib:
            out["cuda_graphs"] += f", {mib} MiB of device memory"
    elif m := re.search(r"CUDA graphs off: ?(.*)", text):
        out["cuda_graphs"] = f"off: {m.group(1).strip()}"
    elif "CUDA graph capture failed" in text:
        out["cuda_graphs"] = "capture failed: eager"
    else:
        out["cuda_graphs"] = "none logged (eager)"
    return out


class Session:
    """Runs items within the budget; writes one JSON per item and remembers each for the table."""

    def __init__(self, args: argparse.Namespace, plan: Plan, device: str) -> None:
        self.args, self.plan, self.device = args, plan, device
        self.out = Path(args.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.commit = args.commit or _git_commit()
        os.environ["TREADLE_SOURCE_COMMIT"] = (
            self.commit
        )  # every bench record names it (treadle.bench.offline)
        self.records: dict[str, dict[str, Any]] = {}
        self.hf: dict[str, Any] | None = None  # the HF baseline's result, once step_hf ran
        self.hf_cmd: list[str] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def run(self, name: str, cmd: list[str], cap_s: float | None = None) -> tuple[int, str]:
        """Runs `cmd`, output to logs/<name>.log; rc 124 when cut at the budget."""
        limit = max(1.0, min(cap_s or 1e9, self.remaining()))
        log = self.out / "logs" / f"{name}.log"
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                rc = 124
        return rc, log.read_text(errors="replace")

    def record(self, item: str, command: list[str] | str, numbers: dict[str, Any], **extra: Any) -> None:
        rec = {
            "item": item,
            "device": self.device,
            "commit": self.commit,
            "command": command if isinstance(command, str) else " ".join(command),
            "numbers": numbers,
            "dummy_weights": True,
            "smoke": bool(self.args.smoke),
            "max_model_len": self.plan.max_model_len,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        self.records[item] = rec
        (self.out / f"{item}.json").write_text(strict_json(rec))


def strict_json(value: Any) -> str:
    """JSON that strict parsers read: an infinite float (an unbounded request rate) is written "inf", as vLLM
    writes it, and NaN "nan"."""

    def finite(v: Any) -> Any:
        if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, default=str, allow_nan=False)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stop_process_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM to the process group this script started, SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def treadle_argv(*argv: str) -> list[str]:
    """The command line of `treadle ARGV...` run with this interpreter."""
    return [sys.executable, "-m", "treadle.cli", *argv]


def log_tail(log: str, n: int = 6) -> str:
    """The last `n` lines of a subprocess log, one line, for an error message."""
    return "; log tail: " + " | ".join(log.strip().splitlines()[-n:])


class Skip(Exception):
    """An item that does not apply here (no CUDA for the ceilings)."""
