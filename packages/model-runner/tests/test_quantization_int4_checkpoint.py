"""4-bit weight-only checkpoints (AWQ, GPTQ, compressed-tensors W4A16) against an independent reference (CPU, fp32).

A tiny random Llama (attention and MLP biases) and Qwen2 (q/k/v biases, tied embeddings), in one format each a
Qwen3, a Mistral and a Gemma 3, and Phi-3 models in three formats, are quantized in the test
(int4_checkpoints.py: packing written from the formats' layouts) and written in each format: AWQ grouped (sharded,
one ignored projection) and per channel; GPTQ symmetric, with act order (desc_act) symmetric and asymmetric (v1 zero
points), and gptq_v2; compressed-tensors symmetric (sharded), asymmetric (one ignored projection) and with actorder
"group". Phi-3's checkpoints hold qkv_proj and gate_up_proj stacked, and 4-bit ones quantize each as one projection
(AutoAWQ and GPTQ quantize the HF module: one qweight with every part's columns, one scale set, one g_idx): a
Phi-4-mini-like model (partial rotary, tied embeddings) as AWQ and as GPTQ with act order and zero points, a Phi-3
(sliding window, longrope on its short factors) as compressed-tensors with actorder. The runner loads each with no
--quantization (detected from config.json), and:
- a mixed step's logits are within 1e-4 of the HF model running the weights the files dequantize to, far from the
  unquantized model's; greedy continuations equal that reference's `generate`;
- each 4-bit projection's tensors dequantize exactly to the reference's weights (the shards of a stacked one side by
  side); ignored ones, the embedding and the lm_head stay fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from int4_checkpoints import FORMATS, dequantized_reference, write_int4_checkpoint
from test_models import RUNNER_KWARGS, _config
from test_quantization_fp8 import check_greedy_continuations, check_mixed_batch_logits
from test_runner_fakes import make_runner, perturb_

from treadle_ir.ops.int4 import dequantize_int4
from treadle_model_runner.layers.linear import Linear

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi4_mini", "phi3"]
# every format on Llama and Qwen2; one each on Qwen3 (q/k norms), Mistral (sliding window), Gemma 3 (GELU MLP); Phi-3
# (stacked projections quantized whole) in three
CASES = [(arch, fmt) for arch in ARCHS[:2] for fmt in FORMATS]
CASES += [("qwen3", "ct-asym"), ("mistral", "awq"), ("gemma3", "gptq-asym-act-order")]
CASES += [("phi4_mini", "awq"), ("phi4_mini", "gptq-asym-act-order"), ("phi3", "ct-sym-act-order")]
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _hf(arch: str) -> Any:
    config, cls = _config(arch)
    torch.manual_seed(ARCHS.index(arch))
    hf = cls(config).eval()
    perturb_(hf, seed=1, std=0.15)
    return hf


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{f}" for a, f in CASES])
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Any, dict[str, torch.Tensor], Path]:
    arch, fmt = request.param
    hf = _hf(arch)
    path = tmp_path_factory.mktemp(f"{arch}-{fmt}") / arch  # the architecture's name: its runner settings
    dequantized = write_int4_checkpoint(hf, path, FORMATS[fmt])
    return hf, dequantized_reference(hf, dequantized), dequantized, path


def _runner(path: Path, **kwargs: Any) -> Any:
    """The checkpoint's runner, with its architecture's runner settings (Phi-3: max_model_len, test_models.py)."""
    return make_runner(path, **RUNNER_KWARGS.get(path.name, {}), **kwargs)


def test_mixed_batch_logits_match_the_dequantized_reference(checkpoint: tuple[Any, ...]) -> None:
    hf, ref, _, path = checkpoint
    check_mixed_batch_logits(_runner(path), ref, hf)


def test_greedy_continuations_match_the_dequantized_reference(checkpoint: tuple[Any, ...]) -> None:
    _, ref, _, path = checkpoint
    check_greedy_continuations(_runner(path, max_num_batched_tokens=16), ref)


def test_projections_dequantize_to_the_files_weights(checkpoint: tuple[Any, ...]) -> None:
    hf, _, dequantized, path = checkpoint
    runner = _runner(path)
    model = runner._require_model()
    assert runner.describe()["quantization"].startswith("4-bit checkpoint")
    checked = 0
    hf_modules = dict(hf.named_modules())
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        prefix, _, leaf = name.rpartition(".")
        # Phi-3's checkpoint holds the stacked projection itself; Llama's its parts
        parts = [name] if name in hf_modules else [f"{prefix}.{p}" for p in STACKED[leaf]]
        if parts[0] not in dequantized:  # ignored: the file's fp32 weight
            assert layer.packed_weight is None and layer.weight.dtype == torch.float32, name
            hf_weights = [hf.get_submodule(p).weight for p in parts]
            assert torch.equal(layer.weight, torch.cat(hf_weights)), name
            continue
        assert layer.weight is None and layer.packed_weight is not None and not layer.fusable, name
        got = dequantize_int4(layer.packed_weight, layer.group_scale, layer.group_zero, layer.group_index,
                              layer.group_size)  # fmt: skip
        assert torch.equal(got.t(), torch.cat([dequantized[p] for p in parts])), name
        checked += 1
    assert checked >= 4 * model.config.num_hidden_layers - 1
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
