"""benchmarks/gpu_e2e.py --smoke: every item's plumbing end to end on CPU (tiny configs, tiny workloads).

The numbers mean nothing here; what is checked is that each item ran its real commands (treadle bench latency /
throughput, hf_baseline.py, treadle serve + bench serve), that each record carries what a result must
(device, commit, command, KV capacity, max_model_len, dummy weights), that the token counts match the
workload, and that the table comes last.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_e2e_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/gpu_e2e.py", "--smoke", "--out", str(out), "--commit", "abc123"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = {}
    for item in (
        "latency",
        "throughput",
        "baseline",
        "cold_start",
        "warm_start",
        "serve",
        "qwen",
        "moe_latency",
        "moe_throughput",
        "throughput_fp8",
        "latency_wfp8",
        "throughput_wfp8",
    ):
        rec = _strict_load(out / f"{item}.json")
        assert "error" not in rec, rec
        assert rec["device"] == "cpu" and rec["commit"] == "abc123" and rec["dummy_weights"] is True
        assert rec["command"] and rec["max_model_len"] == 256
        records[item] = rec
    for item in ("latency", "throughput", "qwen", "baseline", "serve", "moe_latency", "moe_throughput",
                 "throughput_fp8"):  # fmt: skip
        assert records[item]["kv_capacity_tokens"] > 0, item
    fp8 = records["throughput_fp8"]
    assert fp8["kv_cache_dtype"] == "fp8" and "--kv-cache-dtype fp8" in fp8["command"]
    assert fp8["numbers"]["total_output_tokens"] == records["throughput"]["numbers"]["total_output_tokens"]
    assert records["warm_start"]["numbers"]["warm_start_s"] > 0
    for item in ("latency_wfp8", "throughput_wfp8"):
        wfp8 = records[item]
        assert wfp8["quantization"] == "fp8" and "--quantization fp8" in wfp8["command"], item
        assert wfp8["kv_capacity_tokens"] > 0 and wfp8["numbers"]["speedup_vs_bf16"] > 0, item
    wfp8_out = records["throughput_wfp8"]["numbers"]["total_output_tokens"]
    assert wfp8_out == records["throughput"]["numbers"]["total_output_tokens"]
    moe = records["moe_throughput"]["numbers"]
    assert moe["total_prompt_tokens"] == 4 * 16 and moe["total_output_tokens"] == 4 * 16
    assert records["moe_latency"]["numbers"]["ms_per_output_token"] > 0

    bench_record = json.loads((out / "logs" / "llama_latency.result.json").read_text())
    assert bench_record["treadle"]["commit"] == "abc123"  # gpu_e2e's --commit reaches every bench record
    lat = records["latency"]["numbers"]
    assert lat["ms_per_output_token"] > 0 and lat["achieved_gbps"] > 0 and len(lat["latencies_s"]) == 3
    tp = records["throughput"]["numbers"]
    assert tp["total_prompt_tokens"] == 6 * 16 and tp["total_output_tokens"] == 6 * 16
    qwen = records["qwen"]["numbers"]
    assert 6 * 4 <= qwen["total_output_tokens"] <= 6 * 24 and 6 * 4 <= qwen["total_prompt_tokens"] <= 6 * 24
    base = records["baseline"]["numbers"]
    assert base["hf_output_tok_s"] > 0 and base["ratio"] == pytest.approx(
        base["treadle_output_tok_s"] / base["hf_output_tok_s"]
    )
    assert records["baseline"]["baseline"]["total_output_tokens"] == 4 * 8
    assert base["full_run_ratio"] == pytest.approx(tp["output_tokens_per_second"] / base["hf_output_tok_s"])
    assert 0 < records["cold_start"]["numbers"]["cold_start_s"] < 120
    levels = records["serve"]["numbers"]["levels"]
    assert [lv["max_concurrency"] for lv in levels] == [1, 4]
    for lv, prompts in zip(levels, (2, 8), strict=True):
        assert lv["completed"] == prompts and lv["failed"] == 0, lv
        assert lv["total_output_tokens"] == prompts * 8 and lv["mean_ttft_ms"] > 0
        assert lv["request_rate"] == "inf" and "itls" not in lv  # per-request lists go to the logs
        per_request = _strict_load(out / "logs" / f"serve_c{lv['max_concurrency']}.requests.json")
        assert len(per_request["itls"]) == len(per_request["ttfts"]) == prompts

    summary = _strict_load(out / "summary.json")
    assert summary["status"]["ceilings"].startswith("skipped") and summary["commit"] == "abc123"
    assert all(summary["status"][i] == "ok" for i in records if i != "cold_start")
    table = (out / "table.md").read_text().strip()
    assert proc.stdout.rstrip().endswith(table)  # the table is printed last
    assert table.splitlines()[0].startswith("| item | treadle | baseline / reference |")
    for label in (
        "ms/token",
        "out tok/s",
        "HF transformers",
        "cold start to READY",
        "serve 16/8 c=4",
        "Qwen3",
    ):
        assert label in table, label


def _strict_load(path: Path) -> dict:
    """json.loads that refuses NaN / Infinity: what strict JSON parsers (and jq) accept."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{path.name}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)
