"""Native op implementations against independent references (written differently from the natives)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from treadle_ir import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 1000])
def test_rms_norm_family(dtype: torch.dtype, hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    residual = torch.randn(5, hidden, generator=gen).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    eps = 1e-5
    ref = F.rms_norm(x.double(), (hidden,), eps=eps) * weight.double()
    torch.testing.assert_close(ops.rms_norm(x, weight, eps).double(), ref, **_tol(dtype))
    summed = (x + residual).to(dtype)
    out, res = ops.fused_add_rms_norm(x, residual, weight, eps)
    assert torch.equal(res, summed)
    torch.testing.assert_close(
        out.double(), F.rms_norm(summed.double(), (hidden,), eps=eps) * weight.double(), **_tol(dtype)
    )
    x2, r2 = x.clone(), residual.clone()
    assert ops.fused_add_rms_norm_(x2, r2, weight, eps) is None
    assert torch.equal(x2, out) and torch.equal(r2, res)
    gemma = F.rms_norm(x.double(), (hidden,), eps=eps) * (1 + weight.double())
    torch.testing.assert_close(ops.gemma_rms_norm(x, weight, eps).double(), gemma, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_activations(dtype: torch.dtype) -> None:
    x = torch.randn(3, 7, 2 * 40).to(dtype)
    a, b = x.double().chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(x).double(), a * torch.sigmoid(a) * b, **_tol(dtype))
    gelu = 0.5 * a * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (a + 0.044715 * a**3)))
    torch.testing.assert_close(ops.gelu_tanh_and_mul(x).double(), gelu * b, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("alpha", "limit"), [(1.702, 7.0), (1.0, 0.5)])
def test_swigluoai_and_mul(dtype: torch.dtype, alpha: float, limit: float) -> None:
    """gpt-oss's clamped SwiGLU against a float64 formula (logistic written out, clamps as where), with values on
    both sides of the limits."""
    x = (torch.randn(3, 5, 2 * 24) * 4 * limit).to(dtype)
    a, b = x.double().chunk(2, dim=-1)
    gate = torch.where(a > limit, torch.full_like(a, limit), a)
    up = torch.where(b.abs() > limit, b.sign() * limit, b)
    ref = (up + 1) * gate / (1 + torch.exp(-alpha * gate))
    torch.testing.assert_close(ops.swigluoai_and_mul(x, alpha, limit).double(), ref, **_tol(dtype))


def _rope_reference(
    x: torch.Tensor, positions: torch.Tensor, head_size: int, rot_dim: int, base: float, neox: bool
) -> torch.Tensor:
    """Complex-multiplication RoPE, per head, in float64."""
    T = x.shape[0]
    heads = x.double().reshape(T, -1, head_size).clone()
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angle = positions.double()[:, None] * inv_freq[None, :]  # [T, rot/2]
    rot = torch.polar(torch.ones_like(angle), angle)[:, None, :]
    part = heads[..., :rot_dim]
    if neox:
        z = torch.complex(part[..., : rot_dim // 2], part[..., rot_dim // 2 :]) * rot
        heads[..., :rot_dim] = torch.cat((z.real, z.imag), dim=-1)
    else:
        z = torch.complex(part[..., 0::2], part[..., 1::2]) * rot
        heads[..., :rot_dim] = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return heads.reshape(x.shape)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rot_dim", [32, 16])
def test_rotary_embedding(neox: bool, rot_dim: int) -> None:
    head_size, base, max_pos = 32, 10000.0, 64
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angle = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq
    cache = torch.cat((angle.cos(), angle.sin()), dim=-1).float()
    positions = torch.randint(0, max_pos, (6,))
    q = torch.randn(6, 4 * head_size)
    k = torch.randn(6, 2 * head_size)
    q0, k0 = q.clone(), k.clone()
    qo, ko = ops.rotary_embedding(positions, q, k, head_size, cache, neox)
    assert torch.equal(q, q0) and torch.equal(k, k0), "functional form must not modify its inputs"
    torch.testing.assert_close(
        qo.double(), _rope_reference(q, positions, head_size, rot_dim, base, neox), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        ko.double(), _rope_reference(k, positions, head_size, rot_dim, base, neox), atol=1e-5, rtol=1e-5
    )
    assert ops.rotary_embedding_(positions, q, k, head_size, cache, neox) is None
    assert torch.equal(q, qo) and torch.equal(k, ko)


def test_reshape_and_cache_skips_negative_slots() -> None:
    nkv, hs, nb, bs = 2, 8, 3, 4
    key, value = torch.randn(5, nkv, hs), torch.randn(5, nkv, hs)
    kc = torch.full((nb, bs, nkv, hs), 7.0)
    vc = torch.full((nb, bs, nkv, hs), 7.0)
    slots = torch.tensor([5, -1, 0, 11, -1])
    ops.reshape_and_cache(key, value, kc, vc, slots)
    expect_k = torch.full((nb * bs, nkv, hs), 7.0)
    expect_v = expect_k.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expect_k[s], expect_v[s] = key[t], value[t]
    assert torch.equal(kc.reshape(-1, nkv, hs), expect_k)
    assert torch.equal(vc.reshape(-1, nkv, hs), expect_v)
    before = kc.clone()
    ops.reshape_and_cache(key, value, kc, vc, torch.full((5,), -1))  # all padding: nothing changes
    assert torch.equal(kc, before)
    ops.reshape_and_cache(key[:0], value[:0], kc, vc, slots[:0])  # no tokens
    assert torch.equal(kc, before)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reshape_and_cache_fp8_rounds_and_saturates(dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    """An fp8 cache holds each value rounded to nearest even, clamped to the format's largest finite value."""
    nkv, hs, nb, bs = 2, 16, 3, 4
    gen = torch.Generator().manual_seed(3)
    key = (torch.randn(6, nkv, hs, generator=gen) * 200).to(dtype)  # many beyond e4m3's 448
    value = (torch.randn(6, nkv, hs, generator=gen) * 3e4).to(dtype)  # some beyond e5m2's 57344
    kc = torch.full((nb, bs, nkv, hs), float("nan")).to(cache_dtype)
    vc = kc.clone()
    slots = torch.tensor([5, -1, 0, 11, 2, -1])
    ops.reshape_and_cache(key, value, kc, vc, slots)
    fmax = torch.finfo(cache_dtype).max
    for cache, rows in ((kc, key), (vc, value)):
        flat = cache.view(-1, nkv, hs).float()
        for t, slot in enumerate(slots.tolist()):
            if slot >= 0:  # round-to-nearest-even of the clamped value, compared as floats (no NaN here)
                assert torch.equal(flat[slot], rows[t].float().clamp(-fmax, fmax).to(cache_dtype).float())
        written = set(slots[slots >= 0].tolist())
        untouched = [i for i in range(nb * bs) if i not in written]
        assert torch.isnan(flat[untouched]).all()
    assert float(kc.float().nan_to_num().abs().max()) == fmax or cache_dtype == torch.float8_e5m2
    assert not torch.isinf(vc.float()).any()


def test_custom_ops_exist_with_inferred_schema() -> None:
    schema = str(torch.ops.treadle_ir.fused_add_rms_norm_.default._schema)
    assert "Tensor(a0!) x" in schema and "Tensor(a1!) residual" in schema
    x, w = torch.randn(2, 16), torch.randn(16)
    torch.testing.assert_close(torch.ops.treadle_ir.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))
