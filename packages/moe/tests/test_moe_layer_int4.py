"""FusedMoE with 4-bit experts: storage and per-expert loading (int4_layer.py), quantizing loaded weights, the
oracle's choice and reasons."""

from __future__ import annotations

import pytest
import torch
from int4_cases import make_int4_inputs, moe_int4_spec

from treadle_moe import FusedMoE, Int4Layout, MoEProblem, select_experts, select_moe_kernel
from treadle_moe.experts.torch_ref import TorchExperts
from treadle_moe.experts.triton_fused import TritonExperts
from treadle_moe.int4_layer import allocate_int4, load_int4_expert, quantize_int4


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("layout", ["g16-asym", "g16-sym-act-order"])
def test_checkpoint_experts_load_per_projection(layout: str, backend: str | None) -> None:
    """allocate_int4 on a meta-built layer, then each expert's gate, up and down tensors (in the one-projection
    layout) land in their columns, and the forward computes the spec."""
    if backend == "triton":
        pytest.importorskip("triton")
    inputs, s = make_int4_inputs(layout, 7, 48, 48, 8, 2, torch.float32, device="cpu", seed=2)
    layer = FusedMoE(8, 2, 48, 48, dtype=torch.float32, device="meta", backend=backend)
    allocate_int4(layer, s.layout, s.w13_scale.shape[1], s.w2_scale.shape[1], torch.float32, "cpu")
    for e in range(8):
        for shard, cols in (("w1", slice(0, 48)), ("w3", slice(48, 96))):
            load_int4_expert(layer, "packed_weight", shard, e, inputs["w13"][e][:, cols], "p")
            load_int4_expert(layer, "group_scale", shard, e, s.w13_scale[e][:, cols], "s")
            if s.w13_zero is not None:
                load_int4_expert(layer, "group_zero", shard, e, s.w13_zero[e][:, cols], "z")
            if s.w13_g_idx is not None:
                load_int4_expert(layer, "group_index", shard, e, s.w13_g_idx[e], "g")
        for attr, t in (("packed_weight", inputs["w2"]), ("group_scale", s.w2_scale), ("group_zero", s.w2_zero),
                        ("group_index", s.w2_g_idx)):  # fmt: skip
            if t is not None:
                load_int4_expert(layer, attr, "w2", e, t[e], attr)
    assert torch.equal(layer.w13_weight, inputs["w13"]) and torch.equal(layer.w2_weight, inputs["w2"])
    with pytest.raises(ValueError, match=r"is \(3, 48\) in treadle's 4-bit layout.*expects \(6, 48\)"):
        load_int4_expert(layer, "packed_weight", "w1", 0, torch.zeros(3, 48, dtype=torch.int32), "bad")
    if s.w13_g_idx is not None:
        with pytest.raises(ValueError, match=r"orders expert 0's input rows differently from its w1"):
            load_int4_expert(layer, "group_index", "w3", 0, s.w13_g_idx[0].flip(0), "up.g_idx")
    x, logits = torch.randn(7, 48), torch.randn(7, 8)
    weights, ids = select_experts(logits, 2, renormalize=True)
    spec = moe_int4_spec({**inputs, "hidden": x, "topk_weights": weights, "topk_ids": ids})
    assert _relative_error(layer(x, logits), spec) < 1e-5
    assert ("triton_fused" if backend else "torch_reference") in layer.describe()
    assert "int4=w4a16" in repr(layer)


# Upper bounds of the 4-bit error: over 150 input draws on these weights the error spanned 0.092-0.164 (groups of
# 16 with zero points) and 0.129-0.226 (per channel, symmetric: one scale for 48 values); a wrong dequantization
# is off by ~1.
@pytest.mark.parametrize(
    ("layout", "bound"), [(Int4Layout(16, True, False), 0.2), (Int4Layout(-1, False, False), 0.3)]
)
def test_quantize_int4_is_close_to_the_model_dtype_layer(layout: Int4Layout, bound: float) -> None:
    layer = FusedMoE(8, 2, 48, 32, dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    layer.w13_weight.data = torch.randn(8, 64, 48, generator=gen) / 48**0.5
    layer.w2_weight.data = torch.randn(8, 48, 32, generator=gen) / 32**0.5
    x, logits = torch.randn(9, 48, generator=gen), torch.randn(9, 8, generator=gen)
    plain = layer(x, logits)
    quantize_int4(layer, layout)
    assert layer.w13_weight.dtype == torch.int32 and tuple(layer.w13_weight.shape) == (8, 6, 64)
    assert 0.01 < _relative_error(layer(x, logits), plain) < bound


def test_oracle_picks_int4_triton_on_cuda_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    layout = Int4Layout(128, False, False)
    problem = MoEProblem(128, 8, 2048, 768, torch.bfloat16, torch.device("cuda"), 4096, int4=layout)
    choice = select_moe_kernel(problem)
    assert choice.experts_cls is TritonExperts
    text = choice.describe()
    assert "w4a16 (group size 128, symmetric; 16-bit activations)" in text and "unpacked in registers" in text
    assert all(int(k) <= 128 for k in __import__("re").findall(r"BLOCK_K=(\d+)", text))


def test_oracle_on_cpu_runs_the_int4_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
    problem = MoEProblem(8, 2, 64, 32, torch.bfloat16, torch.device("cpu"), int4=Int4Layout(32, True, True))
    choice = select_moe_kernel(problem)
    assert choice.experts_cls is TorchExperts
    text = choice.describe()
    assert (
        "w4a16 (group size 32, zero points, act order" in text and "w4a16_linear reference per expert" in text
    )
