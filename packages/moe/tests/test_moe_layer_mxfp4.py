"""FusedMoE holding MXFP4 experts (mxfp4_layer.py): quantizing loaded weights, allocating and loading a checkpoint's
blocks (expert and tensor parallelism's cuts), the oracle's choice, and the refusals."""

from __future__ import annotations

import pytest
import torch

from treadle_moe import FusedMoE, MoEProblem, select_moe_kernel
from treadle_moe.experts.mxfp4 import Mxfp4Layout, dequantize_mxfp4, quantize_mxfp4
from treadle_moe.mxfp4_layer import allocate_mxfp4, expert_bytes, load_mxfp4_projection, quantize_to_mxfp4
from treadle_moe.placement import ExpertPlacement

E, TOP_K, K, N = 8, 2, 64, 64


def _layer(n: int = N, placement: ExpertPlacement | None = None, device: str | None = None) -> FusedMoE:
    return FusedMoE(E, TOP_K, K, n, dtype=torch.float32, activation="swigluoai", bias=True, placement=placement,
                    device=device)  # fmt: skip


def _checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every expert's w13 (gate rows, then up rows) and w2 as MXFP4 blocks / scales, with biases."""
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(E, 2 * N, K, generator=gen) / 8, torch.randn(E, K, N, generator=gen) / 8
    (b13, s13), (b2, s2) = quantize_mxfp4(w13), quantize_mxfp4(w2)
    return {"b13": b13, "s13": s13, "b2": b2, "s2": s2, "bias13": torch.randn(E, 2 * N, generator=gen),
            "bias2": torch.randn(E, K, generator=gen)}  # fmt: skip


def _dequantized_layer(ckpt: dict[str, torch.Tensor]) -> FusedMoE:
    moe = _layer()
    moe.load_stacked_weights(dequantize_mxfp4(ckpt["b13"], ckpt["s13"], torch.float32),
                             dequantize_mxfp4(ckpt["b2"], ckpt["s2"], torch.float32))  # fmt: skip
    assert moe.w13_bias is not None and moe.w2_bias is not None
    moe.w13_bias.data.copy_(ckpt["bias13"])
    moe.w2_bias.data.copy_(ckpt["bias2"])
    return moe


def _mxfp4_layer(ckpt: dict[str, torch.Tensor], **kwargs: object) -> FusedMoE:
    moe = _layer(**kwargs)  # type: ignore[arg-type]
    allocate_mxfp4(moe)
    load_mxfp4_projection(moe, "w13", ckpt["b13"], ckpt["s13"])
    load_mxfp4_projection(moe, "w2", ckpt["b2"], ckpt["s2"])
    assert moe.w13_bias is not None and moe.w2_bias is not None
    moe.w13_bias.data.copy_(ckpt["bias13"].narrow(0, moe.placement.first, moe.placement.num_local))
    moe.w2_bias.data.copy_(ckpt["bias2"].narrow(0, moe.placement.first, moe.placement.num_local))
    return moe


def _inputs(tokens: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return 4 * torch.randn(tokens, K, generator=gen), torch.randn(tokens, E, generator=gen)


def test_loaded_checkpoint_matches_the_dequantized_layer() -> None:
    ckpt = _checkpoint()
    moe = _mxfp4_layer(ckpt)
    assert moe.w13_weight.dtype == torch.uint8 and moe.w13_weight.shape == (E, 2 * N, K // 32, 16)
    assert moe.w2_weight.shape == (E, K, N // 32, 16) and moe.mxfp4_layout == Mxfp4Layout()
    assert expert_bytes(moe) == E * (2 * N * K + K * N) * 17 // 32  # 4 bits + one byte per 32 values
    x, logits = _inputs()
    torch.testing.assert_close(moe(x, logits), _dequantized_layer(ckpt)(x, logits), atol=0, rtol=0)
    assert "mxfp4" in moe.describe() and "mxfp4" in moe.extra_repr()


def test_quantize_to_mxfp4_is_the_quantizer_on_each_expert() -> None:
    ckpt = _checkpoint(1)
    moe = _dequantized_layer(ckpt)
    before = moe(*_inputs())
    quantize_to_mxfp4(moe)  # the weights are representable already: nothing changes
    assert moe.w13_weight.dtype == torch.uint8 and moe.w13_weight_scale is not None
    torch.testing.assert_close(moe(*_inputs()), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="quantized experts already"):
        quantize_to_mxfp4(moe)


def test_expert_parallel_rank_keeps_its_experts() -> None:
    ckpt = _checkpoint(2)
    rank1 = _mxfp4_layer(ckpt, placement=ExpertPlacement.linear(E, 1, 2))
    assert rank1.w13_weight.shape[0] == E // 2
    assert torch.equal(rank1.w13_weight, ckpt["b13"][E // 2 :])
    assert torch.equal(rank1.w2_weight_scale, ckpt["s2"][E // 2 :])


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_rank_keeps_its_columns(rank: int) -> None:
    """Two ranks of width 32: rank r holds gate rows [32r, +32) and up rows [64 + 32r, +32) of w13, and w2's
    inputs [32r, +32) (its scale block r)."""
    ckpt = _checkpoint(3)
    moe = _layer(n=32)
    allocate_mxfp4(moe)
    load_mxfp4_projection(moe, "w13", ckpt["b13"], ckpt["s13"], first_column=32 * rank)
    load_mxfp4_projection(moe, "w2", ckpt["b2"], ckpt["s2"], first_column=32 * rank)
    gate, up = slice(32 * rank, 32 * rank + 32), slice(N + 32 * rank, N + 32 * rank + 32)
    assert torch.equal(moe.w13_weight, torch.cat([ckpt["b13"][:, gate], ckpt["b13"][:, up]], dim=1))
    assert torch.equal(moe.w2_weight, ckpt["b2"][:, :, rank : rank + 1])
    assert torch.equal(moe.w2_weight_scale, ckpt["s2"][:, :, rank : rank + 1])


def test_widths_not_in_blocks_of_32_are_refused() -> None:
    moe = _layer(n=48)
    with pytest.raises(ValueError, match=r"width \(48\) must be multiples of 32.*tensor_parallel_size"):
        allocate_mxfp4(moe)
    moe = _layer(n=32)
    allocate_mxfp4(moe)
    ckpt = _checkpoint()
    with pytest.raises(ValueError, match="not a multiple of 32"):
        load_mxfp4_projection(moe, "w13", ckpt["b13"], ckpt["s13"], first_column=16)
    with pytest.raises(ValueError, match="do not fit the layer"):
        load_mxfp4_projection(moe, "w2", ckpt["b13"], ckpt["s13"])
    with pytest.raises(ValueError, match="with their scales"):
        moe.load_stacked_weights(torch.zeros(E, 64, K), torch.zeros(E, K, 32))


def test_oracle_runs_the_reference_on_cpu_and_allows_the_epilogue() -> None:
    problem = MoEProblem(E, TOP_K, K, N, torch.bfloat16, torch.device("cpu"), activation="swigluoai",
                         has_bias=True, mxfp4=Mxfp4Layout())  # fmt: skip
    choice = select_moe_kernel(problem)
    assert choice.experts_cls.name == "torch_reference"
    assert "mxfp4" in choice.describe()


def test_meta_built_layer_gets_storage() -> None:
    moe = _layer(device="meta")
    allocate_mxfp4(moe, "cpu")
    assert moe.w13_bias is not None and moe.w13_bias.device.type == "cpu"
    assert moe.w13_weight.device.type == "cpu"


def test_one_expert_at_a_time_equals_the_stack() -> None:
    """Loading each global expert alone (dummy weights do) fills the same bytes; another rank's expert is ignored."""
    ckpt = _checkpoint(4)
    stacked, one = (_layer(n=32, placement=ExpertPlacement.linear(E, 0, 2)) for _ in range(2))
    allocate_mxfp4(stacked)
    allocate_mxfp4(one)
    for expert in range(E):
        for proj, b, s in (("w13", "b13", "s13"), ("w2", "b2", "s2")):
            load_mxfp4_projection(one, proj, ckpt[b][expert], ckpt[s][expert], first_column=32, expert=expert)
    load_mxfp4_projection(stacked, "w13", ckpt["b13"], ckpt["s13"], first_column=32)
    load_mxfp4_projection(stacked, "w2", ckpt["b2"], ckpt["s2"], first_column=32)
    assert torch.equal(one.w13_weight, stacked.w13_weight) and torch.equal(one.w2_weight, stacked.w2_weight)
    assert torch.equal(one.w13_weight_scale, stacked.w13_weight_scale)
