"""The fused decode kernel (rotary + KV write + split-KV attention + in-kernel reduction) against the torch backend.

Both sides get the same unrotated q/k and a rotary table and run ``forward_rope``: the torch backend rotates with
the IR op's native spec, then writes the cache and attends (the reference); the Triton backend takes the fused
kernel for one-token batches. Compared: the attention output, the whole cache afterwards (the new slots hold the
rotated key and the value; nothing else changed: unused slots hold NaN and must stay NaN), and the split
counters, which must be back at zero. CPU: the interpreter at tiny sizes, with an H100's launch shapes (16 splits)
and forced split counts. GPU (``-m gpu``): Llama-3.1-8B's heads, bf16, batches 1-64 with contexts up to 4k.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attention_cases import FP8, Case, make_case

from treadle_kernels.attention import get_attn_backend
from treadle_kernels.attention.backend import Rope
from treadle_kernels.attention.triton_backend import TritonAttentionImpl
from treadle_kernels.attention.triton_decode import FUSED_MAX_PROGRAMS, fusable
from treadle_kernels.attention.triton_launch import H100_PROFILE

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
DECODES = [(17, 1), (0, 1), (40, 1), (63, 1), (64, 1), (3, 1)]  # context 0: the new token alone


def make_rope(case: Case, head_dim: int, is_neox: bool = True, rot_dim: int | None = None) -> Rope:
    md = case.metadata
    gen = torch.Generator().manual_seed(7)
    angles = torch.rand(md.max_seq_len + 8, (rot_dim or head_dim) // 2, generator=gen) * 6.3
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1).to(case.query.dtype).to(case.query.device)
    # each request's token sits at position seq_len - 1; padding rows at 0
    positions = torch.zeros(case.query.shape[0], dtype=torch.int64)
    positions[: md.num_reqs] = md.seq_lens_cpu.long() - 1
    return Rope(positions.to(case.query.device), cache, is_neox)


def run(name: str, case: Case, rope: Rope, nh: int, nkv: int, d: int, window: int | None = None,
        splits: int | None = None, h100: bool = False) -> tuple[torch.Tensor, torch.Tensor, object]:  # fmt: skip
    backend = get_attn_backend(name, case.query.device)
    builder = backend.get_builder_cls()(case.kv_cache.shape[2], case.query.device)
    impl = backend.get_impl_cls()(nh, d, d**-0.5, nkv, window)
    if isinstance(impl, TritonAttentionImpl):
        impl.force_num_splits = splits
        impl.device_profile = H100_PROFILE if h100 else None
        impl.fused_decode_max_programs = 1 << 30  # the fused kernel at every batch size here
    q, k, v = case.query.clone(), case.key.clone(), case.value.clone()
    out = torch.zeros_like(q)
    kv_cache = case.kv_cache.clone()
    md = builder.build(case.metadata)
    impl.forward_rope(rope, q, k, v, kv_cache, md, out)
    return out[: case.metadata.num_actual_tokens], kv_cache, md


def compare(case: Case, nh: int, nkv: int, d: int, dtype: torch.dtype, window: int | None = None,
            splits: int | None = None, h100: bool = False, rope: Rope | None = None,
            out_tol: float | None = None, cache_tol: tuple[float, float] | None = None) -> None:  # fmt: skip
    """``cache_tol`` (atol, rtol) for the cache afterwards; default: the output's tolerance."""
    rope = rope or make_rope(case, d)
    out, cache, md = run("triton", case, rope, nh, nkv, d, window, splits, h100)
    ref, ref_cache, _ = run("torch", case, rope, nh, nkv, d, window)
    tol = out_tol or TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # the rotated keys may differ by one rounding of the rotation (fused multiply-add); values are copies
    atol, rtol = cache_tol or (tol, tol)
    torch.testing.assert_close(cache.float(), ref_cache.float(), atol=atol, rtol=rtol, equal_nan=True)
    assert int(md.counters.abs().sum()) == 0, "split counters were not reset"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [None, 1, 4], ids=["cpu-launch", "splits1", "splits4"])
def test_decode_matches_torch(splits: int | None, dtype: torch.dtype) -> None:
    case = make_case(DECODES, 4, 2, 32, 16, dtype=dtype, device=DEVICE, seed=41, num_padding=2)
    compare(case, 4, 2, 32, dtype, splits=splits)


@pytest.mark.parametrize("cache", FP8)
@pytest.mark.parametrize("variant", ["splits1", "splits4", "saturated"])
def test_fp8_cache_matches_torch(variant: str, cache: str) -> None:
    """fp8 cache (unit scale): the new token is stored rounded, saturating, and scored as stored (as the unfused
    path reads it back). fp32 model: the interpreter's narrowing differs from round-to-nearest-even only on exact
    ties (never hit by fp32 rotations) and below e4m3's smallest normal (one subnormal step, 2^-9, allowed)."""
    case = make_case(DECODES, 4, 2, 32, 16, device=DEVICE, seed=49, num_padding=2, cache_dtype=FP8[cache])
    if variant == "saturated":  # new keys and values far past the format's largest finite value
        case.key.mul_(2 * torch.finfo(FP8[cache]).max)
        case.value.mul_(2 * torch.finfo(FP8[cache]).max)
    splits = 4 if variant == "splits4" else 1
    compare(case, 4, 2, 32, torch.float32, splits=splits, out_tol=2e-3, cache_tol=(2**-9, 0.0))


@pytest.mark.parametrize("window", [5, 16, 70])
def test_sliding_window_with_h100_splits(window: int) -> None:
    """16 splits of 64 keys (H100 launch): empty splits, windows inside one tile and across tiles."""
    reqs = [(0, 1), (20, 1), (100, 1), (1100, 1)]
    case = make_case(reqs, 2, 1, 32, 16, device=DEVICE, seed=42)
    compare(case, 2, 1, 32, torch.float32, window=window, h100=True)


def test_h100_splits_full_attention_g8() -> None:
    case = make_case([(200, 1), (1500, 1), (5, 1)], 8, 1, 32, 16, device=DEVICE, seed=43)
    compare(case, 8, 1, 32, torch.float32, h100=True)


def test_fused_path_is_taken_and_leaves_query_unrotated() -> None:
    case = make_case(DECODES, 4, 2, 32, 16, device=DEVICE, seed=44)
    rope = make_rope(case, 32)
    assert fusable(rope, case.metadata, 32, None, case.query, 2)
    backend = get_attn_backend("triton", case.query.device)
    impl = backend.get_impl_cls()(4, 32, 32**-0.5, 2)
    q = case.query.clone()
    impl.forward_rope(rope, q, case.key.clone(), case.value.clone(), case.kv_cache.clone(),
                      backend.get_builder_cls()(16, DEVICE).build(case.metadata), torch.zeros_like(q))  # fmt: skip
    assert torch.equal(q, case.query), "the fused kernel must not have rotated q in place (unfused path ran?)"


def test_batches_past_the_measured_size_run_unfused() -> None:
    """Above FUSED_MAX_PROGRAMS request x KV-head pairs the unified kernel serves decode (measured faster there)."""
    small = make_case([(5, 1)] * 16, 4, 2, 32, 16, device=DEVICE, seed=48)
    large = make_case([(5, 1)] * 17, 4, 2, 32, 16, device=DEVICE, seed=48)
    assert FUSED_MAX_PROGRAMS == 32
    assert fusable(make_rope(small, 32), small.metadata, 32, None, small.query, 2)
    assert not fusable(make_rope(large, 32), large.metadata, 32, None, large.query, 2)
    rope = make_rope(large, 32)
    backend = get_attn_backend("triton", large.query.device)
    impl = backend.get_impl_cls()(
        4, 32, 32**-0.5, 2
    )  # default policy: the rotary op, then the unified kernel
    q, out = large.query.clone(), torch.zeros_like(large.query)
    impl.forward_rope(rope, q, large.key.clone(), large.value.clone(), large.kv_cache.clone(),
                      backend.get_builder_cls()(16, DEVICE).build(large.metadata), out)  # fmt: skip
    assert not torch.equal(q, large.query), "the rotary op should have rotated q in place (fused kernel ran?)"
    ref, _, _ = run("torch", large, rope, 4, 2, 32)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", ["gptj", "partial", "prefill", "softcap", "env_off"])
def test_unfusable_calls_fall_back(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls outside the fused kernel's scope run rotary + the unified kernel, and still match the reference."""
    reqs = [(5, 3), (9, 1)] if variant == "prefill" else DECODES
    case = make_case(reqs, 4, 2, 32, 16, device=DEVICE, seed=45)
    rope = make_rope(case, 32, is_neox=variant != "gptj", rot_dim=16 if variant == "partial" else None)
    if variant == "prefill":  # positions of every query token
        pos = [p for (c, q) in reqs for p in range(c, c + q)]
        rope = Rope(torch.tensor(pos, device=DEVICE), rope.cos_sin_cache, True)
    if variant == "env_off":
        monkeypatch.setenv("TREADLE_FUSED_DECODE_ATTENTION", "0")
    cap = 5.0 if variant == "softcap" else None
    assert not fusable(rope, case.metadata, 32, cap, case.query, 2)
    if variant != "softcap":
        compare(case, 4, 2, 32, torch.float32, rope=rope)


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4, 64])
@pytest.mark.parametrize("window", [None, 1024])
def test_gpu_llama_heads(batch: int, window: int | None) -> None:
    gen = torch.Generator().manual_seed(batch)
    reqs = [(int(c), 1) for c in torch.randint(0, 4000, (batch,), generator=gen)]
    case = make_case(reqs, 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=46, num_padding=3)
    compare(case, 32, 8, 128, torch.bfloat16, window=window)
    compare(case, 32, 8, 128, torch.bfloat16, window=window, splits=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_repeated_launches_keep_counters_consistent() -> None:
    """Many launches on one set of counters (as 32 layers x many steps share them) stay exact."""
    case = make_case([(3000, 1), (17, 1)], 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=47)
    rope = make_rope(case, 128)
    ref, _, _ = run("torch", case, rope, 32, 8, 128)
    backend = get_attn_backend("triton", case.query.device)
    builder = backend.get_builder_cls()(16, "cuda")
    impl = backend.get_impl_cls()(32, 128, 128**-0.5, 8)
    md = builder.build(case.metadata)
    for _ in range(200):
        out = torch.zeros_like(case.query)
        impl.forward_rope(rope, case.query.clone(), case.key.clone(), case.value.clone(), case.kv_cache.clone(),
                          md, out)  # fmt: skip
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert int(md.counters.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("cache", FP8)
def test_gpu_fp8_cache(cache: str, batch: int) -> None:
    """bf16 model, fp8 cache: the cache afterwards may differ by one fp8 step where the two rotations round apart."""
    gen = torch.Generator().manual_seed(batch)
    reqs = [(int(c), 1) for c in torch.randint(0, 4000, (batch,), generator=gen)]
    case = make_case(reqs, 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=50, num_padding=3,
                     cache_dtype=FP8[cache])  # fmt: skip
    step = 0.125 if cache == "e4m3" else 0.25
    compare(case, 32, 8, 128, torch.bfloat16, cache_tol=(2**-9, step))
    compare(case, 32, 8, 128, torch.bfloat16, splits=8, cache_tol=(2**-9, step))
