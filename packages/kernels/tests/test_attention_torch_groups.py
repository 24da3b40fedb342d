"""The torch backend's padded group path (one attention call for many requests) against float64 dense."""

from __future__ import annotations

import zlib

import pytest
import torch
from attention_cases import dense_reference, make_case

from treadle_kernels.attention import get_attn_backend
from treadle_kernels.attention.torch_backend import plan_groups

DECODES = [(17, 1), (3, 1), (40, 1), (29, 1), (0, 1), (33, 1)]  # ragged decode batch
PREFILLS = [(0, 9), (0, 9), (0, 8), (0, 9)]  # near-equal prompts
CHUNKED = [(12, 4), (0, 0), (10, 5), (13, 4)]  # chunked prefills around an idle request


def _run(case, nh, nkv, d, window, cap, scale):
    backend = get_attn_backend("torch", "cpu")
    builder = backend.get_builder_cls()(case.kv_cache.shape[2], "cpu")
    impl = backend.get_impl_cls()(nh, d, scale, nkv, window, cap)
    out = torch.zeros_like(case.query)
    return impl.forward(case.query, case.key, case.value, case.kv_cache, builder.build(case.metadata), out)


@pytest.mark.parametrize("requests", [DECODES, PREFILLS, CHUNKED])
@pytest.mark.parametrize(
    ("window", "cap", "causal"), [(None, None, True), (5, None, True), (None, 3.0, True), (None, None, False)]
)
@pytest.mark.parametrize(("nh", "nkv"), [(6, 2), (2, 2)])
def test_group_path_matches_dense(requests, window, cap, causal, nh, nkv):
    seed = (
        zlib.crc32(repr((len(requests), window, cap, causal, nh)).encode()) % 1000
    )  # the same in every process
    case = make_case(requests, nh, nkv, 8, 4, seed=seed, num_padding=1, causal=causal)
    groups = plan_groups([q for _, q in requests], [c + q for c, q in requests])
    assert any(e - s > 1 for s, e in groups), f"{requests} should form a multi-request group: {groups}"
    out = _run(case, nh, nkv, 8, window, cap, 0.4)
    n = case.metadata.num_actual_tokens
    assert torch.isfinite(out[:n]).all(), "a NaN from an unwritten cache slot leaked into the output"
    torch.testing.assert_close(
        out[:n].double(), dense_reference(case, 0.4, window, cap), atol=1e-5, rtol=1e-5
    )


def test_plan_groups_splits_on_waste_and_skips_idle_requests():
    assert plan_groups([1, 1, 1], [10, 12, 11]) == [(0, 3)]
    assert plan_groups([0, 0], [5, 5]) == []
    # a long prefill next to decodes would pad every decode to its query length: separate groups
    assert plan_groups([1, 1, 64], [30, 30, 64]) == [(0, 2), (2, 3)]
    assert plan_groups([0, 1, 1], [3, 4, 4]) == [(1, 3)]
