"""The fp8-weight items of benchmarks/gpu_e2e.py: the Llama latency and throughput workloads with `--quantization fp8`.

`latency_wfp8`: the `latency` item's batch-1 workload (128 in / 128 out) on an engine whose dense projections are
online-fp8 (float8_e4m3fn weights, per-channel scales; activations per token; lm_head and embedding in bf16).
Achieved GB/s counts what a decode step reads then: the projections at one byte per weight, the lm_head (and the
norms, a negligible share counted at one byte) at the model dtype's.
`throughput_wfp8`: the `throughput` item's 1000 x 1024 / 1024 on the same engine (its KV cache, sized after the
freed bf16 weights, holds more tokens).
Both run on ONE engine start-up after the bf16 `llama` step, and each record carries the bf16 number of the same
run (when that step ran) and the ratio: the like-for-like baseline.
"""

from __future__ import annotations

from typing import Any

from gpu_e2e_offline import _facts, _tp_numbers, latency_workload, phase_results, run_phases
from gpu_e2e_session import Session
from roofline import shapes


def _fp8_decode_bytes(s: Session) -> int:
    """Bytes a batch-1 decode step reads with fp8 projections: layers at 1 byte a weight, lm_head at the dtype's."""
    model = shapes(s.plan.llama)
    return int(model.layers * model.dense_per_layer + model.lm_head * s.plan.dtype_bytes)


def _versus_bf16(s: Session, item: str, key: str, ours: float, lower_is_better: bool) -> dict[str, Any]:
    rec = s.records.get(item)
    if rec is None or "error" in rec:
        return {}
    theirs = float(rec["numbers"][key])
    speedup = theirs / ours if lower_is_better else ours / theirs
    return {f"bf16_{key}": theirs, "speedup_vs_bf16": speedup}


def step_wfp8(s: Session, items: list[str]) -> dict[str, str]:
    p = s.plan
    quant = " --quantization fp8"
    workloads = {
        "latency_wfp8": latency_workload(p.latency_len) + quant,
        "throughput_wfp8": f"throughput --num-prompts {p.tp_prompts} --input-len {p.tp_len} "
        f"--output-len {p.tp_len}" + quant,
    }
    wanted = {k: v for k, v in workloads.items() if k in items}
    phases, rc, log = run_phases(s, "llama_wfp8", p.llama, wanted)
    status = {}
    for name, r, cmd in phase_results(phases, rc, log, "llama_wfp8"):
        if name == "latency_wfp8":
            ms = float(r["avg_latency"]) * 1000.0 / p.latency_len
            num_bytes = _fp8_decode_bytes(s)
            numbers = {
                "ms_per_output_token": ms,
                "achieved_gbps": num_bytes / (ms * 1e-3) / 1e9,
                "decode_weight_bytes_fp8": num_bytes,
                "latencies_s": r["latencies"],
            } | _versus_bf16(s, "latency", "ms_per_output_token", ms, lower_is_better=True)
        else:
            numbers = _tp_numbers(r)
            rate = numbers["output_tokens_per_second"]
            numbers |= _versus_bf16(s, "throughput", "output_tokens_per_second", rate, lower_is_better=False)
        s.record(name, cmd, numbers, quantization="fp8", **_facts(r))
        status[name] = "ok"
    return status
