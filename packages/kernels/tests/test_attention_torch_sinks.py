"""Attention sinks (gpt-oss) in the torch reference backend, against the dense float64 formula: both of its paths
(requests attended alone in query chunks, padded groups), with soft-cap, sliding window and GQA."""

from __future__ import annotations

import pytest
import torch
from attention_cases import dense_reference, make_case

from treadle_kernels.attention import get_attn_backend, torch_backend

MIXED = [(0, 7), (13, 5), (20, 1), (5, 1), (0, 1), (31, 3)]  # prefill, chunked prefill, decodes
DECODES = [(17, 1), (3, 1), (40, 1), (29, 1), (0, 1), (33, 1)]
CHUNKED = [(12, 4), (0, 0), (10, 5), (13, 4)]  # chunked prefills on cached blocks around an idle request
ALONE = [(9, 23)]  # one request: the path that attends it alone


def random_sinks(num_heads: int, seed: int) -> torch.Tensor:
    """Sink logits spread around the scores' range, so some heads put most weight on the sink, others little."""
    return torch.randn(num_heads, generator=torch.Generator().manual_seed(seed)) * 2.0 + 0.5


def run_torch(case, nh, nkv, d, window=None, cap=None, sinks=None, scale=0.4):
    backend = get_attn_backend("torch", "cpu")
    builder = backend.get_builder_cls()(case.kv_cache.shape[2], "cpu")
    impl = backend.get_impl_cls()(nh, d, scale, nkv, window, cap, sinks=sinks)
    out = torch.zeros_like(case.query)
    return impl.forward(case.query, case.key, case.value, case.kv_cache, builder.build(case.metadata), out)


@pytest.mark.parametrize(
    "requests", [MIXED, DECODES, CHUNKED, ALONE], ids=["mixed", "decode", "chunked", "alone"]
)
@pytest.mark.parametrize(("window", "cap"), [(None, None), (5, None), (None, 3.0), (4, 2.0)])
@pytest.mark.parametrize(("nh", "nkv"), [(8, 2), (3, 3)])
def test_sinks_match_dense(requests, window, cap, nh, nkv):
    case = make_case(requests, nh, nkv, 16, 4, seed=len(requests) + nh, num_padding=2)
    sinks = random_sinks(nh, seed=nkv)
    out = run_torch(case, nh, nkv, 16, window, cap, sinks)
    n = case.metadata.num_actual_tokens
    ref = dense_reference(case, 0.4, window, cap, sinks)
    torch.testing.assert_close(out[:n].double(), ref, atol=1e-5, rtol=1e-5)
    # the sinks matter at this size: without them the outputs differ
    assert (ref - dense_reference(case, 0.4, window, cap)).abs().max() > 1e-2


def test_sinks_in_query_chunks(monkeypatch: pytest.MonkeyPatch):
    """Long requests attended alone in several query chunks (the chunk shrunk to 5 tokens)."""
    monkeypatch.setattr(torch_backend, "_QUERY_CHUNK", 5)
    case = make_case([(6, 17), (0, 12)], 4, 2, 8, 4, seed=7)
    sinks = random_sinks(4, seed=3)
    out = run_torch(case, 4, 2, 8, window=6, sinks=sinks)
    n = case.metadata.num_actual_tokens
    torch.testing.assert_close(
        out[:n].double(), dense_reference(case, 0.4, 6, None, sinks), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sinks_of_any_float_dtype_read_as_float32(dtype):
    case = make_case(MIXED, 4, 2, 16, 4, seed=5)
    sinks = random_sinks(4, seed=4).to(dtype)
    out = run_torch(case, 4, 2, 16, sinks=sinks)
    ref = dense_reference(case, 0.4, sinks=sinks.float())
    torch.testing.assert_close(out[: case.metadata.num_actual_tokens].double(), ref, atol=1e-5, rtol=1e-5)


def test_minus_inf_sinks_equal_no_sinks():
    """A sink of -inf takes no weight: the materialised path gives the SDPA path's outputs."""
    case = make_case(MIXED, 6, 2, 16, 4, seed=6)
    plain = run_torch(case, 6, 2, 16, window=7)
    case = make_case(MIXED, 6, 2, 16, 4, seed=6)
    sunk = run_torch(case, 6, 2, 16, window=7, sinks=torch.full((6,), float("-inf")))
    torch.testing.assert_close(sunk, plain, atol=1e-6, rtol=1e-6)


def test_impl_reads_the_sinks_it_was_given_by_reference():
    """Weights loaded into the sinks tensor after the impl is built are used (no copy at construction)."""
    sinks = torch.zeros(4)
    backend = get_attn_backend("torch", "cpu")
    impl = backend.get_impl_cls()(4, 16, 0.4, 2, sinks=sinks)
    assert impl.sinks is sinks
    fresh = random_sinks(4, seed=8)
    sinks.copy_(fresh)
    case = make_case(MIXED, 4, 2, 16, 4, seed=8)
    out = torch.zeros_like(case.query)
    builder = backend.get_builder_cls()(4, "cpu")
    impl.forward(case.query, case.key, case.value, case.kv_cache, builder.build(case.metadata), out)
    ref = dense_reference(case, 0.4, sinks=fresh)
    torch.testing.assert_close(out[: case.metadata.num_actual_tokens].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(4, 1), torch.zeros(4, dtype=torch.int64)])
def test_sinks_are_validated(bad):
    impl_cls = get_attn_backend("torch", "cpu").get_impl_cls()
    with pytest.raises(ValueError, match=r"num_heads \(4\).*got shape"):
        impl_cls(4, 16, 0.4, 2, sinks=bad)
