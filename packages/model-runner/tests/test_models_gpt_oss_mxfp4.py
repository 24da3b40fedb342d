"""gpt-oss's released MXFP4 experts: the dequantizer, and a checkpoint in the released layout against HF.

The test's own encoder (round to the nearest FP4 e2m1 value under a per-block power-of-two scale, two codes a byte
with the even element in the low nibble) and decoder stand in for OpenAI's converter; transformers' dequantizer
(integrations/mxfp4.py `convert_moe_packed_tensors`) is a second, independent reading of the bytes.
- The dequantizer reproduces every representable value exactly (random bytes and exponents), in fp32 and bf16,
  equal to the test's decoder and to transformers'.
- A checkpoint with the released names (`gate_up_proj_blocks` / `_scales`, `down_proj_blocks` / `_scales`, the
  biases plain) and quantization_config loads (one log line on what dequantizing costs) and matches HF run on the
  dequantized weights (model_parity); a blocks tensor without its scales is named.
- quantization_config mxfp4 is refused for a model that cannot read it and with another requested method.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_mixed_batch
from safetensors.torch import load_file, save_file
from test_models_gpt_oss import CONFIG, MXFP4_CONFIG, VOCAB, tiny_hf
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from treadle_model_runner.loader import iterate_weights
from treadle_model_runner.models.gpt_oss import GptOssForCausalLM
from treadle_model_runner.models.qwen3_moe import Qwen3MoeForCausalLM
from treadle_model_runner.quantization import resolve_quantization
from treadle_model_runner.quantization.mxfp4 import dequantize_mxfp4

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def decode(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """codes [..., G, 32] (sign bit 3, magnitude index bits 0-2), exponents [..., G] (unbiased) -> [..., G * 32]."""
    magnitude = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    return (magnitude * torch.pow(2.0, exponents.double()).float().unsqueeze(-1)).flatten(-2)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., 32] -> bytes [..., 16]: element 2j in byte j's low nibble, element 2j + 1 in its high one."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [E, rows, cols] -> (blocks [E, rows, cols / 32, 16], scales [E, rows, cols / 32] uint8, the decoded values
    [E, rows, cols]): each 32-value block scaled by 2^s, s putting its largest magnitude in [4, 8), every value
    rounded to the nearest e2m1 magnitude (6 at most)."""
    blocks = w.float().unflatten(-1, (-1, 32))
    exponent = torch.floor(torch.log2(blocks.abs().amax(-1).clamp_min(2.0**-60))) - 2
    scaled = blocks / torch.pow(2.0, exponent).unsqueeze(-1)
    index = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)
    codes = index | ((scaled < 0).long() << 3)
    return pack(codes), (exponent + 127).to(torch.uint8), decode(codes, exponent)


def test_dequantizer_reproduces_representable_values() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 10, 4, 32), generator=gen)
    scales = torch.randint(127 - 20, 127 + 12, (3, 10, 4), generator=gen).to(torch.uint8)
    blocks = pack(codes)
    expected = decode(codes, scales.long() - 127)  # [3, 10, 128]
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(got, expected)
    assert torch.equal(
        dequantize_mxfp4(blocks, scales, torch.bfloat16).float(), expected
    )  # exact in bf16 too
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2))
    assert torch.equal(dequantize_mxfp4(blocks[1, 2], scales[1, 2], torch.float32), expected[1, 2])
    # the premise: the nibble order matters (the codes are not symmetric under swapping a byte's halves)
    swapped = pack(torch.stack([codes[..., 1::2], codes[..., 0::2]], dim=-1).flatten(-2))
    assert not torch.equal(dequantize_mxfp4(swapped, scales, torch.float32), expected)
    # the encoder the checkpoint test relies on keeps representable values as they are
    again_blocks, again_scales, again = encode(expected)
    assert torch.equal(again, expected)
    assert torch.equal(dequantize_mxfp4(again_blocks, again_scales, torch.float32), expected)


def _mxfp4_checkpoint(hf: Any, path: Path) -> None:
    """Replace `hf`'s expert matrices by their MXFP4 roundings and save `hf` with them in the released layout."""
    hf.save_pretrained(path, safe_serialization=True)
    tensors = load_file(path / "model.safetensors")
    for layer_idx, layer in enumerate(hf.model.layers):
        experts, prefix = layer.mlp.experts, f"model.layers.{layer_idx}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            weight = getattr(
                experts, proj
            )  # transformers' [E, in, out]; the files hold [E, out, in] in blocks
            blocks, scales, decoded = encode(weight.detach().transpose(1, 2))
            del tensors[prefix + proj]
            tensors[prefix + proj + "_blocks"], tensors[prefix + proj + "_scales"] = blocks, scales
            with torch.no_grad():
                weight.copy_(decoded.transpose(1, 2))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG}))


@pytest.fixture(scope="module")
def tiny_mxfp4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    hf = tiny_hf()
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    _mxfp4_checkpoint(hf, path)
    return hf, path


def test_checkpoint_in_the_released_layout_matches_hf(
    tiny_mxfp4: tuple[Any, Path], caplog: pytest.LogCaptureFixture
) -> None:
    hf, path = tiny_mxfp4
    names = {n.removeprefix("model.layers.0.") for n, _ in iterate_weights(path, "safetensors")
             if n.startswith("model.layers.0.mlp.experts.")}  # fmt: skip
    assert names == {
        f"mlp.experts.{p}_{s}" for p in ("gate_up_proj", "down_proj") for s in ("blocks", "scales", "bias")
    }
    with caplog.at_level(logging.INFO, logger="treadle_model_runner"):
        check_mixed_batch(hf, path, VOCAB)
    lines = [m for m in caplog.messages if "dequantized 8 MXFP4 expert matrices" in m]
    assert len(lines) == 1 and "float32" in lines[0], caplog.messages


def test_blocks_without_their_scales_are_named(tiny_mxfp4: tuple[Any, Path]) -> None:
    _, path = tiny_mxfp4
    dropped = "model.layers.3.mlp.experts.down_proj_scales"
    weights = [(n, t) for n, t in iterate_weights(path, "safetensors") if n != dropped]
    model = GptOssForCausalLM(tf.GptOssConfig.from_pretrained(path))
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.experts\.down_proj_blocks"),
    ):
        model.load_weights(weights)


def test_mxfp4_is_refused_elsewhere(tmp_path: Path) -> None:
    config = tf.GptOssConfig(**{**CONFIG, "quantization_config": MXFP4_CONFIG})
    file = tmp_path / "config.json"
    assert resolve_quantization(None, config, GptOssForCausalLM, file, "auto") is None
    assert resolve_quantization("mxfp4", config, GptOssForCausalLM, file, "dummy") is None
    with pytest.raises(ValueError, match="GptOssForCausalLM only, not Qwen3MoeForCausalLM"):
        resolve_quantization(None, config, Qwen3MoeForCausalLM, file, "auto")
    with pytest.raises(ValueError, match=r"quantization 'fp8' was requested.*mxfp4"):
        resolve_quantization("fp8", config, GptOssForCausalLM, file, "auto")
    other = tf.GptOssConfig(**{**CONFIG, "quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ValueError, match="'bitsandbytes', which treadle cannot load"):
        resolve_quantization(None, other, GptOssForCausalLM, file, "auto")
