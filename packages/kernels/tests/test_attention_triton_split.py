"""Split-KV (flash-decoding) path of the Triton kernel with an H100's launch shapes, against the torch backend.

The kernel runs under the CPU interpreter, but its launch configuration comes from ``H100_PROFILE`` (132 SMs, 64-row
prefill tiles, 64-key blocks), so small batches get 16 KV splits exactly as on the GPU. Cases: short prefills alone
(a single 5-token one, and 1-20 tokens of differing lengths, which a real batch launches twice: short queries in
16-row tiles without splits, the longer ones in 64-row tiles with splits), short prefills mixed with decodes and a
chunked prefill whose query straddles a key tile (splits fully masked for some rows), decodes whose context is far
shorter than ``splits x block_n`` (empty splits) next to one longer than it, and sliding windows. Unused cache slots
hold NaN, so reading past a request's keys or reducing unwritten scratch rows fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attention_cases import Case, make_case

from treadle_kernels.attention import get_attn_backend
from treadle_kernels.attention import triton_launch as tb
from treadle_kernels.attention.triton_backend import TritonAttentionImpl
from treadle_kernels.attention.triton_launch import H100_PROFILE, choose_launch_config

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NH, NKV, D, BLOCK = 2, 1, 16, 16  # G = 2: same tile shapes as 4/2 heads, half the interpreted programs
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
BATCHES = {
    "prefill5": [(0, 5)],
    "prefills": [(0, 5), (0, 9), (0, 17), (0, 3), (0, 11), (0, 1), (0, 20)],
    "mixed": [(0, 13), (40, 1), (0, 6), (50, 30), (3, 1), (7, 12), (100, 1)],
    "short_decodes": [(0, 1), (63, 1), (200, 1), (1100, 1)],  # 16 splits x 64 keys = 1024
}


def run(name: str, case: Case, window: int | None, h100: bool = False) -> torch.Tensor:
    backend = get_attn_backend(name, case.query.device)
    builder = backend.get_builder_cls()(BLOCK, case.query.device)
    impl = backend.get_impl_cls()(NH, D, D**-0.5, NKV, window)
    if h100:
        assert isinstance(impl, TritonAttentionImpl)
        impl.device_profile = H100_PROFILE
    out = torch.zeros_like(case.query)
    impl.forward(case.query, case.key, case.value, case.kv_cache.clone(), builder.build(case.metadata), out)
    return out[: case.metadata.num_actual_tokens]


@pytest.mark.parametrize(
    ("batch", "window", "dtype"),
    [
        ("prefill5", None, torch.float32),
        ("prefills", None, torch.bfloat16),
        ("mixed", 7, torch.float32),
        ("short_decodes", None, torch.float32),
        ("short_decodes", 70, torch.bfloat16),
    ],
    ids=["prefill5", "prefills-bf16", "mixed-window", "short_decodes", "short_decodes-window-bf16"],
)
def test_h100_launch_matches_torch(batch: str, window: int | None, dtype: torch.dtype) -> None:
    case = make_case(BATCHES[batch], NH, NKV, D, BLOCK, dtype=dtype, device=DEVICE, seed=31, num_padding=2)
    out = run("triton", case, window, h100=True)
    ref = run("torch", case, window)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("batch", ["mixed", "short_decodes"])
def test_h100_launch_fp8_cache_matches_torch(batch: str) -> None:
    """An fp8 cache's GPU launches (their own key tile) under the interpreter, against the reference."""
    case = make_case(BATCHES[batch], NH, NKV, D, BLOCK, device=DEVICE, seed=32, num_padding=2,
                     cache_dtype=torch.float8_e4m3fn)  # fmt: skip
    out = run("triton", case, 9, h100=True)
    torch.testing.assert_close(out, run("torch", case, 9), atol=2e-5, rtol=2e-5)


def test_h100_split_counts_cover_the_cases() -> None:
    """The cases above really take the split path, and the split count depends on the batch size only."""
    group = NH // NKV
    decode = choose_launch_config(H100_PROFILE, 4, 1, NKV, group)
    assert (decode.num_splits, decode.block_n) == (16, 64)
    prefill = choose_launch_config(H100_PROFILE, 7, 20, NKV, group)  # long launch of "prefills" and "mixed"
    assert (prefill.block_m, prefill.num_splits) == (64, 16)
    assert choose_launch_config(H100_PROFILE, 1, 5, NKV, group).num_splits == 16  # "prefill5": one launch
    big = choose_launch_config(H100_PROFILE, 256, 1, 8, 4)
    assert big.num_splits == 1  # 2048 programs already fill 132 SMs
    assert choose_launch_config(H100_PROFILE, 256, 1, 8, 4, fp8_cache=True).block_n == tb._FP8_BLOCK_N


def test_fp8_widening_only_where_the_device_converts(monkeypatch) -> None:
    """TREADLE_ATTN_FP8_WIDEN reaches an fp8 launch on a device with fp8 conversions (sm_89+), never a 16-bit
    cache or an older device."""
    monkeypatch.setattr(tb, "_FP8_WIDEN", 2)
    assert choose_launch_config(H100_PROFILE, 256, 1, 8, 4, fp8_cache=True).fp8_widen == 2
    assert choose_launch_config(H100_PROFILE, 256, 1, 8, 4).fp8_widen == 0
    ampere = tb.DeviceProfile(gpu_tiles=True, num_sms=108)
    assert choose_launch_config(ampere, 256, 1, 8, 4, fp8_cache=True).fp8_widen == 0
