"""DeepSeek-V3 in fp8 (CPU, fp32) against independent fp8 references: the tiny V3 of test_models_deepseek.py (q LoRA
rank 32 and a vocabulary of 160, so every stacked shard is whole 16-row blocks and the shared prompts fit).

- A block-wise checkpoint as DeepSeek-V3 / R1 ship theirs (quant_method fp8, weight_block_size [16, 16],
  `weight_scale_inv`; fp8_block_checkpoints.py, one matrix an expert): q_a_proj, kv_a_proj_with_mqa, q_b_proj,
  o_proj, the dense and shared MLPs and the routed experts load the files' fp8 bytes and block grids; kv_b_proj,
  which MLA reads whole as W_UK / W_UV, holds the files' weight dequantized (value x its tile's scale). Against the
  reference (fp8_moe_reference.moe_block_reference: every projection and expert on the dequantized weights with its
  input quantized per token in groups of 16, kv_b_proj on its dequantized weight with its input as it is), a mixed
  step's logits within 1e-4 (at most 2 of 26 positions within 5e-3, where one activation rounds to the other e4m3
  neighbour) and far from the unquantized model's; greedy continuations equal the reference's `generate`.
- Online fp8 (`quantization="fp8"` on the bf16-style checkpoint): per-channel projections and experts, kv_b_proj
  kept: logits against moe_channel_reference with kv_b_proj unquantized.
- A kv_b_proj weight without its scale, or with a grid of the wrong shape, is named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fp8_block_checkpoints import BlockFormat, dequantize_blocks, write_block_checkpoint
from fp8_moe_reference import moe_block_reference, moe_channel_reference
from test_models_deepseek import tiny_hf
from test_quantization_fp8 import check_greedy_continuations, check_mixed_batch_logits
from test_runner_fakes import make_runner

from treadle_model_runner.models.deepseek_weights import dequantized_latent_up
from treadle_moe import FusedMoE

FMT = BlockFormat("fp8", (16, 16))
KV_B = "model.layers.{}.self_attn.kv_b_proj"


def plain_latent_up(model: Any, weights: dict[str, torch.Tensor] | None = None) -> Any:
    """`model` (a reference) with every kv_b_proj computing in fp32 on `weights[name]` (else its own weight), its
    input unquantized, as MLA's absorbed matmuls run it."""
    for i, layer in enumerate(model.model.layers):
        proj = layer.self_attn.kv_b_proj
        w = proj.weight.detach().float() if weights is None else weights[KV_B.format(i)]
        proj.forward = lambda x, w=w: F.linear(x.float(), w).to(x.dtype)
    return model


@pytest.fixture(scope="module")
def block_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Any, dict[str, torch.Tensor], Path, Any]:
    hf = tiny_hf("v3", q_lora_rank=32, vocab_size=160)
    path = tmp_path_factory.mktemp("deepseek_fp8")
    files = write_block_checkpoint(hf, path, FMT)
    kv_b = {KV_B.format(i): dequantize_blocks(files[f"{KV_B.format(i)}.weight"],
                                              files[f"{KV_B.format(i)}.weight_scale_inv"], *FMT.block)
            for i in range(len(hf.model.layers))}  # fmt: skip
    ref = plain_latent_up(moe_block_reference(hf, files, FMT.block), kv_b)
    return hf, files, path, ref


def test_block_checkpoint_logits_match_the_reference(block_checkpoint: tuple[Any, ...]) -> None:
    hf, _, path, ref = block_checkpoint
    check_mixed_batch_logits(make_runner(path), ref, hf, max_flipped=2)


def test_block_checkpoint_greedy_matches_the_reference(block_checkpoint: tuple[Any, ...]) -> None:
    _, _, path, ref = block_checkpoint
    check_greedy_continuations(make_runner(path, max_num_batched_tokens=16), ref)


def test_block_checkpoint_holds_the_files_bytes_and_a_dequantized_kv_b_proj(
    block_checkpoint: tuple[Any, ...],
) -> None:
    _, files, path, _ = block_checkpoint
    model = make_runner(path)._require_model()
    for i, layer in enumerate(model.model.layers):
        attn, prefix = layer.self_attn, f"model.layers.{i}.self_attn"
        fused = torch.cat([files[f"{prefix}.q_a_proj.weight"], files[f"{prefix}.kv_a_proj_with_mqa.weight"]])
        assert torch.equal(attn.fused_qkv_a_proj.weight.view(torch.uint8), fused.view(torch.uint8)), i
        for name in ("q_b_proj", "o_proj"):
            proj = getattr(attn, name)
            assert torch.equal(
                proj.weight.view(torch.uint8), files[f"{prefix}.{name}.weight"].view(torch.uint8)
            )
            assert torch.equal(proj.weight_scale, files[f"{prefix}.{name}.weight_scale_inv"]), (i, name)
        kv_b = dequantize_blocks(files[f"{prefix}.kv_b_proj.weight"], files[f"{prefix}.kv_b_proj.weight_scale_inv"],
                                 *FMT.block)  # fmt: skip
        assert attn.kv_b_proj.weight.dtype == torch.float32
        assert torch.equal(attn.kv_b_proj.weight, kv_b), i
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert len(experts) == 2 and all(
        m.fp8_layout is not None and m.fp8_layout.block == FMT.block for m in experts
    )
    shared = model.model.layers[1].mlp.shared_experts.down_proj
    assert shared.weight.dtype == torch.float8_e4m3fn and shared.weight_block is not None


def test_online_fp8_keeps_kv_b_proj_and_matches_the_channel_reference(tmp_path: Path) -> None:
    hf = tiny_hf("v3", q_lora_rank=32, vocab_size=160)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    runner = make_runner(tmp_path, quantization="fp8")
    attn = runner._require_model().model.layers[0].self_attn
    assert attn.o_proj.weight.dtype == torch.float8_e4m3fn
    assert attn.kv_b_proj.weight.dtype == torch.float32
    assert torch.equal(attn.kv_b_proj.weight, hf.model.layers[0].self_attn.kv_b_proj.weight)
    check_mixed_batch_logits(runner, plain_latent_up(moe_channel_reference(hf)), hf, max_flipped=2)


def test_incomplete_or_misshapen_kv_b_proj_is_named(block_checkpoint: tuple[Any, ...]) -> None:
    _, files, _, _ = block_checkpoint
    weight, scale = f"{KV_B.format(1)}.weight", f"{KV_B.format(1)}.weight_scale_inv"
    with pytest.raises(ValueError, match=rf"'{weight}' comes without its scale"):
        list(dequantized_latent_up([(weight, files[weight])], FMT.block))
    with pytest.raises(ValueError, match=rf"'{scale}' comes without an fp8 weight"):
        list(dequantized_latent_up([(scale, files[scale]), (weight, files[weight].float())], FMT.block))
    with pytest.raises(ValueError, match=rf"'{weight}'.*grid of \(10, 2\).*holds \(10, 1\)"):
        list(dequantized_latent_up([(scale, files[scale][:, :1]), (weight, files[weight])], FMT.block))
    # scale first, then weight: one dequantized tensor; everything else passes through
    out = list(
        dequantized_latent_up(
            [(scale, files[scale]), ("x", files[scale]), (weight, files[weight])], FMT.block
        )
    )
    assert [n for n, _ in out] == ["x", weight] and out[1][1].dtype == torch.float32
