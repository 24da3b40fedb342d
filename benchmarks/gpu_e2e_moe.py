"""The MoE items of benchmarks/gpu_e2e.py: a Qwen3-30B-A3B-shaped dummy model end to end (issue 7).

`moe_latency`: batch 1, 128 in / 128 out, mean of 3 iterations after a warm-up, / 128 -> ms per output token,
against the batch-1 roofline (active weights: attention, router, the top-8 experts of each layer, lm_head,
read once per step at the same-run copy rate). `moe_throughput`: offline random in / out with ignore_eos ->
output tokens / wall time, against the throughput roofline of roofline.py at the engine's KV capacity. Both
run on ONE engine start-up, like the Llama items.
"""

from __future__ import annotations

from gpu_e2e_offline import (
    _facts,
    _tp_numbers,
    latency_numbers,
    latency_workload,
    phase_results,
    run_phases,
    throughput_vs_roofline,
)
from gpu_e2e_session import Session


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
