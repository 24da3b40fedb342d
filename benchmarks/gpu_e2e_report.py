"""The report of benchmarks/gpu_e2e.py: reference numbers, the results table and the serving plot.

Every row reads item | treadle | baseline / reference | ratio | target met?, the ratio > 1 when treadle is
better (reference / ours for lower-is-better metrics). References are vLLM 0.20.2 with stock defaults on the
same dummy Llama-3.1-8B and the same card generation (picked from the device name; none on other devices),
HF transformers from the same run, and nano-vllm's published Qwen3-0.6B number (another GPU: no ratio).
Items that did not run ok get a row with their status, so the table never hides a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gpu_e2e_session import Session

# vLLM 0.20.2, stock defaults, same dummy Llama-3.1-8B, same cards (issue 8, measured 2026-11-27).
VLLM = {
    "H100": {
        "copy_gbps": 3027,
        "matmul_tflops": 786,
        "ms_per_token": 6.72,
        "tok_s": 6879,
        "cold_s": 112,
        "warm_s": 75,
        "kv_tokens": 439_000,
    },
    "H200": {
        "copy_gbps": 4279,
        "matmul_tflops": 790,
        "ms_per_token": 5.02,
        "tok_s": 8393,
        "cold_s": 94,
        "warm_s": 65,
        "kv_tokens": 886_000,
    },
}
TARGETS = {"H100": {"ms_per_token": 5.6, "tok_s": 10_000}, "H200": {"ms_per_token": 4.2, "tok_s": 12_000}}
TARGET_HF_RATIO, TARGET_COLD_S = 5.0, 30.0


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
    if r := num.get("latency_wfp8"):
        name = f"  b1 {p.latency_len}/{p.latency_len} ms/token, --quantization fp8"
        rows.append(_row(name, r["ms_per_output_token"], "bf16, same run", r.get("bf16_ms_per_output_token"),
                         2, True))  # fmt: skip
    if r := num.get("throughput_wfp8"):
        name = f"  {p.tp_prompts}x{p.tp_len}/{p.tp_len} out tok/s, --quantization fp8"
        rows.append(
            _row(
                name, r["output_tokens_per_second"], "bf16, same run", r.get("bf16_output_tokens_per_second")
            )
        )
        bf16_kv = s.records.get("throughput", {}).get("kv_capacity_tokens")
        if kv := s.records["throughput_wfp8"].get("kv_capacity_tokens"):
            rows.append(_row("  KV capacity tokens, --quantization fp8", kv, "bf16, same run", bf16_kv))
    if r := num.get("throughput_fp8"):
        name = f"  same, --kv-cache-dtype fp8, {p.fp8_max_num_seqs} seqs"
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
        name = f"vs {p.hf_name} {p.base_prompts}x{p.base_in}/{p.base_out} out tok/s"
        row = _row(name, r["treadle_output_tok_s"], "HF transformers", r["hf_output_tok_s"])
        row[-1] = ("yes" if r["ratio"] >= TARGET_HF_RATIO else "NO") + f" (>= {TARGET_HF_RATIO:g}×)"
        rows.append(row)
        if "full_run_ratio" in r:  # treadle's full offline run (its own batching) against HF's rate
            name = f"  full {p.tp_prompts}-prompt run vs {p.hf_name}'s rate"
            row = _row(name, r["full_run_output_tok_s"], "HF transformers", r["hf_output_tok_s"])
            row[-1] = (
                "yes" if r["full_run_ratio"] >= TARGET_HF_RATIO else "NO"
            ) + f" (>= {TARGET_HF_RATIO:g}×)"
            rows.append(row)
    if r := num.get("cold_start"):
        rows.append(
            _row("cold start to READY s", r["cold_start_s"], vllm, ref.get("cold_s"), 1, True, TARGET_COLD_S)
        )
    if r := num.get("warm_start"):
        name = "start to READY, compile caches warm, s"
        rows.append(_row(name, r["warm_start_s"], vllm, ref.get("warm_s"), 1, True))
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
    for item, label in (
        ("latency", "Llama-8B b1"),
        ("throughput", "Llama-8B offline"),
        ("moe_latency", "Qwen3-30B-A3B b1 ms/token"),
        ("moe_throughput", "Qwen3-30B-A3B offline out tok/s"),
        ("moe_latency_fp8", "Qwen3-30B-A3B-FP8 (block fp8) b1 ms/token"),
    ):
        r = num.get(item, {})
        if r and item.startswith("moe"):
            ours = r.get("ms_per_output_token") or r.get("output_tokens_per_second")
            roof = r.get("roofline_ms_per_token") or r.get("roofline_output_tok_s")
            rows.append(_row(label, ours, "roofline", roof, 2 if "latency" in item else 0, "latency" in item))
            if "bf16_ms_per_output_token" in r:
                rows.append(_row(f"  {label}: vs bf16", ours, "bf16, same run", r["bf16_ms_per_output_token"], 2,
                                 True))  # fmt: skip
        if "roofline_fraction" in r:
            rows.append(
                [f"  {label}: share of roofline", f"{100 * r['roofline_fraction']:.0f} %", "—", "—", "—"]
            )
        if "serial_bound_fraction" in r and abs(r["serial_bound_fraction"] - r["roofline_fraction"]) > 1e-3:
            share = f"{100 * r['serial_bound_fraction']:.0f} % of {_fmt(r['serial_bound_output_tok_s'])}"
            rows.append([f"  {label}: share of the serial bound", share, "—", "—", "—"])
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
