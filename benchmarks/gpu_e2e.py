"""Every end-to-end measurement of the GPU issue in one go, within one device call; a table last.

Items (`--only` picks some):
  ceilings    copy bandwidth (bytes read + written) and bf16 matmul rate (benchmarks/device_ceilings.py)
  latency     Llama-3.1-8B dummy, batch 1, 128 in / 128 out: mean of 3 timed iterations after a warm-up, / 128
              -> ms per output token; achieved GB/s = bytes one decode step reads (every weight except the
              embedding table: layers, final norm, lm_head) / that time
  throughput  Llama-3.1-8B, 1000 prompts random 1024 / 1024, ignore_eos: output tokens / wall time
  baseline    HF transformers `generate` (static cache, bf16) on the same dummy Llama and workload, and treadle
              on exactly that workload, in the same run -> ratio (target >= 5x)
  cold_start  `treadle serve` from spawn to /health 200 (model init and CUDA-graph capture included)
  serve       then `treadle bench serve` random 1024 / 128 at max concurrency 1, 16, 64, 256 against it
  qwen        Qwen3-0.6B, 256 prompts, input and output lengths uniform in 100-1024 (nano-vllm's workload)

Steps, in run order, each a fresh process (a clean GPU each): ceilings; HF baseline; the server (cold_start,
serve); qwen; last one Llama engine for latency, an unrecorded warm-up, treadle's side of the baseline and
throughput (`--worker`: one start-up instead of three; each phase has its own prompt seed, so no prefix-cache
hits across phases). The long throughput run comes last, so a cut at the budget loses nothing else.
Budget: `--budget-s` bounds the whole run. An item whose usual minimum no longer fits is skipped (the last line
names the `--only` that runs what was skipped); a running one is cut at the budget. Each item writes
OUT/<item>.json (device, commit, command, numbers, same-run baseline, KV capacity in tokens, CUDA-graph mode,
max_model_len, dummy weights); OUT/summary.json and OUT/table.md hold the table, OUT/serve_throughput.png the
plot (when matplotlib is installed), OUT/logs/ every subprocess's output.
`--smoke` runs the same plumbing on CPU on tiny configs derived from the real ones, in well under 90 s.

Usage on the GPU machine: source .whl/activate.sh; python3 benchmarks/gpu_e2e.py --out $OUT --commit <sha>
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "benchmarks" / "configs"
ITEMS = ("ceilings", "latency", "throughput", "baseline", "serve", "cold_start", "qwen")
RESERVE_S = 10.0  # kept for the table and the plot
# vLLM 0.20.2, stock defaults, same dummy Llama-3.1-8B, same cards (issue 8, measured 2026-11-27).
VLLM = {
    "H100": {
        "copy_gbps": 3027,
        "matmul_tflops": 786,
        "ms_per_token": 6.72,
        "tok_s": 6879,
        "cold_s": 112,
        "kv_tokens": 439_000,
    },
    "H200": {
        "copy_gbps": 4279,
        "matmul_tflops": 790,
        "ms_per_token": 5.02,
        "tok_s": 8393,
        "cold_s": 94,
        "kv_tokens": 886_000,
    },
}
TARGETS = {"H100": {"ms_per_token": 5.6, "tok_s": 10_000}, "H200": {"ms_per_token": 4.2, "tok_s": 12_000}}
TARGET_HF_RATIO, TARGET_COLD_S = 5.0, 30.0


@dataclass(frozen=True)
class Plan:
    """The workloads of every item; `smoke_plan()` shrinks each of them for a CPU run."""

    llama: Path = CONFIGS / "llama-3.1-8b"
    qwen: Path = CONFIGS / "qwen3-0.6b"
    engine: tuple[str, ...] = ("--max-model-len", "4096", "--gpu-memory-utilization", "0.9")
    max_model_len: int = 4096
    latency_len: int = 128  # input = output tokens, batch 1
    tp_prompts: int = 1000
    tp_len: int = 1024  # input = output tokens
    qwen_prompts: int = 256
    qwen_range: str = "100,1024"
    base_prompts: int = 32  # one batch of HF generate
    base_in: int = 1024
    base_out: int = 128
    hf_dtype: str = "bfloat16"
    serve_in: int = 1024
    serve_out: int = 128
    concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    prompts_per_concurrency: int = 4
    min_serve_prompts: int = 16
    dtype_bytes: int = 2

    @property
    def base_workload(self) -> str:
        return f"--num-prompts {self.base_prompts} --input-len {self.base_in} --output-len {self.base_out}"

    def serve_prompts(self, concurrency: int) -> int:
        return max(self.min_serve_prompts, self.prompts_per_concurrency * concurrency)


def smoke_plan(tmp: Path) -> Plan:
    """Tiny Llama (2 layers, hidden 64, vocab 512) and Qwen3 configs, tiny lengths and counts, CPU KV cache."""
    tiny = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    dirs = []
    for name in ("llama-3.1-8b", "qwen3-0.6b"):
        config = {**json.loads((CONFIGS / name / "config.json").read_text()), **tiny}
        (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / name / "config.json").write_text(json.dumps(config))
        dirs.append(tmp / name)
    return Plan(
        llama=dirs[0],
        qwen=dirs[1],
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


def decode_bytes(model: Path, dtype_bytes: int) -> int:
    """Bytes of weights one decode step reads: all layers, the final norm and lm_head (not the embedding)."""
    c = json.loads((model / "config.json").read_text())
    h, heads, kv = (
        c["hidden_size"],
        c["num_attention_heads"],
        c.get("num_key_value_heads", c["num_attention_heads"]),
    )
    hd = c.get("head_dim") or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2 + (2 * hd if c.get("model_type") == "qwen3" else 0)
    layer = attn + 3 * h * c["intermediate_size"] + 2 * h
    return (c["num_hidden_layers"] * layer + h + c["vocab_size"] * h) * dtype_bytes


def parse_log(text: str) -> dict[str, Any]:
    """KV capacity and CUDA-graph mode as the engine logs them at start-up."""
    out: dict[str, Any] = {}
    if m := re.search(r"KV (?:cache )?capacity:? (\d+) tokens", text):
        out["kv_capacity_tokens"] = int(m.group(1))
    if m := re.search(r"CUDA graphs captured for decode batch sizes (.*?) in ([\d.]+) s", text):
        out["cuda_graphs"] = f"full decode graphs, sizes {m.group(1)}, captured in {m.group(2)} s"
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
                _stop(proc)
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
        (self.out / f"{item}.json").write_text(json.dumps(rec, indent=2, default=str))


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM to the process group this script started, SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _treadle(*argv: str) -> list[str]:
    return [sys.executable, "-m", "treadle.cli", *argv]


def _bench(s: Session, name: str, kind: str, model: Path, extra: str) -> tuple[dict[str, Any], list[str]]:
    """`treadle bench latency|throughput` in a subprocess: its --output-json result plus start-up facts."""
    out = s.out / "logs" / f"{name}.result.json"
    cmd = _treadle("bench", kind, "--model", str(model), "--load-format", "dummy", *s.plan.engine)
    cmd += [*extra.split(), "--output-json", str(out)]
    rc, log = s.run(name, cmd)
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"{name}: exit {rc}" + (" (cut at the budget)" if rc == 124 else "") + _tail(log))
    return _result(out, log), cmd


def _result(path: Path, log: str) -> dict[str, Any]:
    rec = json.loads(path.read_text())
    return {
        **rec["result"],
        **parse_log(log),
        **{k: v for k, v in rec.get("engine", {}).items() if v is not None},
    }


def _tail(log: str, n: int = 6) -> str:
    return "; log tail: " + " | ".join(log.strip().splitlines()[-n:])


def _facts(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("kv_capacity_tokens", "cuda_graphs", "max_model_len")}


def step_ceilings(s: Session, items: list[str]) -> dict[str, str]:
    if s.device == "cpu":
        raise _Skip("no CUDA device")
    raw = s.out / "logs" / "ceilings.result.json"
    cmd = [sys.executable, "benchmarks/device_ceilings.py", "--out", str(raw)]
    rc, log = s.run("ceilings", cmd, cap_s=180)
    if rc != 0:
        raise RuntimeError(f"ceilings: exit {rc}{_tail(log)}")
    r = json.loads(raw.read_text())
    s.record("ceilings", cmd, {k: r[k] for k in ("copy_bandwidth_gbps", "bf16_matmul_tflops")}, detail=r)
    return {"ceilings": "ok"}


def step_hf(s: Session, items: list[str]) -> dict[str, str]:
    """HF transformers on the baseline workload; treadle's side runs in step_llama, the record is written there."""
    p = s.plan
    raw = s.out / "logs" / "baseline_hf.result.json"
    s.hf_cmd = [sys.executable, "benchmarks/hf_baseline.py", "--model", str(p.llama), "--out", str(raw)]
    s.hf_cmd += (
        f"--dummy --dtype {p.hf_dtype} --static-cache --batch-size {p.base_prompts} {p.base_workload}".split()
    )
    rc, log = s.run("baseline_hf", s.hf_cmd, cap_s=max(60.0, s.remaining() - 120))
    if rc != 0:
        raise RuntimeError(f"HF baseline: exit {rc}{_tail(log)}")
    s.hf = json.loads(raw.read_text())
    return {}


def step_llama(s: Session, items: list[str]) -> dict[str, str]:
    """latency, the baseline workload and throughput on ONE engine start-up (`--worker`), in that order, each
    phase with its own prompt seed (no prefix-cache hits across phases); a phase cut at the budget loses only
    itself and those after it."""
    p, n = s.plan, s.plan.latency_len
    workloads = {
        "latency": f"latency --batch-size 1 --input-len {n} --output-len {n} --num-iters-warmup 1 --num-iters 3",
        # not recorded: batched prefill and decode shapes once (kernel JIT) before the short baseline workload
        "warmup": f"throughput --num-prompts {p.base_prompts} --input-len {p.base_in} --output-len 8",
        "baseline": f"throughput {p.base_workload}",
        "throughput": f"throughput --num-prompts {p.tp_prompts} --input-len {p.tp_len} --output-len {p.tp_len}",
    }
    if s.hf is None:
        workloads.pop("baseline")
    phases: list[tuple[str, list[str]]] = []  # (item, argv of `treadle`)
    wanted = [*items, "warmup"] if {"baseline", "throughput"} & set(items) else items
    for seed, (name, workload) in enumerate(w for w in workloads.items() if w[0] in wanted):
        kind, extra = workload.split(" ", 1)
        argv = ["bench", kind, "--model", str(p.llama), "--load-format", "dummy", *p.engine, *extra.split()]
        phases.append(
            (name, [*argv, "--seed", str(seed), "--output-json", str(s.out / "logs" / f"{name}.result.json")])
        )
    spec = s.out / "logs" / "llama_phases.json"
    spec.write_text(json.dumps([{"name": name, "argv": argv} for name, argv in phases], indent=2))
    rc, log = s.run("llama", [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)])
    shared = f"  (one engine for {', '.join(name for name, _ in phases)})"
    status = {}
    for name, argv in phases:
        path = Path(argv[-1])
        if not path.is_file():
            cut = " (cut at the budget)" if rc == 124 else ""
            raise RuntimeError(f"{name}: no result, llama worker exit {rc}{cut}{_tail(log)}")
        if name == "warmup":
            continue
        r = _result(path, log)
        cmd = "treadle " + " ".join(argv[:-2]) + shared
        if name == "latency":
            ms = float(r["avg_latency"]) * 1000.0 / n
            num_bytes = decode_bytes(p.llama, p.dtype_bytes)
            gbps = num_bytes / (ms * 1e-3) / 1e9
            numbers = {"ms_per_output_token": ms, "achieved_gbps": gbps, "decode_weight_bytes": num_bytes}
            s.record("latency", cmd, {**numbers, "latencies_s": r["latencies"]}, **_facts(r))
        elif name == "baseline":
            assert s.hf is not None, "the baseline phase runs only after step_hf"
            ours, theirs = r["output_tokens_per_second"], s.hf["output_tokens_per_second"]
            numbers = {"treadle_output_tok_s": ours, "hf_output_tok_s": theirs, "ratio": ours / theirs}
            cmd += "  VS  " + " ".join(s.hf_cmd)
            s.record("baseline", cmd, numbers, baseline=s.hf, **_facts(r))
        else:
            s.record("throughput", cmd, _tp_numbers(r), **_facts(r))
        status[name] = "ok"
    return status


def offline_worker(spec_path: str) -> int:
    """`gpu_e2e.py --worker SPEC`: runs the `treadle bench` phases listed in SPEC on one started engine."""
    import logging

    from treadle.bench import offline
    from treadle.cli import build_parser

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    llm = None
    for phase in json.loads(Path(spec_path).read_text()):
        args = parser.parse_args(phase["argv"])
        print(f"== {phase['name']}: treadle {' '.join(phase['argv'])}", flush=True)
        llm = llm if llm is not None else offline.make_llm(args)
        (offline.run_latency if args.bench_command == "latency" else offline.run_throughput)(args, llm)
    return 0


def step_qwen(s: Session, items: list[str]) -> dict[str, str]:
    p = s.plan
    extra = (
        f"--num-prompts {p.qwen_prompts} --input-len-range {p.qwen_range} --output-len-range {p.qwen_range}"
    )
    r, cmd = _bench(s, "qwen", "throughput", p.qwen, extra)
    ref = (
        "nano-vllm 1,434 / vLLM 1,362 output tok/s on an RTX 4070 Laptop (nano-vllm's README), same workload"
    )
    s.record("qwen", cmd, _tp_numbers(r), reference=ref, **_facts(r))
    return {"qwen": "ok"}


def _tp_numbers(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("output_tokens_per_second", "tokens_per_second", "requests_per_second", "elapsed_time")
    return {k: r[k] for k in (*keys, "total_prompt_tokens", "total_output_tokens")}


def step_serve(s: Session, items: list[str]) -> dict[str, str]:
    """Cold start (spawn -> /health 200, recorded as cold_start.json), then one bench serve per concurrency."""
    p = s.plan
    port = _free_port()
    cmd = _treadle("serve", str(p.llama), "--load-format", "dummy", *p.engine)
    cmd += f"--host 127.0.0.1 --port {port} --served-model-name llama-3.1-8b-dummy".split()
    log_path = s.out / "logs" / "serve_server.log"
    levels: list[dict[str, Any]] = []
    status = {}
    with open(log_path, "w") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            cold = _wait_ready(proc, port, start, min(400.0, s.remaining()))
            facts = parse_log(log_path.read_text(errors="replace"))
            s.record("cold_start", cmd, {"cold_start_s": cold}, **facts)
            status["cold_start"] = "ok"
            for conc in p.concurrencies if "serve" in items else ():
                try:
                    if s.remaining() < 20:
                        raise TimeoutError
                    levels.append(_serve_level(s, port, conc))
                except TimeoutError:  # not started, or cut at the budget
                    levels.append({"max_concurrency": conc, "skipped": "budget"})
            if "serve" in items:
                workload = f"random {p.serve_in} / {p.serve_out}, ignore_eos"
                s.record("serve", cmd, {"cold_start_s": cold, "levels": levels}, workload=workload, **facts)
        finally:
            _stop(proc)
    failed = [
        f"c={lv['max_concurrency']}: {lv['failed']} failed {lv['errors'][:1]}"
        for lv in levels
        if lv.get("failed")
    ]
    cut = [str(lv["max_concurrency"]) for lv in levels if "skipped" in lv]
    if "serve" in items:
        status["serve"] = f"FAILED: {'; '.join(failed)}" if failed else "ok"
        if cut and not failed:
            status["serve"] = f"partial: concurrency {','.join(cut)} cut at the budget"
    return status


def _serve_level(s: Session, port: int, conc: int) -> dict[str, Any]:
    """`treadle bench serve` in this process (it is only an HTTP client), its report to logs/serve_c<N>.log."""
    from treadle.bench import serve as bench_serve

    p = s.plan
    argv = (
        f"--port {port} --num-prompts {p.serve_prompts(conc)} --random-input-len {p.serve_in} "
        f"--random-output-len {p.serve_out} --max-concurrency {conc} --ignore-eos --seed {conc} "
        f"--random-vocab-size {_vocab(p.llama)}"
    )
    parser = argparse.ArgumentParser()
    bench_serve.add_serve_args(parser)
    bench = bench_serve.run_serve_benchmark(parser.parse_args(argv.split()))
    with open(s.out / "logs" / f"serve_c{conc}.log", "w") as f, contextlib.redirect_stdout(f):
        print(f"treadle bench serve {argv}")
        metrics = asyncio.run(asyncio.wait_for(bench, max(5.0, s.remaining())))
    return {"command": f"treadle bench serve {argv}", **metrics}


def _vocab(model: Path) -> int:
    """Prompt token ids are drawn below this: the vocabulary, at most 32,000 (as the offline benchmarks)."""
    return min(32_000, int(json.loads((model / "config.json").read_text())["vocab_size"]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[Any], port: int, start: float, limit_s: float) -> float:
    """Seconds from spawn to GET /health == 200."""
    import httpx

    while time.monotonic() - start < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(
                f"treadle serve exited with {proc.returncode} before READY (logs/serve_server.log)"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.1)
    raise RuntimeError(f"treadle serve not READY after {limit_s:.0f} s (logs/serve_server.log)")


class _Skip(Exception):
    """An item that does not apply here (no CUDA for the ceilings)."""


# (name, items it measures, the least time it needs, runner), in run order
STEPS = (
    ("ceilings", ("ceilings",), 25, step_ceilings),
    ("hf", ("baseline",), 60, step_hf),
    ("serve", ("cold_start", "serve"), 60, step_serve),
    ("qwen", ("qwen",), 40, step_qwen),
    ("llama", ("latency", "baseline", "throughput"), 60, step_llama),
)


def _fmt(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _row(
    name: str,
    ours: float,
    ref_name: str,
    ref: float | None,
    digits: int = 0,
    lower: bool = False,
    target: float | None = None,
) -> list[str]:
    """One metric against a reference; `lower`: smaller is better (the ratio is then reference / ours)."""
    ratio = "—" if not ours or not ref else f"{(ref / ours if lower else ours / ref):.2f}×"
    met = "—"
    if target is not None:
        met = (
            "yes" if (ours <= target if lower else ours >= target) else "NO"
        ) + f" ({'<=' if lower else '>='} {target:,g})"
    return [name, _fmt(ours, digits), f"{ref_name} {_fmt(ref, digits)}".strip(), ratio, met]


def table_rows(s: Session, status: dict[str, str]) -> list[list[str]]:
    """item | treadle | baseline / reference | ratio (> 1: treadle better) | target met?"""
    gen = "H200" if "H200" in s.device else "H100" if "H100" in s.device else None
    ref, tgt = VLLM.get(gen or "", {}), TARGETS.get(gen or "", {})
    vllm, p = f"vLLM {gen or ''}".strip(), s.plan
    num = {k: r["numbers"] for k, r in s.records.items() if "error" not in r}
    rows: list[list[str]] = []
    bw = num.get("ceilings", {}).get("copy_bandwidth_gbps")
    if c := num.get("ceilings"):
        rows.append(_row("copy bandwidth GB/s", bw, f"{vllm}'s card", ref.get("copy_gbps")))
        rows.append(
            _row("bf16 matmul TFLOP/s", c["bf16_matmul_tflops"], f"{vllm}'s card", ref.get("matmul_tflops"))
        )
    if r := num.get("latency"):
        name = f"Llama-8B b1 {p.latency_len}/{p.latency_len} ms/token"
        rows.append(
            _row(
                name,
                r["ms_per_output_token"],
                vllm,
                ref.get("ms_per_token"),
                2,
                True,
                tgt.get("ms_per_token"),
            )
        )
        rows.append(_row("  achieved GB/s (weights read)", r["achieved_gbps"], "copy bandwidth", bw))
    if r := num.get("throughput"):
        name = f"Llama-8B {p.tp_prompts}x{p.tp_len}/{p.tp_len} out tok/s"
        rows.append(
            _row(name, r["output_tokens_per_second"], vllm, ref.get("tok_s"), target=tgt.get("tok_s"))
        )
    kvs = [
        s.records[k].get("kv_capacity_tokens") for k in ("throughput", "latency", "serve") if k in s.records
    ]
    if kv := next((k for k in kvs if k), None):
        rows.append(
            _row(f"KV capacity tokens (max_model_len {p.max_model_len})", kv, vllm, ref.get("kv_tokens"))
        )
    if r := num.get("baseline"):
        name = f"vs HF generate {p.base_prompts}x{p.base_in}/{p.base_out} out tok/s"
        row = _row(name, r["treadle_output_tok_s"], "HF transformers", r["hf_output_tok_s"])
        row[-1] = ("yes" if r["ratio"] >= TARGET_HF_RATIO else "NO") + f" (>= {TARGET_HF_RATIO:g}×)"
        rows.append(row)
    if r := num.get("cold_start"):
        rows.append(
            _row("cold start to READY s", r["cold_start_s"], vllm, ref.get("cold_s"), 1, True, TARGET_COLD_S)
        )
    for lv in num.get("serve", {}).get("levels", []):
        name = f"serve {p.serve_in}/{p.serve_out} c={lv['max_concurrency']} out tok/s"
        if "skipped" in lv:
            rows.append([name, "skipped (budget)", "—", "—", "—"])
            continue
        ours = f"{_fmt(lv['output_throughput'])} (TTFT {lv['median_ttft_ms']:.0f}, TPOT {lv['median_tpot_ms']:.1f} ms)"
        rows.append([name, ours + (f", {lv['failed']} failed" if lv["failed"] else ""), "—", "—", "—"])
    if r := num.get("qwen"):
        name = f"Qwen3-0.6B {p.qwen_prompts}x U({p.qwen_range}) out tok/s"
        rows.append(_row(name, r["output_tokens_per_second"], "nano-vllm (RTX 4070 laptop)", 1434.0))
        rows[-1][3] = "—"  # another GPU: no ratio
    rows += [[item, st[:80], "—", "—", "—"] for item, st in status.items() if st != "ok"]
    return rows


def render_table(rows: list[list[str]]) -> str:
    head = ["item", "treadle", "baseline / reference", "ratio (>1: treadle better)", "target met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot_serve(s: Session) -> Path | None:
    levels = [
        lv for lv in s.records.get("serve", {}).get("numbers", {}).get("levels", []) if "skipped" not in lv
    ]
    if not levels:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the numbers are in serve.json)", file=sys.stderr)
        return None
    xs = [lv["max_concurrency"] for lv in levels]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [lv["output_throughput"] for lv in levels], marker="o", label="treadle")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Llama-3.1-8B (dummy) {s.plan.serve_in}/{s.plan.serve_out}, {s.device}")
    ax.grid(True, alpha=0.3)
    path = s.out / "serve_throughput.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


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
    args = ap.parse_args(argv)
    args.items = args.only.split(",") if args.only else list(ITEMS)
    if bad := [i for i in args.items if i not in ITEMS]:
        ap.error(f"unknown item(s) {bad} in --only; valid: {', '.join(ITEMS)}")
    return args


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
            except _Skip as e:
                status.update({i: f"skipped: {e}" for i in items})
            except Exception as e:  # one failed step must not lose the others (nor its finished items)
                for i in items:
                    if i in s.records:
                        status.setdefault(i, "ok")
                    else:
                        status[i] = f"FAILED: {e}"
                        s.record(i, "", {}, error=f"{type(e).__name__}: {e}")
            done = ", ".join(f"{i} {status.get(i, 'ok')}" for i in items)
            print(f"[{time.monotonic() - t0:6.1f} s] {step}: {done}", flush=True)
        plot = plot_serve(s)
        rows = table_rows(s, status)
        table = render_table(rows)
        summary = {
            "device": s.device,
            "commit": s.commit,
            "status": status,
            "plan": asdict(plan),
            "records": s.records,
            "table": rows,
            "plot": str(plot) if plot else None,
        }
        (s.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (s.out / "table.md").write_text(table + "\n")
        skipped += [i for i, st in status.items() if "cut at the budget" in st]
        if skipped:
            print(f"out of budget: rerun with --only {','.join(dict.fromkeys(skipped))}")
        print(f"\n{s.device} | commit {s.commit[:12]} | dummy weights | results in {s.out}\n{table}")
    return 1 if any(st.startswith("FAILED") for st in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
