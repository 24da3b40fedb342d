"""Block-wise fp8 checkpoints (DeepSeek-V3 / Qwen3-FP8 style) against independent references (CPU, fp32).

A tiny random Llama (attention and MLP biases; hidden 72 with 16 x 32 blocks, so o_proj's and down_proj's N and
every K end in a ragged block) and a tiny Qwen3 (q/k norms) are quantized block-wise in the test with torch's e4m3
cast and written in both spellings (fp8_block_checkpoints.py: quant_method fp8 with weight_block_size and
`weight_scale_inv`; compressed-tensors strategy "block" with group activations and `weight_scale`; one sharded, one
with an ignored projection). The runner loads each with no --quantization, and:
- a mixed step's logits are within 1e-4 of the reference that dequantizes the files' weights and quantizes every
  projection's input per token in groups of block_k (what the checkpoints' GEMM computes), and far from the
  unquantized model's; greedy continuations equal that reference's `generate`;
- against plain HF on the dequantized weights (activations not quantized) the logits differ by what the activation
  quantization costs: e4m3 keeps 3 mantissa bits, so each input value moves by at most 2^-4 of itself, about 2.5 %
  RMS, and so does each projection's output; eight quantized inputs (four projections, two layers) add up to about
  sqrt(8) x 2.5 % ~ 7 % of the logits' norm (measured 7.4-8.3 %): required between 2 % (the activations were
  quantized) and 12 %, with the group reference at least 50 times closer;
- the projections hold the files' bytes and block scales exactly, stacked along N in block units; ignored ones stay
  fp32;
- dummy weights for such a config.json are fp8 with block scales (each tile's amax / 448 of the dummy fp32 weight);
- bad block sizes, missing or misnamed `weight_scale_inv` and scale grids of the wrong shape are refused naming
  config.json and its field, or the tensor. Block-wise MoE checkpoints load: test_quantization_fp8_moe.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from fp8_block_checkpoints import BlockFormat, block_reference, quantization_config, write_block_checkpoint
from fp8_checkpoints import write_checkpoint
from test_models import COMMON
from test_models import _phi3_config as phi3_config
from test_quantization_fp8 import check_greedy_continuations, check_mixed_batch_logits
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden

from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.loader import make_dummy_model_dir

STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LLAMA = {**COMMON, "hidden_size": 72, "intermediate_size": 96, "head_dim": 16, "attention_bias": True,
         "mlp_bias": True}  # fmt: skip
CASES = {
    "llama-fp8": ("llama", BlockFormat("fp8", (16, 32))),
    "qwen3-fp8-sharded": ("qwen3", BlockFormat("fp8", (32, 16), ignore=("layers.1.mlp.down_proj",), num_shards=2)),
    "llama-ct": ("llama", BlockFormat("compressed-tensors", (16, 32), ignore=(r"re:.*layers\.0\.self_attn\.o_proj$",))),
    "qwen3-ct": ("qwen3", BlockFormat("compressed-tensors", (16, 16))),
    # Phi-4-mini's checkpoint stacks qkv_proj and gate_up_proj: one block grid each, cut into the shards' block rows
    "phi3-stacked-fp8": ("phi4_mini", BlockFormat("fp8", (16, 32))),
}  # fmt: skip


def _hf(arch: str) -> Any:
    torch.manual_seed(0)
    if arch == "llama":
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).eval()
    elif arch == "phi4_mini":
        config, cls = phi3_config(arch), tf.Phi3ForCausalLM
        hf = cls(config).eval()
    else:
        hf = tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=16)).eval()
    perturb_(hf, seed=1, std=0.15)
    return hf


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    arch, fmt = CASES[request.param]
    hf = _hf(arch)
    path = tmp_path_factory.mktemp(request.param)
    tensors = write_block_checkpoint(hf, path, fmt)
    return hf, fmt, tensors, path


def test_mixed_batch_logits_match_the_group_quantized_reference(checkpoint: tuple[Any, ...]) -> None:
    hf, fmt, tensors, path = checkpoint
    check_mixed_batch_logits(make_runner(path), block_reference(hf, tensors, fmt.block, True), hf)


def test_greedy_continuations_match_the_group_quantized_reference(checkpoint: tuple[Any, ...]) -> None:
    hf, fmt, tensors, path = checkpoint
    ref = block_reference(hf, tensors, fmt.block, True)
    check_greedy_continuations(make_runner(path, max_num_batched_tokens=16), ref)


def _prefill_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    runner = make_runner(path)
    sched = FakeScheduler(runner, seed=1)
    sched.add("p", prompt, max_tokens=1)
    hidden = record_hidden(runner)
    sched.step({"p": len(prompt)})
    with torch.no_grad():
        return runner._require_model().compute_logits(hidden[0]).float()


def test_logits_differ_from_plain_hf_by_the_activation_quantization(checkpoint: tuple[Any, ...]) -> None:
    hf, fmt, tensors, path = checkpoint
    prompt = torch.randint(1, 160, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    got = _prefill_logits(path, prompt)
    with torch.no_grad():
        grouped = block_reference(hf, tensors, fmt.block, True)(torch.tensor([prompt])).logits[0].float()
        plain = block_reference(hf, tensors, fmt.block, False)(torch.tensor([prompt])).logits[0].float()
    to_plain = float((got - plain).norm() / plain.norm())
    to_grouped = float((got - grouped).norm() / grouped.norm())
    # measured 0.074-0.083 (the four checkpoints); skipping the activation quantization would make it ~0
    assert 0.02 < to_plain < 0.12, (
        f"{to_plain:.3g} of the logits' norm from plain HF on the dequantized weights"
    )
    assert to_grouped * 50 < to_plain, f"{to_grouped:.3g} from the group reference against {to_plain:.3g}"


def test_projections_hold_the_files_bytes_and_block_scales(checkpoint: tuple[Any, ...]) -> None:
    _, fmt, files, path = checkpoint
    model = make_runner(path)._require_model()
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        prefix, _, leaf = name.rpartition(".")
        # a stacked projection's shards, unless the checkpoint holds it stacked (Phi-3)
        parts = [name] if f"{name}.weight" in files else [f"{prefix}.{p}" for p in STACKED.get(leaf, (leaf,))]
        if f"{parts[0]}.{fmt.scale_name}" not in files:  # ignored: the file's fp32 weight, no scales
            assert layer.weight.dtype == torch.float32 and layer.weight_scale is None, name
            assert layer.weight_block is None, name
            continue
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_block is not None, name
        assert (layer.weight_block.block_n, layer.weight_block.block_k) == fmt.block, name
        expected = torch.cat([files[f"{p}.weight"].view(torch.uint8) for p in parts])
        assert torch.equal(layer.weight.view(torch.uint8), expected), name
        assert torch.equal(layer.weight_scale, torch.cat([files[f"{p}.{fmt.scale_name}"] for p in parts])), (
            name
        )
        assert layer.input_scale is None, name
        checked += 1
    assert checked == 4 * model.config.num_hidden_layers - (1 if fmt.ignore else 0)
    assert model.lm_head.weight.dtype == torch.float32


QWEN3_FP8 = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [16, 32],
}


def _config_dir(tmp_path: Path, config: Any, quant: dict[str, Any], name: str = "model") -> Path:
    path = make_dummy_model_dir(config, tmp_path / name)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "quantization_config": quant}))
    return path


def test_dummy_weights_are_fp8_with_block_scales(tmp_path: Path) -> None:
    """A Qwen3-FP8-style config.json with --load-format dummy: every projection holds fp8 values and one scale per
    16 x 32 tile, the tile's amax / 448 of the dummy fp32 weight the same seed gives without the quantization."""
    config = tf.Qwen3Config(**COMMON, head_dim=16)
    plain = make_runner(
        make_dummy_model_dir(config, tmp_path / "plain"), load_format="dummy"
    )._require_model()
    runner = make_runner(_config_dir(tmp_path, config, QWEN3_FP8), load_format="dummy")
    assert runner.describe()["quantization"] == "fp8 (dummy weights, 16x32 block scales)"
    model = runner._require_model()
    layers = dict(plain.named_modules())
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        original = layers[name].weight.detach()
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale is not None, name
        assert layer.weight_block is not None and (
            layer.weight_block.block_n,
            layer.weight_block.block_k,
        ) == (16, 32)
        n, k = original.shape
        tiles = original.reshape(n // 16, 16, -(-k // 32), 32).abs().amax(dim=(1, 3))
        torch.testing.assert_close(layer.weight_scale, tiles / 448, rtol=1e-6, atol=0)
        restored = layer.weight.float() * layer.weight_scale.repeat_interleave(16, 0).repeat_interleave(32, 1)
        assert (
            float((restored - original).abs().max()) <= float(tiles.max()) / 448 * 16
        )  # half an e4m3 step at 448
    sched = FakeScheduler(runner)
    sched.add("a", [5, 6, 7], max_tokens=3)
    assert len(sched.run(budget=8)["a"]) == 3  # the block-scaled forward runs


def _edited_checkpoint(tmp_path: Path, fmt: BlockFormat, edit: Any) -> Path:
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).eval()
    path = tmp_path / "ckpt"
    tensors = write_block_checkpoint(hf, path, fmt)
    quant = quantization_config(fmt)
    edit(tensors, quant)
    for file in path.glob("*.safetensors*"):
        file.unlink()
    write_checkpoint(hf, path, tensors, quant)
    return path


FP8 = BlockFormat("fp8", (16, 32))
Q = "model.layers.0.self_attn.q_proj"
BROKEN = {
    "missing weight_scale_inv": (FP8, lambda t, q: t.pop(f"{Q}.weight_scale_inv"),
                                 rf"checkpoint .*ckpt \(model\.safetensors\) is missing 1 tensors LlamaForCausalLM "
                                 rf"needs: {Q}\.weight_scale_inv \("),
    "weight_scale spelling": (FP8, lambda t, q: t.update({f"{Q}.weight_scale": t.pop(f"{Q}.weight_scale_inv")}),
                              rf"'{Q}\.weight_scale': config\.json's quantization_config names this checkpoint's "
                              r"weight scales 'weight_scale_inv'"),
    "scale grid shape": (FP8, lambda t, q: t.update({f"{Q}.weight_scale_inv": torch.ones(4, 2)}),
                         rf"'{Q}\.weight_scale_inv' has shape \(4, 2\); with .*config\.json's quantization_config\."
                         r"weight_block_size \[16, 32\] its \[64, 72\] weight has \(4, 3\) block scales"),
    "block splits a shard": (FP8, lambda t, q: q.update(weight_block_size=[48, 32]),
                             r"config\.json's quantization_config\.weight_block_size \[48, 32\]: model\.layers\.0\."
                             r"self_attn\.qkv_proj cannot hold block-wise scales: its q shard \(64 rows\) is not a "
                             r"multiple of block_n 48"),
    "ct group size": (BlockFormat("compressed-tensors", (16, 32)),
                      lambda t, q: q["config_groups"]["group_0"]["input_activations"].update(group_size=16),
                      r"config\.json: quantization_config\.config_groups\.group_0\.input_activations\.group_size "
                      r"is 16: per-group activations must use the weights' block_k \(32\)"),
    "block size": (FP8, lambda t, q: q.update(weight_block_size=[16, 0]),
                   r"config\.json: quantization_config\.weight_block_size is \[16, 0\]: it must be \[block_n, "
                   r"block_k\], two positive integers"),
    "scale format": (FP8, lambda t, q: q.update(scale_fmt="ue8m0"), r"quantization_config\.scale_fmt is 'ue8m0'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_block_checkpoints_are_refused_by_name(tmp_path: Path, case: str) -> None:
    fmt, edit, match = BROKEN[case]
    with pytest.raises(ValueError, match=match):
        make_runner(_edited_checkpoint(tmp_path, fmt, edit))
