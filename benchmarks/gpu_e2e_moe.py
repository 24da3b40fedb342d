"""The MoE items of benchmarks/gpu_e2e.py: a Qwen3-30B-A3B-shaped dummy model end to end (issue 7).

`moe_latency`: batch 1, 128 in / 128 out, mean of 3 iterations after a warm-up, / 128 -> ms per output token,
against the batch-1 roofline (active weights: attention, router, the top-8 experts of each layer, lm_head,
read once per step at the same-run copy rate). `moe_throughput`: offline random in / out with ignore_eos ->
output tokens / wall time, against the throughput roofline of roofline.py at the engine's KV capacity. Both
run on ONE engine start-up, like the Llama items.
`moe_latency_fp8`: the same batch-1 workload on the Qwen3-30B-A3B-FP8-shaped dummy model (configs/qwen3-30b-a3b-fp8:
its quantization_config, 128 x 128 block-wise fp8; dummy weights are quantized block-wise at load, experts
included), its own engine start-up after the bf16 one. Its bytes per step count the attention, router and the top-8
experts of each layer at one byte a weight and the lm_head at the model dtype's; the record carries the same run's
bf16 `moe_latency` and the speed-up (bf16 ms / fp8 ms).
"""

from __future__ import annotations

from gpu_e2e_offline import (
    _ceilings,
    _facts,
    _tp_numbers,
    latency_numbers,
    latency_workload,
    phase_results,
    run_phases,
    throughput_vs_roofline,
)
from gpu_e2e_session import Session
from roofline import shapes


def step_moe(s: Session, items: list[str]) -> dict[str, str]:
    p = s.plan
    workloads = {
        "moe_latency": latency_workload(p.latency_len),
        "moe_throughput": (
            f"throughput --num-prompts {p.moe_prompts} --input-len {p.tp_len} --output-len {p.tp_len}"
        ),
    }
    phases, rc, log = run_phases(s, "moe", p.moe, {k: v for k, v in workloads.items() if k in items})
    status = {}
    for name, r, cmd in phase_results(phases, rc, log, "moe"):
        if name == "moe_latency":
            s.record(name, cmd, latency_numbers(s, p.moe, r, "active_weight_bytes"), **_facts(r))
        else:
            numbers = _tp_numbers(r) | throughput_vs_roofline(s, p.moe, r, p.moe_prompts, p.tp_len, p.tp_len)
            s.record(name, cmd, numbers, **_facts(r))
        status[name] = "ok"
    return status


def _fp8_step_bytes(s: Session) -> int:
    """Bytes a batch-1 decode step of the fp8 MoE reads: the layers at 1 byte a weight, the lm_head at the dtype's."""
    m = shapes(s.plan.moe_fp8)
    return int(m.decode_weights(1) - m.lm_head + m.lm_head * s.plan.dtype_bytes)


def step_moe_fp8(s: Session, items: list[str]) -> dict[str, str]:
    p = s.plan
    phases, rc, log = run_phases(
        s, "moe_fp8", p.moe_fp8, {"moe_latency_fp8": latency_workload(p.latency_len)}
    )
    status = {}
    for name, r, cmd in phase_results(phases, rc, log, "moe_fp8"):
        ms = float(r["avg_latency"]) * 1000.0 / p.latency_len
        num_bytes = _fp8_step_bytes(s)
        numbers = {
            "ms_per_output_token": ms,
            "achieved_gbps": num_bytes / (ms * 1e-3) / 1e9,
            "active_weight_bytes_fp8": num_bytes,
            "latencies_s": r["latencies"],
        }
        if (ceil := _ceilings(s)) is not None:
            roof = num_bytes / (ceil[0] * 1e9) * 1e3
            numbers |= {"roofline_ms_per_token": roof, "roofline_fraction": roof / ms}
        bf16 = s.records.get("moe_latency")
        if bf16 is not None and "error" not in bf16:
            theirs = float(bf16["numbers"]["ms_per_output_token"])
            numbers |= {"bf16_ms_per_output_token": theirs, "speedup_vs_bf16": theirs / ms}
        s.record(name, cmd, numbers, quantization="fp8 block 128x128 (config.json)", **_facts(r))
        status[name] = "ok"
    return status
