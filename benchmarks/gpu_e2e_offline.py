"""The offline steps of benchmarks/gpu_e2e.py: device ceilings, the HF baseline, Llama and Qwen `treadle bench`.

Each `step_*(session, items) -> {item: status}` runs its measurement in subprocesses and records every item it
finishes. The Llama items (latency, treadle's side of the HF baseline, throughput) share ONE engine start-up:
`step_llama` writes the phases to a JSON spec and runs `gpu_e2e.py --worker SPEC`, which lands in
`offline_worker` here. Invariants: each phase has its own prompt seed (no prefix-cache hits across phases), and
a phase cut at the budget loses only itself and those after it. Achieved GB/s counts the bytes one decode step
reads (every weight but the embedding table).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpu_e2e_session import Session, Skip, log_tail, parse_log, treadle_argv
from roofline import latency_roofline_ms, shapes, throughput_roofline

WORKER = Path(__file__).resolve().with_name("gpu_e2e.py")  # the entry point; `--worker` runs offline_worker


def _bench(s: Session, name: str, kind: str, model: Path, extra: str) -> tuple[dict[str, Any], list[str]]:
    """`treadle bench latency|throughput` in a subprocess: its --output-json result plus start-up facts."""
    out = s.out / "logs" / f"{name}.result.json"
    cmd = treadle_argv("bench", kind, "--model", str(model), "--load-format", "dummy", *s.plan.engine)
    cmd += [*extra.split(), "--output-json", str(out)]
    rc, log = s.run(name, cmd)
    if rc != 0 or not out.is_file():
        raise RuntimeError(
            f"{name}: exit {rc}" + (" (cut at the budget)" if rc == 124 else "") + log_tail(log)
        )
    return _result(out, log), cmd


def _result(path: Path, log: str) -> dict[str, Any]:
    rec = json.loads(path.read_text())
    return {
        **{k: v for k, v in rec.items() if k not in ("args", "treadle", "engine")},  # the result's keys
        **parse_log(log),
        **{k: v for k, v in rec.get("engine", {}).items() if v is not None},
    }


def _facts(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("kv_capacity_tokens", "cuda_graphs", "max_model_len")}


def step_ceilings(s: Session, items: list[str]) -> dict[str, str]:
    if s.device == "cpu":
        raise Skip("no CUDA device")
    raw = s.out / "logs" / "ceilings.result.json"
    cmd = [sys.executable, "benchmarks/device_ceilings.py", "--out", str(raw)]
    rc, log = s.run("ceilings", cmd, cap_s=180)
    if rc != 0:
        raise RuntimeError(f"ceilings: exit {rc}{log_tail(log)}")
    r = json.loads(raw.read_text())
    s.record("ceilings", cmd, {k: r[k] for k in ("copy_bandwidth_gbps", "bf16_matmul_tflops")}, detail=r)
    return {"ceilings": "ok"}


def step_hf(s: Session, items: list[str]) -> dict[str, str]:
    """HF transformers on the baseline workload; treadle's side runs in step_llama, the record is written there."""
    p = s.plan
    raw = s.out / "logs" / "baseline_hf.result.json"
    s.hf_cmd = [sys.executable, "benchmarks/hf_baseline.py", "--model", str(p.llama), "--out", str(raw)]
    how = "--continuous-batching" if p.hf_mode == "batch" else f"--static-cache --batch-size {p.base_prompts}"
    s.hf_cmd += f"--dummy --dtype {p.hf_dtype} {how} {p.base_workload}".split()
    cap = 180.0 if p.hf_mode == "static" else 420.0  # continuous batching runs more prompts
    rc, log = s.run("baseline_hf", s.hf_cmd, cap_s=min(cap, max(60.0, s.remaining() - 120)))
    if rc != 0:
        raise RuntimeError(f"HF baseline: exit {rc}{log_tail(log)}")
    s.hf = json.loads(raw.read_text())
    return {}


def step_llama(s: Session, items: list[str]) -> dict[str, str]:
    """latency, the baseline workload and throughput on ONE engine start-up (`--worker`), in that order, each
    phase with its own prompt seed (no prefix-cache hits across phases); a phase cut at the budget loses only
    itself and those after it."""
    p = s.plan
    workloads = {
        "latency": latency_workload(p.latency_len),
        # not recorded: batched prefill and decode shapes once (kernel JIT) before the short baseline workload
        "warmup": f"throughput --num-prompts {p.base_prompts} --input-len {p.base_in} --output-len 8",
        "baseline": f"throughput {p.base_workload}",
        "throughput": f"throughput --num-prompts {p.tp_prompts} --input-len {p.tp_len} --output-len {p.tp_len}",
    }
    if s.hf is None:
        workloads.pop("baseline")
    wanted = [*items, "warmup"] if {"baseline", "throughput"} & set(items) else items
    phases, rc, log = run_phases(s, "llama", p.llama, {k: v for k, v in workloads.items() if k in wanted})
    status = {}
    for name, r, cmd in phase_results(phases, rc, log, "llama"):
        if name == "warmup":
            continue
        if name == "latency":
            s.record("latency", cmd, latency_numbers(s, p.llama, r), **_facts(r))
        elif name == "baseline":
            assert s.hf is not None, "the baseline phase runs only after step_hf"
            ours, theirs = r["output_tokens_per_second"], s.hf["output_tokens_per_second"]
            numbers = {"treadle_output_tok_s": ours, "hf_output_tok_s": theirs, "ratio": ours / theirs}
            cmd += "  VS  " + " ".join(s.hf_cmd)
            s.record("baseline", cmd, numbers, baseline=s.hf, **_facts(r))
        else:
            numbers = _tp_numbers(r) | throughput_vs_roofline(s, p.llama, r, p.tp_prompts, p.tp_len, p.tp_len)
            s.record("throughput", cmd, numbers, **_facts(r))
        status[name] = "ok"
    if "baseline" in status and "throughput" in status:  # HF's rate against the full offline run's
        rec = s.records["baseline"]
        full = s.records["throughput"]["numbers"]["output_tokens_per_second"]
        rec["numbers"]["full_run_output_tok_s"] = full
        rec["numbers"]["full_run_ratio"] = full / rec["numbers"]["hf_output_tok_s"]
        s.record("baseline", rec["command"], rec["numbers"], **{k: v for k, v in rec.items() if k not in
                 ("item", "device", "commit", "command", "numbers", "dummy_weights", "smoke", "max_model_len",
                  "time_utc")})  # fmt: skip
    return status


def run_phases(
    s: Session, name: str, model: Path, workloads: dict[str, str]
) -> tuple[list[tuple[str, list[str]]], int, str]:
    """Runs `treadle bench` workloads {phase: "KIND ARGS"} on ONE engine (`--worker`), each with its own seed."""
    phases: list[tuple[str, list[str]]] = []  # (phase, argv of `treadle`)
    for seed, (phase, workload) in enumerate(workloads.items()):
        kind, extra = workload.split(" ", 1)
        argv = [
            "bench",
            kind,
            "--model",
            str(model),
            "--load-format",
            "dummy",
            *s.plan.engine,
            *extra.split(),
        ]
        result = s.out / "logs" / f"{name}_{phase}.result.json"
        phases.append((phase, [*argv, "--seed", str(seed), "--output-json", str(result)]))
    spec = s.out / "logs" / f"{name}_phases.json"
    spec.write_text(json.dumps([{"name": phase, "argv": argv} for phase, argv in phases], indent=2))
    rc, log = s.run(name, [sys.executable, str(WORKER), "--worker", str(spec)])
    return phases, rc, log


def latency_workload(n: int) -> str:
    """`treadle bench latency` at batch 1, n in / n out, 3 timed iterations after one warm-up."""
    return f"latency --batch-size 1 --input-len {n} --output-len {n} --num-iters-warmup 1 --num-iters 3"


def phase_results(
    phases: list[tuple[str, list[str]]], rc: int, log: str, worker: str
) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(phase, its result, its command line) of each phase `run_phases` ran; a missing result is an error."""
    shared = f"  (one engine for {', '.join(name for name, _ in phases)})"
    for name, argv in phases:
        path = Path(argv[-1])
        if not path.is_file():
            cut = " (cut at the budget)" if rc == 124 else ""
            raise RuntimeError(f"{name}: no result, {worker} worker exit {rc}{cut}{log_tail(log)}")
        yield name, _result(path, log), "treadle " + " ".join(argv[:-2]) + shared


def latency_numbers(
    s: Session, model: Path, r: dict[str, Any], bytes_key: str = "decode_weight_bytes"
) -> dict[str, Any]:
    """ms per output token of a batch-1 latency result, the GB/s it reads weights at, and its roofline share."""
    ms = float(r["avg_latency"]) * 1000.0 / s.plan.latency_len
    num_bytes = int(shapes(model).decode_weights(1)) * s.plan.dtype_bytes
    numbers = {
        "ms_per_output_token": ms,
        "achieved_gbps": num_bytes / (ms * 1e-3) / 1e9,
        bytes_key: num_bytes,
    }
    return numbers | latency_vs_roofline(s, model, ms) | {"latencies_s": r["latencies"]}


def _ceilings(s: Session) -> tuple[float, float] | None:
    rec = s.records.get("ceilings")
    if rec is None:
        return None
    return rec["numbers"]["copy_bandwidth_gbps"], rec["numbers"]["bf16_matmul_tflops"]


def latency_vs_roofline(s: Session, model: Path, ms: float) -> dict[str, Any]:
    """Batch-1 roofline (weights read once per step at the same-run copy rate) and our share of it."""
    ceil = _ceilings(s)
    if ceil is None:
        return {}
    roof = latency_roofline_ms(shapes(model, s.plan.dtype_bytes), ceil[0], s.plan.dtype_bytes)
    return {"roofline_ms_per_token": roof, "roofline_fraction": roof / ms}


def throughput_vs_roofline(
    s: Session, model: Path, r: dict[str, Any], prompts: int, in_len: int, out_len: int,
    kv_dtype_bytes: int | None = None, max_num_seqs: int = 256,
) -> dict[str, Any]:  # fmt: skip
    ceil = _ceilings(s)
    kv = r.get("kv_capacity_tokens")
    if ceil is None or not kv:
        return {}
    model_shapes = shapes(model, s.plan.dtype_bytes, kv_dtype_bytes)
    roof = throughput_roofline(model_shapes, *ceil, prompts, in_len, out_len, int(kv), max_num_seqs)
    rate = r["output_tokens_per_second"]
    return roof | {
        "roofline_fraction": rate / roof["roofline_output_tok_s"],
        "serial_bound_fraction": rate / roof["serial_bound_output_tok_s"],
    }


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
