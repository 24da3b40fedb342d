"""The torch reference backend against a dense float64 attention, plus backend selection."""

from __future__ import annotations

import pytest
import torch
from attention_cases import dense_reference, make_case

from treadle_kernels.attention import AttentionMetadata, get_attn_backend

MIXED = [(0, 7), (13, 5), (20, 1), (5, 1), (0, 1), (31, 3)]  # prefill, chunked prefill, decodes


def run_backend(name: str, case, num_heads, head_dim, num_kv_heads, window=None, cap=None, scale=None):
    backend = get_attn_backend(name, case.query.device)
    builder = backend.get_builder_cls()(case.kv_cache.shape[2], case.query.device)
    scale = head_dim**-0.5 if scale is None else scale
    impl = backend.get_impl_cls()(num_heads, head_dim, scale, num_kv_heads, window, cap)
    output = torch.zeros_like(case.query)
    impl.forward(case.query, case.key, case.value, case.kv_cache, builder.build(case.metadata), output)
    return output


@pytest.mark.parametrize(
    ("window", "cap", "causal"),
    [(None, None, True), (6, None, True), (None, 5.0, True), (3, 2.0, True), (None, None, False)],
)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (3, 3), (6, 1)])
def test_torch_backend_matches_dense(window, cap, causal, num_heads, num_kv_heads):
    case = make_case(MIXED, num_heads, num_kv_heads, 16, 4, seed=1, num_padding=2, causal=causal)
    out = run_backend("torch", case, num_heads, 16, num_kv_heads, window, cap, scale=0.3)
    ref = dense_reference(case, 0.3, window, cap)
    n = case.metadata.num_actual_tokens
    torch.testing.assert_close(out[:n].double(), ref, atol=1e-5, rtol=1e-5)


def test_torch_backend_writes_new_kv_through_slot_mapping():
    case = make_case(MIXED, 4, 2, 16, 4, seed=2, num_padding=3)
    run_backend("torch", case, 4, 16, 2)
    md = case.metadata
    for i, (k, v) in enumerate(zip(case.full_keys, case.full_values, strict=True)):
        seq_len = k.shape[0]
        pos = torch.arange(seq_len)
        slot = md.block_table[i, pos // 4].long() * 4 + pos % 4
        torch.testing.assert_close(case.kv_cache[0].view(-1, 2, 16)[slot], k)
        torch.testing.assert_close(case.kv_cache[1].view(-1, 2, 16)[slot], v)


def test_chunked_prefill_equals_one_shot_prefill():
    """Prefilling 23 tokens in chunks of 8 over the same cache gives the one-shot outputs."""
    gen = torch.Generator().manual_seed(3)
    nh, nkv, d, bs, total = 4, 2, 16, 4, 23
    q = torch.randn(total, nh, d, generator=gen)
    k = torch.randn(total, nkv, d, generator=gen)
    v = torch.randn(total, nkv, d, generator=gen)
    block_table = torch.tensor([[5, 1, 7, 0, 3, 2]], dtype=torch.int32)
    impl = get_attn_backend("torch", "cpu").get_impl_cls()(nh, d, d**-0.5, nkv, sliding_window=5)

    def step(kv_cache, start, end):
        pos = torch.arange(start, end)
        qsl = torch.tensor([0, end - start], dtype=torch.int32)
        sl = torch.tensor([end], dtype=torch.int32)
        md = AttentionMetadata(end - start, end - start, end, qsl, qsl, sl, sl, block_table,
                               block_table[0, pos // bs].long() * bs + pos % bs)  # fmt: skip
        out = torch.empty(end - start, nh, d)
        return impl.forward(q[start:end], k[start:end], v[start:end], kv_cache, md, out)

    one_shot = step(torch.zeros(2, 8, bs, nkv, d), 0, total)
    cache = torch.zeros(2, 8, bs, nkv, d)
    chunked = torch.cat([step(cache, s, min(s + 8, total)) for s in range(0, total, 8)])
    torch.testing.assert_close(chunked, one_shot, atol=1e-6, rtol=1e-6)


def test_selector_defaults_and_errors():
    assert get_attn_backend(None, "cpu").name == "torch"
    assert get_attn_backend("auto", "cpu").name == "torch"
    assert get_attn_backend("triton", "cpu").name == "triton"
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'.*torch, triton, flashinfer"):
        get_attn_backend("nope", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_attn_backend("flashinfer", "cpu")
    backend = get_attn_backend("torch", "cpu")
    assert backend.get_kv_cache_shape(10, 16, 2, 64) == (2, 10, 16, 2, 64)


def test_impl_rejects_bad_head_counts():
    impl_cls = get_attn_backend("torch", "cpu").get_impl_cls()
    with pytest.raises(
        ValueError, match=r"num_heads \(6\) must be a positive multiple of num_kv_heads \(4\)"
    ):
        impl_cls(6, 16, 0.25, 4)
    with pytest.raises(ValueError, match="sliding_window"):
        impl_cls(4, 16, 0.25, 2, sliding_window=0)
