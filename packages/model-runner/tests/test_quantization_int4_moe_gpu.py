"""4-bit mixture-of-experts on a GPU (``-m gpu``), bf16: a random Qwen3-MoE (hidden 512, 32 experts of width 256, top-4,
4 layers) written as GPTQ checkpoints in groups of 128 in the test (int4_checkpoints.py: symmetric; asymmetric with
act order), loaded as they are; dummy weights for benchmarks/configs/qwen3-30b-a3b-gptq-int4.

- teacher-forced top-1 of the CUDA bf16 engine (Triton W4A16 fused MoE and dense W4A16 projections) against the
  fp32 HF model on CPU running the dequantized weights over 370 positions: printed, >= 0.85 as in the dense 4-bit
  test (bf16 activations are the only difference: the weights are the same exact values);
- CUDA-graph decode equals eager (tokens; hidden states within bf16 noise);
- the Qwen3-30B-A3B-GPTQ-Int4-shaped dummy model builds 4-bit experts (packed [128, 256, 1536] words, 16 groups),
  its MoE layers pick Triton fused MoE, and it decodes batches of 1 to 3 sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from int4_checkpoints import Int4Format, dequantized_reference, write_int4_checkpoint
from quant_gpu import gpu_runner, top1_agreement
from test_quantization_fp8_gpu import SMALL
from test_runner_fakes import FakeScheduler, check_graph_decode_equals_eager, release_gpu_runner

from treadle_moe import FusedMoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QWEN3_30B_GPTQ = Path(__file__).resolve().parents[3] / "benchmarks" / "configs" / "qwen3-30b-a3b-gptq-int4"
FORMATS = {"gptq-sym": Int4Format("gptq", group_size=128, symmetric=True),
           "gptq-asym-act-order": Int4Format("gptq", group_size=128, act_order=True)}  # fmt: skip


@pytest.fixture(scope="module")
def hf() -> Any:
    """The random HF Qwen3-MoE, its lm_head scaled so top-1 is not decided by noise."""
    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(**SMALL, head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                               norm_topk_prob=True, eos_token_id=None, bos_token_id=None)  # fmt: skip
    model = tf.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoint(
    request: pytest.FixtureRequest, hf: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp(request.param)
    dequantized = write_int4_checkpoint(hf, path, FORMATS[request.param])
    return path, dequantized_reference(hf, dequantized)


def test_top1_agrees_with_the_dequantized_reference(checkpoint: tuple[Path, Any]) -> None:
    path, ref = checkpoint
    runner = gpu_runner(path)
    experts = runner._require_model().model.layers[0].mlp.experts
    assert experts.int4_layout is not None and experts.int4_layout.group_size == 128
    assert "triton_fused" in experts.describe() and "unpacked in registers" in experts.describe()
    positions, agreement = top1_agreement(runner, ref, f"qwen3-moe {path.name}")
    assert positions == 370 and agreement >= 0.85, agreement


def test_cuda_graph_decode_equals_eager(checkpoint: tuple[Path, Any]) -> None:
    path, _ = checkpoint
    check_graph_decode_equals_eager(lambda eager: gpu_runner(path, eager=eager), SMALL["vocab_size"])


def test_qwen3_30b_a3b_gptq_int4_dummy_weights_decode() -> None:
    runner = gpu_runner(QWEN3_30B_GPTQ, load_format="dummy", max_model_len=1024)
    layers = [m for m in runner._require_model().modules() if isinstance(m, FusedMoE)]
    assert len(layers) == 48 and all(m.w13_weight.dtype == torch.int32 for m in layers)
    assert tuple(layers[0].w13_weight.shape) == (128, 256, 1536)
    scales = layers[0].int4_scales()
    assert scales is not None and tuple(scales.w13_scale.shape) == (128, 16, 1536)
    sched = FakeScheduler(runner)
    for i, n in enumerate((3, 40, 130)):
        sched.add(f"r{i}", list(range(1, n + 1)), max_tokens=8)
    assert all(len(tokens) == 8 for tokens in sched.run(budget=256).values())
    assert "triton_fused" in layers[0].describe() and "w4a16 (group size 128" in layers[0].describe()
    release_gpu_runner(runner)
