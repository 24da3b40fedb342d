"""The MoE items of benchmarks/gpu_e2e.py: a Qwen3-30B-A3B-shaped dummy model end to end (issue 7).

`moe_latency`: batch 1, 128 in / 128 out, mean of 3 iterations after a warm-up, / 128 -> ms per output token,
against the batch-1 roofline (active weights: attention, router, the top-8 experts of each layer, lm_head,
read once per step at the same-run copy rate). `moe_throughput`: offline random in / out with ignore_eos ->
output tokens / wall time, against the throughput roofline of roofline.py at the engine's KV capacity. Both
run on ONE engine start-up, like the Llama items.
"""

from __future__ import annotations

from pathlib import Path

from gpu_e2e_offline import (
    _facts,
    _result,
    _tp_numbers,
    latency_vs_roofline,
    run_phases,
    throughput_vs_roofline,
)
from gpu_e2e_session import Session, log_tail
from roofline import shapes


def step_moe(s: Session, items: list[str]) -> dict[str, str]:
    p, n = s.plan, s.plan.latency_len
    workloads = {
        "moe_latency": f"latency --batch-size 1 --input-len {n} --output-len {n} --num-iters-warmup 1 --num-iters 3",
        "moe_throughput": (
            f"throughput --num-prompts {p.moe_prompts} --input-len {p.tp_len} --output-len {p.tp_len}"
        ),
    }
    phases, rc, log = run_phases(s, "moe", p.moe, {k: v for k, v in workloads.items() if k in items})
    shared = f"  (one engine for {', '.join(name for name, _ in phases)})"
    status = {}
    for name, argv in phases:
        path = Path(argv[-1])
        if not path.is_file():
            cut = " (cut at the budget)" if rc == 124 else ""
            raise RuntimeError(f"{name}: no result, moe worker exit {rc}{cut}{log_tail(log)}")
        r = _result(path, log)
        cmd = "treadle " + " ".join(argv[:-2]) + shared
        if name == "moe_latency":
            ms = float(r["avg_latency"]) * 1000.0 / n
            active = int(shapes(p.moe).decode_weights(1)) * p.dtype_bytes
            numbers = {"ms_per_output_token": ms, "active_weight_bytes": active,
                       "achieved_gbps": active / (ms * 1e-3) / 1e9}  # fmt: skip
            numbers |= latency_vs_roofline(s, p.moe, ms)
            s.record(name, cmd, {**numbers, "latencies_s": r["latencies"]}, **_facts(r))
        else:
            numbers = _tp_numbers(r) | throughput_vs_roofline(s, p.moe, r, p.moe_prompts, p.tp_len, p.tp_len)
            s.record(name, cmd, numbers, **_facts(r))
        status[name] = "ok"
    return status
