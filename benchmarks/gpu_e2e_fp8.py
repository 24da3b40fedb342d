"""The fp8-cache item of benchmarks/gpu_e2e.py: the Llama throughput workload with `--kv-cache-dtype fp8`.

`throughput_fp8`: the `throughput` item's workload (1000 x 1024 / 1024, ignore_eos) on an engine whose KV cache
is fp8 (half the bytes a token, twice the capacity) at `Plan.fp8_max_num_seqs` sequences, against the throughput
roofline and serial bound of roofline.py for one byte a cached value. Its own engine start-up, run last.
"""

from __future__ import annotations

from gpu_e2e_offline import _facts, _tp_numbers, phase_results, run_phases, throughput_vs_roofline
from gpu_e2e_session import Session


def step_fp8(s: Session, items: list[str]) -> dict[str, str]:
    p = s.plan
    seqs = p.fp8_max_num_seqs
    workload = f"throughput --num-prompts {p.tp_prompts} --input-len {p.tp_len} --output-len {p.tp_len}"
    workload += f" --kv-cache-dtype fp8 --max-num-seqs {seqs}"
    phases, rc, log = run_phases(s, "llama_fp8", p.llama, {"throughput_fp8": workload})
    status = {}
    for name, r, cmd in phase_results(phases, rc, log, "llama_fp8"):
        roof = throughput_vs_roofline(s, p.llama, r, p.tp_prompts, p.tp_len, p.tp_len, 1, seqs)
        s.record(name, cmd, _tp_numbers(r) | roof, kv_cache_dtype="fp8", max_num_seqs=seqs, **_facts(r))
        status[name] = "ok"
    return status
