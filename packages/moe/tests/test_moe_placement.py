"""Expert parallelism in FusedMoE: a layer holding a range of the experts (placement.py) computes the full layer's
output restricted to its experts, so the layers of a placement's ranks sum to the full layer. Model-dtype, fp8 and
4-bit experts, the torch reference and the Triton kernels (CPU interpreter), standard and batched formats."""

from __future__ import annotations

import pytest
import torch
from int4_cases import make_int4_inputs, moe_int4_spec
from moe_cases import DEVICE
from test_moe_layer import build_layer

from treadle_moe import ExpertPlacement, Fp8Layout, FusedMoE, select_experts
from treadle_moe.int4_layer import allocate_int4, load_int4_expert

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 8, 32, 16, 2


def _split(layer: FusedMoE, ep_size: int, **kwargs: object) -> list[FusedMoE]:
    """The `ep_size` layers of a linear placement, each loaded (by global expert id) from `layer`'s experts."""
    parts = []
    for rank in range(ep_size):
        part = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTER, dtype=layer.w13_weight.dtype,
                        placement=ExpertPlacement.linear(NUM_EXPERTS, rank, ep_size), **kwargs)  # type: ignore[arg-type]  # fmt: skip
        for e in range(NUM_EXPERTS):  # every expert offered; the other ranks' ignored
            for shard in ("w1", "w3", "w2"):
                w = layer.w2_weight[e] if shard == "w2" else layer.w13_weight[e]
                part.load_expert_weight(e, shard, w if shard == "w2" else w.chunk(2)[shard == "w3"])
        parts.append(part)
    return parts


def test_linear_placement() -> None:
    p = ExpertPlacement.linear(8, 1, 4)
    assert (p.first, p.num_local, p.local_experts, p.is_partial) == (2, 2, range(2, 4), True)
    assert [p.local_id(e) for e in (1, 2, 3, 4)] == [None, 0, 1, None]
    ids = torch.tensor([[0, 2], [3, 7]], dtype=torch.int32)
    assert p.to_local_ids(ids).tolist() == [[-1, 0], [1, -1]]
    assert not ExpertPlacement.linear(8).is_partial
    with pytest.raises(
        ValueError, match=r"num_experts \(6\) is not divisible by the expert-parallel size \(4\)"
    ):
        ExpertPlacement.linear(6, 0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "torch_batched", "triton", "triton_batched"])
def test_placement_layers_sum_to_the_full_layer(backend: str, dtype: torch.dtype) -> None:
    if backend.startswith("triton"):
        pytest.importorskip("triton")
    full, _ = build_layer(NUM_EXPERTS, HIDDEN, INTER, TOP_K, seed=5, backend=backend)
    full = full.to(DEVICE, dtype)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(13, HIDDEN, generator=gen).to(DEVICE, dtype)
    logits = torch.randn(13, NUM_EXPERTS, generator=gen).to(DEVICE)
    # the full layer runs first: the kernels' workspaces then hold its rows, which no skipped slot may read
    expected = full(x, logits).float()
    parts = [p.to(DEVICE) for p in _split(full, 2, backend=backend)]
    outs = [p(x, logits).float() for p in parts]
    assert tuple(parts[1].w13_weight.shape) == (4, 2 * INTER, HIDDEN)
    # rank 0 alone: the full layer with the slots of experts 4..7 weighted zero
    weights, ids = select_experts(logits, TOP_K, True)
    mine = torch.where(ids < 4, weights, torch.zeros_like(weights))
    own = torch.zeros_like(expected)
    for t in range(x.shape[0]):
        for j in range(TOP_K):
            e = int(ids[t, j])
            h = x[t].float() @ full.w13_weight[e].float().t()
            own[t] += mine[t, j] * (
                (torch.nn.functional.silu(h[:INTER]) * h[INTER:]) @ full.w2_weight[e].float().t()
            )
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(outs[0], own, atol=tol, rtol=tol)
    torch.testing.assert_close(outs[0] + outs[1], expected, atol=2 * tol, rtol=2 * tol)
    assert "local_experts=range(4, 8)" in repr(parts[1])


def test_stacked_load_keeps_the_local_experts() -> None:
    layer = FusedMoE(4, 2, 16, 8, dtype=torch.float32, placement=ExpertPlacement.linear(4, 1, 2))
    gate_up, down = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    layer.load_stacked_weights(gate_up, down)
    assert torch.equal(layer.w13_weight, gate_up[2:]) and torch.equal(layer.w2_weight, down[2:])
    with pytest.raises(ValueError, match="out of range"):
        layer.load_expert_weight(4, "w2", torch.zeros(16, 8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("block", [None, (16, 16)])
def test_fp8_placement_layers_sum_to_the_full_layer(block: tuple[int, int] | None, backend: str) -> None:
    """Quantized online (per expert, so a rank's experts quantize as the full layer's), and loaded from the full
    layer's fp8 weights and scales through weight_loader by global expert id."""
    if backend == "triton":
        pytest.importorskip("triton")
    full, _ = build_layer(NUM_EXPERTS, HIDDEN, INTER, TOP_K, seed=7, backend=backend)
    layout = Fp8Layout(block)
    online = _split(full, 2, backend=backend)
    full.quantize_fp8(layout)
    for part in online:
        part.quantize_fp8(layout)
    loaded = []
    for rank in range(2):
        part = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTER, device="meta", backend=backend,
                        placement=ExpertPlacement.linear(NUM_EXPERTS, rank, 2))  # fmt: skip
        part.allocate_fp8(layout, "cpu")
        assert part.w13_weight_scale is not None and full.w13_weight_scale is not None
        assert part.w2_weight_scale is not None and full.w2_weight_scale is not None
        rows = full.w13_weight_scale.shape[1] // 2
        for e in range(NUM_EXPERTS):
            for shard, half in (("w1", slice(0, INTER)), ("w3", slice(INTER, 2 * INTER))):
                part.weight_loader(part.w13_weight, full.w13_weight[e, half], "w13", shard, e)
            part.weight_loader(part.w2_weight, full.w2_weight[e], "w2", "w2", e)
            part.weight_loader(part.w13_weight_scale, full.w13_weight_scale[e, :rows], "s", "w1", e)
            part.weight_loader(part.w13_weight_scale, full.w13_weight_scale[e, rows:], "s", "w3", e)
            part.weight_loader(part.w2_weight_scale, full.w2_weight_scale[e], "s", "w2", e)
        loaded.append(part)
    gen = torch.Generator().manual_seed(8)
    x, logits = torch.randn(9, HIDDEN, generator=gen), torch.randn(9, NUM_EXPERTS, generator=gen)
    expected = full.to(DEVICE)(x.to(DEVICE), logits.to(DEVICE))
    for parts in (online, loaded):
        out = sum(p.to(DEVICE)(x.to(DEVICE), logits.to(DEVICE)) for p in parts)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_static_fp8_input_scales_cover_every_expert() -> None:
    """With static activations every rank keeps all experts' input scales, so the fold (their maximum) is the
    full layer's on every rank."""
    part = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTER, device="meta",
                    placement=ExpertPlacement.linear(NUM_EXPERTS, 0, 2))  # fmt: skip
    part.allocate_fp8(Fp8Layout(static_activations=True), "cpu")
    assert part.w13_input_scale is not None and part.w2_input_scale is not None
    assert tuple(part.w13_input_scale.shape) == (NUM_EXPERTS, 2) and part.w2_weight.shape[0] == 4
    part.weight_loader(part.w2_input_scale, torch.tensor(3.0), "in", "w2", 7)  # another rank's expert
    part.weight_loader(part.w13_input_scale, torch.tensor(2.0), "in", "w3", 6)
    scales = part.fp8_scales()
    assert scales is not None and scales.w2_input is not None and scales.w13_input is not None
    assert float(scales.w2_input) == 3.0 and float(scales.w13_input) == 2.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_int4_placement_layers_sum_to_the_full_spec(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    inputs, s = make_int4_inputs(
        "g16-asym", 7, 48, 48, NUM_EXPERTS, TOP_K, torch.float32, device="cpu", seed=3
    )
    parts = []
    for rank in range(2):
        layer = FusedMoE(NUM_EXPERTS, TOP_K, 48, 48, dtype=torch.float32, device="meta", backend=backend,
                         placement=ExpertPlacement.linear(NUM_EXPERTS, rank, 2))  # fmt: skip
        allocate_int4(layer, s.layout, s.w13_scale.shape[1], s.w2_scale.shape[1], torch.float32, "cpu")
        assert s.w13_zero is not None and s.w2_zero is not None
        for e in range(NUM_EXPERTS):
            for shard, cols in (("w1", slice(0, 48)), ("w3", slice(48, 96))):
                load_int4_expert(layer, "packed_weight", shard, e, inputs["w13"][e][:, cols], "p")
                load_int4_expert(layer, "group_scale", shard, e, s.w13_scale[e][:, cols], "s")
                load_int4_expert(layer, "group_zero", shard, e, s.w13_zero[e][:, cols], "z")
            for attr, t in (
                ("packed_weight", inputs["w2"]),
                ("group_scale", s.w2_scale),
                ("group_zero", s.w2_zero),
            ):
                load_int4_expert(layer, attr, "w2", e, t[e], attr)
        assert torch.equal(layer.w13_weight, inputs["w13"][4 * rank : 4 * rank + 4])
        parts.append(layer.to(DEVICE))
    gen = torch.Generator().manual_seed(9)
    x, logits = torch.randn(7, 48, generator=gen), torch.randn(7, NUM_EXPERTS, generator=gen)
    weights, ids = select_experts(logits, TOP_K, renormalize=True)
    spec = moe_int4_spec({**inputs, "hidden": x, "topk_weights": weights, "topk_ids": ids})
    out = sum(p(x.to(DEVICE), logits.to(DEVICE)) for p in parts)
    torch.testing.assert_close(out.cpu(), spec, atol=1e-4, rtol=1e-4)
