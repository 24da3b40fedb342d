"""FusedMoE with fp8 experts: online quantization (both layouts), loading an fp8 checkpoint's experts, the oracle."""

from __future__ import annotations

import pytest
import torch
from fp8_cases import LAYOUTS, assert_rows_close, make_fp8_inputs, moe_fp8_spec, quantize_tiles
from moe_cases import DEVICE

from treadle_moe import Fp8ExpertScales, Fp8Layout, FusedMoE, MoEProblem, select_experts, select_moe_kernel
from treadle_moe.experts.torch_ref import TorchExperts
from treadle_moe.experts.triton_fused import TritonExperts


def _layer(backend: str | None = None, inter: int = 48) -> FusedMoE:
    layer = FusedMoE(8, 2, 48, inter, dtype=torch.float32, backend=backend)
    gen = torch.Generator().manual_seed(4)
    layer.w13_weight.data = torch.randn(8, 2 * inter, 48, generator=gen) / 48**0.5
    layer.w2_weight.data = torch.randn(8, 48, inter, generator=gen) / inter**0.5
    return layer


def _routed(layer: FusedMoE, x: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    weights, ids = select_experts(logits, layer.top_k, renormalize=True)
    return {
        "hidden": x,
        "w13": layer.w13_weight,
        "w2": layer.w2_weight,
        "topk_weights": weights,
        "topk_ids": ids,
    }


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_online_quantization_matches_the_spec(layout: str, backend: str | None) -> None:
    """quantize_fp8 gives the scales and bytes quantized in the test, and the forward computes the fp8 spec."""
    if backend == "triton":
        pytest.importorskip("triton")
    layer = _layer(backend)
    w13, w2 = layer.w13_weight.detach().clone(), layer.w2_weight.detach().clone()
    block = LAYOUTS[layout]
    layer.quantize_fp8(Fp8Layout(block))
    assert layer.w13_weight.dtype == layer.w2_weight.dtype == torch.float8_e4m3fn
    if block is None:
        expected = (w13.abs().amax(dim=2) / 448, w2.abs().amax(dim=2) / 448)
    else:
        grids = [
            (quantize_tiles(w13[e, :48], *block)[1], quantize_tiles(w13[e, 48:], *block)[1]) for e in range(8)
        ]
        expected = (
            torch.stack([torch.cat(g) for g in grids]),
            torch.stack([quantize_tiles(w2[e], *block)[1] for e in range(8)]),
        )
    torch.testing.assert_close(layer.w13_weight_scale, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(layer.w2_weight_scale, expected[1], rtol=0, atol=0)
    x, logits = torch.randn(11, 48), torch.randn(11, 8)
    out = layer.to(DEVICE)(x.to(DEVICE), logits.to(DEVICE)).cpu()
    spec = moe_fp8_spec(_routed(layer.cpu(), x, logits), layer.fp8_scales())  # type: ignore[arg-type]
    assert_rows_close(out, spec, 1e-5)
    assert ("triton_fused" if backend else "torch_reference") in layer.describe()


def test_fp8_checkpoint_experts_load_through_weight_loader() -> None:
    """allocate_fp8 on a meta-built layer, then each expert's fp8 matrices and block grids through weight_loader
    land in their slices (gate block rows first, then up), and the forward computes the spec."""
    inputs, scales = make_fp8_inputs((32, 16), 5, 48, 48, 8, 2, torch.float32, device="cpu", seed=2)
    layer = FusedMoE(8, 2, 48, 48, dtype=torch.float32, device="meta")
    layer.allocate_fp8(Fp8Layout((32, 16)), device="cpu")
    gate_rows = 2  # ceil(48 / 32)
    for e in range(8):
        for shard, rows, grid in (
            ("w1", slice(0, 48), slice(0, gate_rows)),
            ("w3", slice(48, 96), slice(2, 4)),
        ):
            layer.weight_loader(layer.w13_weight, inputs["w13"][e, rows], "w", shard, e)
            layer.weight_loader(layer.w13_weight_scale, scales.w13[e, grid], "s", shard, e)  # type: ignore[arg-type]
        layer.weight_loader(layer.w2_weight, inputs["w2"][e], "w", "w2", e)
        layer.weight_loader(layer.w2_weight_scale, scales.w2[e], "s", "w2", e)  # type: ignore[arg-type]
    assert torch.equal(layer.w13_weight.view(torch.uint8), inputs["w13"].view(torch.uint8))
    assert torch.equal(layer.w13_weight_scale, scales.w13) and torch.equal(layer.w2_weight_scale, scales.w2)
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), expected \(2, 3\).*fp8 block size"):
        layer.weight_loader(layer.w13_weight_scale, torch.ones(3, 3), "s", "w1", 0)  # type: ignore[arg-type]
    x, logits = torch.randn(5, 48), torch.randn(5, 8)
    spec = moe_fp8_spec(
        _routed(layer, x, logits), Fp8ExpertScales(scales.w13, scales.w2, Fp8Layout((32, 16)))
    )
    assert_rows_close(layer(x, logits), spec, 1e-5)


def test_oracle_picks_fp8_triton_on_cuda_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    from treadle_moe.experts import triton_fp8

    triton_fp8._capability.cache_clear()
    block = Fp8Layout((128, 128))
    problem = MoEProblem(128, 8, 2048, 768, torch.bfloat16, torch.device("cuda"), 4096, fp8=block)
    choice = select_moe_kernel(problem)
    assert choice.experts_cls is TritonExperts
    text = choice.describe()
    assert "fp8 w8a8 block-wise (128x128 weight scales" in text and "fp8 tensor cores" in text
    assert "tuned NVIDIA_H200.json (M=4096)" in text and "BLOCK_K=128" in text
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert "fp8 fallback heuristic" in select_moe_kernel(problem).describe()  # no fp8 table for that card
    odd = MoEProblem(128, 8, 2048, 768, torch.bfloat16, torch.device("cuda"), fp8=Fp8Layout((128, 96)))
    refused = select_moe_kernel(odd)
    assert refused.experts_cls is TorchExperts and "block_k 96 must be a power of two" in refused.describe()
    with pytest.raises(ValueError, match=r"block_k 96 must be a power of two"):
        select_moe_kernel(odd, backend="triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    triton_fp8._capability.cache_clear()
    old_gpu = select_moe_kernel(
        MoEProblem(8, 2, 64, 32, torch.bfloat16, torch.device("cuda"), fp8=Fp8Layout())
    )
    assert old_gpu.experts_cls is TorchExperts and "compute capability >= 8.9" in old_gpu.describe()
    triton_fp8._capability.cache_clear()


def test_oracle_on_cpu_runs_the_fp8_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
    problem = MoEProblem(8, 2, 64, 32, torch.float32, torch.device("cpu"), fp8=Fp8Layout())
    choice = select_moe_kernel(problem)
    assert choice.experts_cls is TorchExperts
    assert "fp8 w8a8 per-channel" in choice.describe() and "runs the spec" in choice.describe()
