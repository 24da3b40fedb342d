"""benchmarks/roofline.py against hand-counted weights of the real configs in benchmarks/configs/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from roofline import latency_roofline_ms, shapes, throughput_roofline  # noqa: E402


def test_llama_8b_decode_reads_every_weight_but_the_embedding() -> None:
    s = shapes(ROOT / "benchmarks" / "configs" / "llama-3.1-8b")
    # per layer: q 4096x4096, k and v 4096x1024, o 4096x4096, gate/up/down 3 x 4096x14336, two norms
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336 + 2 * 4096
    expected = 32 * layer + 128256 * 4096 + 4096
    assert s.decode_weights(1) == expected == s.decode_weights(256)  # dense: batch does not change it
    assert expected * 2 == 15_009_849_344  # bytes in bf16, as the H200 latency record says
    assert latency_roofline_ms(s, 3000.0) == pytest.approx(expected * 2 / 3e12 * 1e3)


def test_qwen3_30b_a3b_active_weights_and_touched_experts() -> None:
    s = shapes(ROOT / "benchmarks" / "configs" / "qwen3-30b-a3b")
    attn = 2048 * 4096 * 2 + 2048 * 512 * 2 + 2 * 128  # q, o, k, v, q/k norms
    dense = attn + 2048 * 128 + 2 * 2048  # + router + the two layer norms
    expert = 3 * 2048 * 768
    lm_head = 151936 * 2048 + 2048
    assert s.active_per_token == 48 * (dense + 8 * expert) + lm_head
    assert s.decode_weights(1) == pytest.approx(s.active_per_token)  # batch 1 touches exactly top-k experts
    assert s.active_per_token * 2 / 1e9 == pytest.approx(6.08, abs=0.01)  # the "~6 GB"
    # a large batch touches nearly every expert: 128 * (1 - (1 - 8/128)^256) ~ 128
    assert s.decode_weights(256) == pytest.approx(48 * (dense + 128 * expert) + lm_head, rel=1e-3)


def test_throughput_roofline_is_bounded_by_kv_capacity() -> None:
    s = shapes(ROOT / "benchmarks" / "configs" / "llama-3.1-8b")
    small = throughput_roofline(s, 3000.0, 700.0, 1000, 1024, 1024, kv_capacity_tokens=100 * 2048)
    large = throughput_roofline(s, 3000.0, 700.0, 1000, 1024, 1024, kv_capacity_tokens=10**7)
    assert small["roofline_concurrency"] == 100 and large["roofline_concurrency"] == 256
    assert small["roofline_output_tok_s"] < large["roofline_output_tok_s"]
    assert small["roofline_prefill_s"] == pytest.approx(2 * s.active_per_token * 1000 * 1024 / 700e12)


def test_serial_bound_counts_compute_bound_gemms_at_large_batch() -> None:
    s = shapes(ROOT / "benchmarks" / "configs" / "llama-3.1-8b")
    r = throughput_roofline(s, 4000.0, 800.0, 1000, 1024, 1024, kv_capacity_tokens=10**7)
    steps = 1000 * 1024 / 256
    gemm = max(s.decode_weights(256) * 2 / 4e12, 2 * s.active_per_token * 256 / 800e12)
    assert gemm == 2 * s.active_per_token * 256 / 800e12  # 256 tokens: the FLOPs outlast the weight reads
    kv = 256 * (1024 + 512) * s.kv_bytes_per_token / 4e12
    assert r["serial_bound_decode_s"] == pytest.approx(steps * (gemm + kv))
    assert r["serial_bound_output_tok_s"] < r["roofline_output_tok_s"]
    # batch 1: the weight reads outlast the FLOPs, so both bounds agree
    one = throughput_roofline(s, 4000.0, 800.0, 1, 1024, 1024, kv_capacity_tokens=10**7)
    assert one["serial_bound_decode_s"] == pytest.approx(one["roofline_decode_s"])


def test_fp8_cache_halves_the_kv_bytes_and_raises_the_serial_bound() -> None:
    config = ROOT / "benchmarks" / "configs" / "llama-3.1-8b"
    bf16, fp8 = shapes(config), shapes(config, kv_dtype_bytes=1)
    assert (
        bf16.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 2 * fp8.kv_bytes_per_token
    )  # (k, v) x layers x nkv x d
    assert fp8.decode_weights(1) == bf16.decode_weights(1)  # weights stay in the model dtype
    a = throughput_roofline(bf16, 4279.0, 790.0, 1000, 1024, 1024, kv_capacity_tokens=880_752)
    b = throughput_roofline(
        fp8, 4279.0, 790.0, 1000, 1024, 1024, kv_capacity_tokens=1_742_416, max_num_seqs=512
    )
    assert (
        b["roofline_concurrency"] == 512 and b["serial_bound_output_tok_s"] > a["serial_bound_output_tok_s"]
    )
