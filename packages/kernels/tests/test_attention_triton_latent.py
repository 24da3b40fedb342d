"""The Triton backend's latent path (``triton_mla.py``): a shared key/value cache (MLA) attended with the head cut
into a power-of-two part and a tail, against the torch backend on two separate copies of the cache.

Head widths: 48 (32 + 16, the tiny DeepSeek configs), 80 (64 + 16), 288 (256 + 32) and 576 (512 + 64, the real
models'); head counts below, at and above one program's 16 (20 heads: two head blocks, the second part empty).
Batches mix fresh prefills, a chunked prefill on cached blocks and decodes; decodes alone also run split-KV
(forced, and from an H100's launch profile with its GPU tiles). Unused cache slots hold NaN, so a read past a
request's keys fails the comparison. On a GPU the same cases run at real sizes in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attention_cases import FP8, Case, make_case

from treadle_kernels.attention import get_attn_backend, triton_mla
from treadle_kernels.attention.triton_backend import TritonAttentionImpl
from treadle_kernels.attention.triton_launch import H100_PROFILE

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 16
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
BATCHES = {
    "mixed": [(0, 7), (20, 1), (9, 5), (40, 1), (33, 17)],
    "prefill": [(0, 19)],
    "decodes": [(30, 1), (50, 1), (0, 1), (95, 1)],
}


def attend(
    name: str, case: Case, nh: int, d: int, splits: int | None = None, h100: bool = False
) -> torch.Tensor:
    """One backend's output over a shared cache (torch: two copies of it) made from ``case``'s key cache."""
    latent = case.kv_cache[0].clone()  # [num_blocks, block_size, 1, d], NaN where unwritten
    cache = (
        latent.unsqueeze(0).expand(2, *latent.shape) if name == "triton" else torch.stack([latent, latent])
    )
    backend = get_attn_backend(name, case.query.device)
    impl = backend.get_impl_cls()(nh, d, d**-0.5, 1)
    if name == "triton":
        assert isinstance(impl, TritonAttentionImpl)
        impl.force_num_splits = splits
        impl.device_profile = H100_PROFILE if h100 else None
    builder = backend.get_builder_cls()(BLOCK, case.query.device)
    out = torch.zeros_like(case.query)
    impl.forward(
        case.query, case.key, case.key, cache, builder.build(case.metadata), out
    )  # the key is the value
    return out[: case.metadata.num_actual_tokens]


def compare(case: Case, nh: int, d: int, dtype: torch.dtype, **kwargs: object) -> None:
    ref = attend("torch", case, nh, d)
    out = attend("triton", case, nh, d, **kwargs)  # type: ignore[arg-type]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_head_split() -> None:
    assert triton_mla.split_head(576) == (512, 64, 64)
    assert triton_mla.split_head(48) == (32, 16, 16)
    assert triton_mla.split_head(288) == (256, 32, 32)
    assert triton_mla.split_head(72) == (64, 8, 16)
    assert triton_mla.split_head(128) == (128, 0, 16)


@pytest.mark.parametrize(("nh", "d"), [(4, 48), (16, 80), (20, 48), (2, 72), (3, 576)])
@pytest.mark.parametrize("batch", ["mixed", "prefill"])
def test_latent_path_matches_torch(batch: str, nh: int, d: int) -> None:
    case = make_case(BATCHES[batch], nh, 1, d, BLOCK, device=DEVICE, seed=nh * d, num_padding=1)
    compare(case, nh, d, torch.float32)


@pytest.mark.parametrize("splits", [2, 8])
@pytest.mark.parametrize(("nh", "d"), [(4, 48), (20, 80)])
def test_split_decodes(splits: int, nh: int, d: int) -> None:
    case = make_case(BATCHES["decodes"], nh, 1, d, BLOCK, device=DEVICE, seed=splits + d, num_padding=2)
    compare(case, nh, d, torch.float32, splits=splits)


@pytest.mark.parametrize("cache", [None, "e4m3"])
@pytest.mark.parametrize("batch", ["mixed", "decodes"])
def test_h100_tiles(batch: str, cache: str | None) -> None:
    """An H100's launches (GPU key tiles and warps; decodes split to fill 132 SMs; a mixed batch launched twice),
    with a bf16 and an fp8 cache (which take their own tiles)."""
    cfg, heads = triton_mla.latent_config(H100_PROFILE, 4, 1, 16, None)
    assert (cfg.block_m, heads) == (16, 16) and cfg.num_splits > 1
    dtype = torch.float32 if cache is None else torch.bfloat16
    case = make_case(BATCHES[batch], 16, 1, 288, BLOCK, dtype=dtype, device=DEVICE, seed=7, num_padding=1,
                     cache_dtype=None if cache is None else FP8[cache])  # fmt: skip
    compare(case, 16, 288, dtype, h100=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit(dtype: torch.dtype) -> None:
    case = make_case(BATCHES["mixed"], 4, 1, 48, BLOCK, dtype=dtype, device=DEVICE, seed=5, num_padding=1)
    compare(case, 4, 48, dtype)


@pytest.mark.parametrize("cache", ["e4m3", "e5m2"])
def test_fp8_cache(cache: str) -> None:
    case = make_case(BATCHES["mixed"], 4, 1, 48, BLOCK, dtype=torch.bfloat16, device=DEVICE, seed=9,
                     num_padding=1, cache_dtype=FP8[cache])  # fmt: skip
    compare(case, 4, 48, torch.bfloat16, splits=4)


def test_not_causal() -> None:
    case = make_case(BATCHES["mixed"], 4, 1, 48, BLOCK, device=DEVICE, seed=3, causal=False)
    compare(case, 4, 48, torch.float32)


def test_applies_only_to_a_plain_shared_cache() -> None:
    latent = torch.zeros(4, BLOCK, 1, 48)
    shared = latent.unsqueeze(0).expand(2, *latent.shape)
    assert triton_mla.applies(shared, None, None, None)
    assert not triton_mla.applies(torch.stack([latent, latent]), None, None, None)
    assert not triton_mla.applies(shared, 8, None, None)
    assert not triton_mla.applies(shared, None, 30.0, None)
    assert not triton_mla.applies(shared, None, None, torch.zeros(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(("nh", "cache"), [(16, None), (128, None), (16, "e4m3")])
@pytest.mark.parametrize("batch", ["mixed", "decodes", "prefill"])
def test_gpu_real_sizes(batch: str, nh: int, cache: str | None) -> None:
    requests = {
        "mixed": [(0, 300), (1000, 1), (517, 64), (2000, 1), (31, 1)] + [(100 * i, 1) for i in range(1, 40)],
        "decodes": [(64 * i + 3, 1) for i in range(1, 65)],
        "prefill": [(0, 1500), (0, 257)],
    }[batch]
    case = make_case(requests, nh, 1, 576, BLOCK, dtype=torch.bfloat16, device="cuda", seed=nh, num_padding=3,
                     cache_dtype=None if cache is None else FP8[cache])  # fmt: skip
    compare(case, nh, 576, torch.bfloat16)
