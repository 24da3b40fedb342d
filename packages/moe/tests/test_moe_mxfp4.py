"""MXFP4 experts (experts/mxfp4.py): the format's decoding and quantizer, the torch reference against the model-dtype
experts on the dequantized weights, and the Triton MXFP4 grouped GEMM (triton_mxfp4_kernels.py; plain and computing
C^T = W A^T) against the reference on the same blocks, in the CPU interpreter (tiny sizes; gpt-oss-20b sizes on GPU:
test_moe_gpu_mxfp4.py)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from moe_cases import DEVICE
from mxfp4_cases import assert_close_to, make_mxfp4_inputs, run_mxfp4

from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.mxfp4 import E2M1_VALUES, dequantize_mxfp4, quantize_experts_mxfp4, quantize_mxfp4

# (tokens, hidden K, intermediate N, experts, top_k, experts left without tokens)
CASES = [(1, 64, 32, 8, 1, 0), (7, 96, 64, 8, 4, 2), (20, 32, 32, 16, 2, 0), (29, 64, 32, 4, 2, 0)]


def test_decoding_by_hand() -> None:
    """Byte 0x2F is nibbles F (low: -6) then 2 (high: 1.0); scale byte 128 is 2^1, 125 is 2^-2."""
    blocks = torch.zeros(2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[1, 0, 15] = 0x2F, 0x1B  # row 1's last byte: B (-1.5) then 1 (0.5)
    scales = torch.tensor([[128], [125]], dtype=torch.uint8)
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    assert w.shape == (2, 32)
    assert w[0, :2].tolist() == [-12.0, 2.0] and w[0, 2:].abs().sum() == 0
    assert w[1, 30:].tolist() == [-0.375, 0.125] and w[1, :30].abs().sum() == 0


def _representable(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols] of e2m1 values times a power of two per block of 32 (some blocks all zero)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor(E2M1_VALUES)[torch.randint(0, 8, (rows, cols), generator=gen)]
    values = values * (1 - 2 * torch.randint(0, 2, (rows, cols), generator=gen))
    exponents = torch.randint(-8, 8, (rows, cols // 32, 1), generator=gen).float()
    w = (values.unflatten(-1, (-1, 32)) * torch.exp2(exponents)).flatten(-2)
    w[0, :32] = 0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantizer_round_trip_is_exact_on_representable_values(dtype: torch.dtype) -> None:
    w = _representable(24, 128, seed=1).to(dtype)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (24, 4, 16) and scales.shape == (24, 4)
    assert blocks.dtype == scales.dtype == torch.uint8
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales, dtype), w, atol=0, rtol=0)
    # the bytes of a dequantized tensor quantize back to themselves (a block whose largest code is below 6 may take
    # a smaller exponent, so compare the values again after a second trip)
    again_blocks, again_scales = quantize_mxfp4(dequantize_mxfp4(blocks, scales, torch.float32))
    torch.testing.assert_close(dequantize_mxfp4(again_blocks, again_scales, dtype), w, atol=0, rtol=0)


def test_quantizer_rounds_to_nearest() -> None:
    """Random values: each within half the gap between its block's neighbouring e2m1 values (at most 1 x scale)."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3)) * 3
    blocks, scales = quantize_mxfp4(w)
    error = (dequantize_mxfp4(blocks, scales, torch.float32) - w).abs().unflatten(-1, (-1, 32))
    scale = torch.exp2(scales.float() - 127).unsqueeze(-1)
    assert (error <= scale * 1.0 + 1e-6).all()
    # the values below 2 x scale are within 0.25 x scale (the grid step there is 0.5)
    small = w.abs().unflatten(-1, (-1, 32)) < 2 * scale
    assert (error[small] <= (scale.expand_as(error)[small] * 0.25 + 1e-6)).all()


def test_quantizer_refuses_ragged_rows() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_mxfp4(torch.randn(4, 48))


@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_reference_is_the_model_dtype_experts_on_dequantized_weights(activation: str) -> None:
    inputs, scales, epilogue = make_mxfp4_inputs((9, 64, 32, 8, 3, 1), torch.float32, 0, "cpu", bias=True)
    out = run_mxfp4("standard-torch", inputs, scales, activation, epilogue)
    plain = dict(inputs, w13=dequantize_mxfp4(inputs["w13"], scales.w13_scale, torch.float32),
                 w2=dequantize_mxfp4(inputs["w2"], scales.w2_scale, torch.float32))  # fmt: skip
    from moe_cases import COMBOS

    from treadle_moe import ModularKernel

    pf_cls, experts_cls, _ = COMBOS["standard-torch"]
    ref = ModularKernel(pf_cls(), experts_cls())(plain["hidden"], plain["w13"], plain["w2"], plain["topk_weights"],
                                                  plain["topk_ids"], activation, epilogue=epilogue)  # fmt: skip
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-K{}-N{}-E{}-k{}-skip{}".format(*c))
@pytest.mark.parametrize(("activation", "bias"), [("swigluoai", True), ("silu", False), ("silu", True)])
@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton"])
def test_triton_mxfp4_matches_reference(
    combo: str, activation: str, bias: bool, case: tuple[int, ...], dtype: torch.dtype, mxfp4_kernel: str
) -> None:
    inputs, scales, epilogue = make_mxfp4_inputs(case, dtype, case[0], DEVICE, bias)
    out = run_mxfp4(combo, inputs, scales, activation, epilogue)
    ref = run_mxfp4("standard-torch", inputs, scales, activation, epilogue)
    assert_close_to(out, ref, dtype)


@pytest.mark.parametrize("combo", ["standard-torch", "standard-triton"])
def test_other_ranks_experts_add_nothing(combo: str) -> None:
    """Expert parallelism: a rank holding experts 0..3 of 8 sees ids >= 4 as -1; those slots add nothing."""
    inputs, scales, epilogue = make_mxfp4_inputs((9, 64, 32, 8, 3, 0), torch.float32, 2, DEVICE, bias=True)
    assert epilogue is not None and epilogue.w13_bias is not None and epilogue.w2_bias is not None
    local_ids = torch.where(inputs["topk_ids"] >= 4, -1, inputs["topk_ids"])
    held = dict(inputs, w13=inputs["w13"][:4], w2=inputs["w2"][:4], topk_ids=local_ids)
    held_scales = type(scales)(scales.w13_scale[:4], scales.w2_scale[:4])
    held_epilogue = ExpertEpilogue(epilogue.w13_bias[:4], epilogue.w2_bias[:4])
    out = run_mxfp4(combo, held, held_scales, "swigluoai", held_epilogue, routed_experts=8)
    # the reference: every expert held, the other ranks' routing weights zeroed
    weights = torch.where(inputs["topk_ids"] >= 4, 0.0, inputs["topk_weights"])
    ref = run_mxfp4("standard-torch", dict(inputs, topk_weights=weights), scales, "swigluoai", epilogue)
    assert_close_to(out, ref, torch.float32)


def test_mismatched_scales_are_refused() -> None:
    inputs, scales, _ = make_mxfp4_inputs((3, 64, 32, 4, 2, 0), torch.float32, 0, "cpu", bias=False)
    bad = type(scales)(scales.w13_scale[:, :, :1].contiguous(), scales.w2_scale)
    with pytest.raises(ValueError, match="one e8m0 exponent per 32 inputs"):
        run_mxfp4("standard-torch", inputs, bad, "silu", None)
    _, wide_w2, _ = quantize_experts_mxfp4(torch.randn(4, 128, 64), torch.randn(4, 64, 64))  # N 64, not 32
    with pytest.raises(ValueError, match="MXFP4 expert blocks disagree"):
        run_mxfp4("standard-torch", dict(inputs, w2=wide_w2), scales, "silu", None)


@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton"])
def test_triton_mxfp4_steps_of_several_scale_blocks(
    combo: str, monkeypatch: pytest.MonkeyPatch, mxfp4_kernel: str
) -> None:
    """BLOCK_K 64 over K 96 (the interpreter's config has 32, one scale block a step): a step of two scale blocks,
    then one whose second block lies past K, as gpt-oss's K of 2880 with BLOCK_K 128 has."""
    from treadle_moe.experts import triton_fused

    monkeypatch.setattr(triton_fused, "INTERPRETER_CONFIG",
                        dataclasses.replace(triton_fused.INTERPRETER_CONFIG, block_k=64))  # fmt: skip
    inputs, scales, epilogue = make_mxfp4_inputs((7, 96, 64, 8, 4, 2), torch.float32, 7, DEVICE, bias=True)
    out = run_mxfp4(combo, inputs, scales, "swigluoai", epilogue)
    ref = run_mxfp4("standard-torch", inputs, scales, "swigluoai", epilogue)
    assert_close_to(out, ref, torch.float32)


def test_tiles_follow_the_rows_per_expert() -> None:
    """The measured tiles: one row per expert, then up to 8 rows swapped; the tables' config past that; the prefill
    tile from 128 rows; given and interpreter configs as they are (BLOCK_K raised to a scale block)."""
    from treadle_moe.configs import BlockConfig
    from treadle_moe.experts.triton_mxfp4 import PREFILL_TILE, mxfp4_config

    table = BlockConfig(64, 128, 16, group_m=8, num_warps=8, num_stages=4)

    def config(tokens: int, source: str = "fallback heuristic") -> BlockConfig:
        return mxfp4_config(table, tokens, 4, 32, source=source)

    assert (config(1).block_n, config(8).block_k, config(8).swap_ab) == (32, 256, False)
    assert (config(9).block_n, config(64).block_k, config(64).swap_ab) == (64, 128, True)
    assert config(65) == dataclasses.replace(table, block_k=32) and config(1016) == config(65)
    assert config(1024) == config(4096) == PREFILL_TILE == BlockConfig(128, 64, 64, 8, 4, 3, swap_ab=True)
    assert config(1, "given") == config(1, "interpreter") == dataclasses.replace(table, block_k=32)
    # the bf16 decode: 2-8 rows not swapped, the rest as the fp32 decode's
    bf16 = functools.partial(mxfp4_config, table, top_k=4, num_experts=32, source="tables", decode="bf16")
    assert (bf16(num_tokens=64).block_n, bf16(num_tokens=64).block_k, bf16(num_tokens=64).swap_ab) == (
        64,
        128,
        False,
    )
    assert [bf16(num_tokens=t) for t in (1, 65, 1024)] == [config(t) for t in (1, 65, 1024)]


def test_decode_kind_follows_dtype_device_and_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 decode only for bf16 activations on a GPU of compute capability 9.0 or later (by default, or asked);
    asked for on an older GPU it is refused by name; fp32 otherwise."""
    from treadle_moe.experts import triton_mxfp4

    gpu = torch.device("cuda", 0)
    capability = {0: (9, 0)}
    monkeypatch.setattr(triton_mxfp4, "_capability", lambda index: capability[index])
    monkeypatch.delenv("TREADLE_MXFP4_DECODE", raising=False)
    kind = triton_mxfp4.decode_kind
    assert kind(torch.bfloat16, gpu) == "bf16"
    assert (
        kind(torch.float16, gpu)
        == kind(torch.float32, gpu)
        == kind(torch.bfloat16, torch.device("cpu"))
        == "fp32"
    )
    monkeypatch.setenv("TREADLE_MXFP4_DECODE", "fp32")
    assert kind(torch.bfloat16, gpu) == "fp32"
    capability[0] = (8, 0)
    monkeypatch.delenv("TREADLE_MXFP4_DECODE")
    assert kind(torch.bfloat16, gpu) == "fp32"
    monkeypatch.setenv("TREADLE_MXFP4_DECODE", "bf16")
    with pytest.raises(
        ValueError, match=r"TREADLE_MXFP4_DECODE=bf16 needs a GPU of compute capability 9.0.*8\.0"
    ):
        kind(torch.bfloat16, gpu)


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton"])
def test_given_tiles_past_the_edges(combo: str, swap_ab: bool) -> None:
    """A given config of 64 columns and 2 scale blocks a step over K 96 and N 32: the last step's second scale block
    and half of the w13 GEMM's columns lie past the edges."""
    from treadle_moe.configs import BlockConfig

    given = BlockConfig(block_m=16, block_n=64, block_k=64, num_stages=1, swap_ab=swap_ab)
    inputs, scales, epilogue = make_mxfp4_inputs((5, 96, 32, 4, 2, 0), torch.float32, 11, DEVICE, bias=True)
    out = run_mxfp4(combo, inputs, scales, "swigluoai", epilogue, block_config=given)
    ref = run_mxfp4("standard-torch", inputs, scales, "swigluoai", epilogue)
    assert_close_to(out, ref, torch.float32)
