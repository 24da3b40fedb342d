"""The unified Triton paged-attention kernel against the torch reference backend.

CPU: under TRITON_INTERPRET=1 at tiny sizes. GPU (``-m gpu``): real shapes (head_dim 128, 32/8 heads, block 16,
contexts up to 4k) in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attention_cases import FP8, dense_reference, make_case

from treadle_kernels.attention import get_attn_backend

pytest.importorskip("triton")

MIXED = [(0, 9), (13, 5), (20, 1), (5, 1), (0, 1), (29, 3)]  # prefill, chunked prefill, decodes
DECODE = [(17, 1), (3, 1), (40, 1), (0, 1)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def run(name, case, nh, nkv, d, window=None, cap=None, splits=None):
    backend = get_attn_backend(name, case.query.device)
    builder = backend.get_builder_cls()(case.kv_cache.shape[2], case.query.device)
    impl = backend.get_impl_cls()(nh, d, d**-0.5, nkv, window, cap)
    if splits is not None:
        impl.force_num_splits = splits
    out = torch.zeros_like(case.query)
    kv_cache = case.kv_cache.clone()
    impl.forward(case.query, case.key, case.value, kv_cache, builder.build(case.metadata), out)
    return out[: case.metadata.num_actual_tokens]


def compare(case, nh, nkv, d, dtype, window=None, cap=None, splits=None):
    out = run("triton", case, nh, nkv, d, window, cap, splits)
    ref = run("torch", case, nh, nkv, d, window, cap)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("window", "cap"), [(None, None), (7, None), (None, 4.0)], ids=["full", "window", "softcap"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_matches_torch(window, cap, dtype):
    case = make_case(MIXED, 4, 2, 16, 4, dtype=dtype, device=DEVICE, seed=11, num_padding=2)
    compare(case, 4, 2, 16, dtype, window, cap)


@pytest.mark.parametrize(
    ("nh", "nkv", "d"), [(6, 2, 24), (2, 2, 32), (8, 1, 16)], ids=["g3-d24", "mha", "g8"]
)
def test_head_layouts_fp16(nh, nkv, d):
    case = make_case(MIXED, nh, nkv, d, 8, dtype=torch.float16, device=DEVICE, seed=12)
    compare(case, nh, nkv, d, torch.float16, window=10)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_split_kv(splits):
    case = make_case(DECODE, 4, 2, 16, 4, device=DEVICE, seed=13)
    compare(case, 4, 2, 16, torch.float32, window=None if splits == 1 else 9, splits=splits)


def test_idle_request_and_padding():
    """A request with no query tokens this step (and padded inputs) leaves the others' outputs intact."""
    case = make_case([(6, 3), (10, 0), (0, 1)], 4, 2, 16, 4, device=DEVICE, seed=15, num_padding=3)
    compare(case, 4, 2, 16, torch.float32)


def test_matches_dense_reference_directly():
    case = make_case(MIXED, 4, 2, 16, 4, device=DEVICE, seed=14)
    out = run("triton", case, 4, 2, 16, window=5, cap=3.0)
    ref = dense_reference(case, 16**-0.5, 5, 3.0)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cache", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_cache_matches_torch(dtype, cache):
    """An fp8 cache (unit scale): prefill, chunked prefill on cached blocks, decodes, padding; split-KV decode."""
    case = make_case(
        MIXED, 4, 2, 16, 4, dtype=dtype, device=DEVICE, seed=16, num_padding=2, cache_dtype=FP8[cache]
    )
    compare(case, 4, 2, 16, dtype, window=7)
    decode = make_case(DECODE, 4, 2, 16, 4, dtype=dtype, device=DEVICE, seed=17, cache_dtype=FP8[cache])
    compare(decode, 4, 2, 16, dtype, splits=4)
    big_pages = make_case(MIXED, 4, 2, 16, 32, dtype=dtype, device=DEVICE, seed=18, cache_dtype=FP8[cache])
    compare(big_pages, 4, 2, 16, dtype)  # pages longer than a key tile
    if dtype == torch.float32:  # the case's K/V are exact fp8 values: the dense reference holds as it is
        out = run("triton", case, 4, 2, 16, window=7)
        torch.testing.assert_close(
            out.double().cpu(), dense_reference(case, 16**-0.5, 7), atol=2e-5, rtol=2e-5
        )


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("cache", [None, "e4m3"])
def test_offset_widths(monkeypatch, narrow, cache):
    """32- and 64-bit cache offsets give the same attention (TREADLE_ATTN_NARROW_OFFSETS=0: always 64 bits)."""
    from treadle_kernels.attention import triton_launch as tb

    monkeypatch.setattr(tb, "_NARROW_OFFSETS", narrow)
    cache_dtype = FP8[cache] if cache else None
    case = make_case(MIXED, 4, 2, 16, 4, dtype=torch.bfloat16, device=DEVICE, seed=26, num_padding=2,
                     cache_dtype=cache_dtype)  # fmt: skip
    compare(case, 4, 2, 16, torch.bfloat16, window=7)
    decode = make_case(
        DECODE, 4, 2, 16, 4, dtype=torch.bfloat16, device=DEVICE, seed=27, cache_dtype=cache_dtype
    )
    compare(decode, 4, 2, 16, torch.bfloat16, splits=4)


def test_masking_every_tile_gives_the_same_attention(monkeypatch):
    """TREADLE_ATTN_MASK_ALL_TILES=1 (every key tile through the masked loop, the measurement baseline) matches the
    reference as the default split into unmasked and masked tiles does."""
    from treadle_kernels.attention import triton_launch as tb

    monkeypatch.setattr(tb, "_MASK_ALL_TILES", True)
    case = make_case(MIXED, 4, 2, 16, 4, dtype=torch.float32, device=DEVICE, seed=28, num_padding=2)
    compare(case, 4, 2, 16, torch.float32)


class _View:
    """The shape and strides of a cache view, without its memory."""

    def __init__(self, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
        self.shape, self._strides = shape, strides

    def stride(self) -> tuple[int, ...]:
        return self._strides

    def numel(self) -> int:
        return int(torch.tensor(self.shape).prod())


def test_wide_offsets_past_two_to_the_31(monkeypatch) -> None:
    from treadle_kernels.attention import triton_launch as tb

    def contiguous(n: int) -> _View:  # [blocks, 16, 8, 128]
        return _View((n // 16384, 16, 8, 128), (16384, 1024, 128, 1))

    small, big = contiguous(2**31 - 16384), contiguous(2**31)
    strided = _View((2, 16, 8, 128), (2**30, 1024, 128, 1))  # two blocks 2**30 apart: offsets past 2**30 only
    far = _View((3, 16, 8, 128), (2**30, 1024, 128, 1))  # the third block starts at 2**31
    monkeypatch.setattr(tb, "_NARROW_OFFSETS", True)
    assert not tb.wide_offsets(small, small) and not tb.wide_offsets(strided, small)
    assert tb.wide_offsets(small, big) and tb.wide_offsets(big, small)
    assert far.numel() < small.numel() and tb.wide_offsets(far, small), "a small view reaching past 2**31"
    monkeypatch.setattr(tb, "_NARROW_OFFSETS", False)  # 64 bits whatever the size
    assert tb.wide_offsets(small, small) and tb.wide_offsets(strided, small)
    monkeypatch.setattr(tb, "_NARROW_OFFSETS", None)  # the default: 32 bits for any cache that allows them
    assert not tb.wide_offsets(small, small) and tb.wide_offsets(small, big) and tb.wide_offsets(far, small)


# ---------------------------------------------------------------------------------------------------- GPU


def _gpu_batch(kind: str) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(5)
    if kind == "decode":
        return [(int(c), 1) for c in torch.randint(1, 4096, (48,), generator=gen)]
    if kind == "prefill":
        return [(0, 1500), (0, 700), (0, 33)]
    return [
        (0, 900),
        (2000, 512),
        (1024, 17),
        *[(int(c), 1) for c in torch.randint(1, 4000, (40,), generator=gen)],
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize(("window", "cap"), [(None, None), (1024, None), (None, 30.0)])
def test_gpu_real_sizes(kind, window, cap):
    case = make_case(_gpu_batch(kind), 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=21)
    compare(case, 32, 8, 128, torch.bfloat16, window, cap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("nh", "nkv", "d"), [(9, 3, 64), (8, 4, 256)], ids=["smollm2", "gemma3"])
def test_gpu_other_head_shapes(nh, nkv, d):
    case = make_case(_gpu_batch("mixed"), nh, nkv, d, 16, dtype=torch.bfloat16, device="cuda", seed=23)
    compare(case, nh, nkv, d, torch.bfloat16, window=512, cap=50.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4, 64])
def test_gpu_split_kv_decode(batch):
    reqs = [(4000 - 7 * i, 1) for i in range(batch)]
    case = make_case(reqs, 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=22)
    compare(case, 32, 8, 128, torch.bfloat16)
    compare(case, 32, 8, 128, torch.bfloat16, splits=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("cache", FP8)
@pytest.mark.parametrize(("widen", "warps", "narrow"), [(0, 4, 0), (1, 4, 1), (2, 4, 1), (1, 8, 1)])
def test_gpu_fp8_cache(monkeypatch, cache, kind, widen, warps, narrow):
    """fp8 tiles widened in the dot or after their load (FP8_WIDEN; inline assembly, so GPU only), at 4 and 8
    warps, 64- and 32-bit offsets."""
    from treadle_kernels.attention import triton_launch as tb

    monkeypatch.setattr(tb, "_FP8_WIDEN", widen)
    monkeypatch.setattr(tb, "_FP8_WARPS", warps)
    monkeypatch.setattr(tb, "_NARROW_OFFSETS", narrow)
    case = make_case(_gpu_batch(kind), 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", seed=24,
                     cache_dtype=FP8[cache])  # fmt: skip
    compare(case, 32, 8, 128, torch.bfloat16)
    if kind == "decode":
        compare(case, 32, 8, 128, torch.bfloat16, splits=8)
