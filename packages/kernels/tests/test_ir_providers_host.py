"""The ``cpu`` provider of the KV-cache write and the in-place rotary embedding (ops/host.py) against their native
specs, bit for bit, on fresh random inputs: padding slots, int32 indices, fp8 caches, strided q/k slices of a fused
qkv buffer, neox and gpt-j pairs, partial rotary dims, 2-D and 3-D heads; what it cannot serve falls back to native;
on CPU it is the default."""

from __future__ import annotations

import pytest
import torch

import treadle_kernels  # noqa: F401  (registers the providers)
from treadle_ir import ops
from treadle_ir.platforms import Platform
from treadle_kernels.ops import host

CACHE = ops.reshape_and_cache.providers[host.PROVIDER]
ROTARY = ops.rotary_embedding_.providers[host.PROVIDER]


def _cache_args(
    num_tokens: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    padding: int,
    slot_dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    kv_heads, head_size, num_blocks, block_size = 3, 8, 6, 4
    width = (4 + 2 * kv_heads) * head_size
    qkv = torch.randn(num_tokens, width, generator=gen).to(dtype) * 300  # large enough that fp8 saturates
    k, v = qkv[:, 4 * head_size :].unflatten(-1, (2 * kv_heads, head_size)).split(kv_heads, dim=1)  # strided
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:padding]] = -1
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_size, generator=gen).to(cache_dtype)
    return k, v, cache[0], cache[1], slots.to(slot_dtype)


@pytest.mark.parametrize(
    "cache_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
)
@pytest.mark.parametrize("num_tokens, padding", [(0, 0), (1, 0), (9, 0), (9, 3), (5, 5)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_cache_write_matches_native(
    cache_dtype: torch.dtype, num_tokens: int, padding: int, slot_dtype: torch.dtype
) -> None:
    dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    args = _cache_args(num_tokens, dtype, cache_dtype, padding, slot_dtype, seed=num_tokens * 7 + padding)
    assert CACHE.args_reason(*args) is None
    expected = [t.clone() for t in args]
    ops.reshape_and_cache.native(*expected[:4], expected[4].long())  # the spec's slots are int64
    CACHE.impl(*args)
    for got, want in zip(args[2:4], expected[2:4], strict=True):  # bit for bit, padding rows skipped
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def _rotary_args(
    num_tokens: int, dtype: torch.dtype, rot_dim: int, three_d: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_size, max_pos = 4, 2, 16, 64
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_size, generator=gen).to(dtype)
    q, k = qkv[:, : heads * head_size], qkv[:, heads * head_size : (heads + kv_heads) * head_size]
    if three_d:
        q, k = q.unflatten(-1, (heads, head_size)), k.unflatten(-1, (kv_heads, head_size))
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen)
    cos_sin = torch.randn(max_pos, rot_dim, generator=gen)
    return positions, q, k, cos_sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [16, 8])
@pytest.mark.parametrize("num_tokens, three_d", [(1, False), (7, False), (5, True), (0, False)])
def test_rotary_in_place_matches_native(
    dtype: torch.dtype, is_neox: bool, rot_dim: int, num_tokens: int, three_d: bool
) -> None:
    positions, q, k, cos_sin = _rotary_args(num_tokens, dtype, rot_dim, three_d, seed=rot_dim + num_tokens)
    q_ref, k_ref = q.clone(), k.clone()
    for positions_dtype in (torch.int64, torch.int32):
        assert ROTARY.args_reason(positions.to(positions_dtype), q, k, 16, cos_sin, is_neox) is None
    ops.rotary_embedding_.native(positions, q_ref, k_ref, 16, cos_sin, is_neox)
    ROTARY.impl(positions.to(torch.int32), q, k, 16, cos_sin, is_neox)  # in place, through the strided views
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    if num_tokens:  # the rotation did something (a provider that returned early would pass the line above)
        fresh_q = _rotary_args(num_tokens, dtype, rot_dim, three_d, seed=rot_dim + num_tokens)[1]
        assert not torch.equal(q, fresh_q)


def test_what_it_cannot_serve_falls_back_to_native() -> None:
    positions, q, k, cos_sin = _rotary_args(3, torch.float32, 16, False, seed=0)
    assert "positions" in str(ROTARY.args_reason(positions.float(), q, k, 16, cos_sin, True))
    assert "rot_dim" in str(ROTARY.args_reason(positions, q, k, 16, torch.randn(64, 18), True))
    assert "unit-stride" in str(ROTARY.args_reason(positions, q.t().contiguous().t(), k, 16, cos_sin, True))
    assert "not [T" in str(ROTARY.args_reason(positions, q[:, :24], k, 16, cos_sin, True))
    k_, v_, kc, vc, slots = _cache_args(4, torch.float32, torch.float32, 0, torch.int64, seed=1)
    assert "int64 or int32" in str(CACHE.args_reason(k_, v_, kc, vc, slots.float()))
    assert "contiguous" in str(CACHE.args_reason(k_, v_, kc.transpose(0, 1), vc.transpose(0, 1), slots))
    assert "do not match" in str(CACHE.args_reason(k_, v_, kc[..., :4], vc[..., :4], slots))
    assert host.supported(Platform(kind="cuda")) is not True
    if torch.cuda.is_available():
        assert "not in host memory" in str(ROTARY.args_reason(positions.cuda(), q, k, 16, cos_sin, True))


def test_it_is_the_default_on_cpu() -> None:
    positions, q, k, cos_sin = _rotary_args(2, torch.float32, 16, False, seed=3)
    assert Platform(kind="cpu").default_priority[:2] == ("onednn", "cpu")
    if torch.cuda.is_available():
        pytest.skip("the process platform is CUDA: the CPU default is checked above, not by dispatch")
    assert ops.rotary_embedding_.select(positions, q, k, 16, cos_sin, True).name == host.PROVIDER
    cache_args = _cache_args(2, torch.float32, torch.float32, 0, torch.int64, 0)
    assert ops.reshape_and_cache.select(*cache_args).name == host.PROVIDER
