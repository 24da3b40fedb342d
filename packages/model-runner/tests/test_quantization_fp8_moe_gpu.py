"""fp8 mixture-of-experts on a GPU (``-m gpu``), bf16: a random Qwen3-MoE (hidden 512, 32 experts of width 256, top-4,
4 layers) written as a 128 x 128 block-wise fp8 checkpoint in the test (fp8_block_checkpoints.py), loaded as it is,
as a static per-tensor one (Mixtral-8x7B-Instruct-FP8 style: fp8_moe_checkpoints.py, the experts' inputs quantized
with one calibrated scale per layer and GEMM), and online fp8 of the same model; dummy weights for
benchmarks/configs/qwen3-30b-a3b-fp8.

- teacher-forced top-1 of the CUDA bf16 engine (Triton fused MoE on fp8 tensor cores, block-scaled dense
  projections) against the fp32 torch reference on CPU (fp8_moe_reference.py) over 370 positions: printed, >= 0.75
  (as for the dense fp8 checkpoints: bf16 rounding flips some activations' e4m3 rounding);
- CUDA-graph decode equals eager (tokens; hidden states within bf16 noise), for the checkpoint and online fp8;
- the Qwen3-30B-A3B-FP8-shaped dummy model builds fp8 experts with 128 x 128 block grids, its MoE layers pick the
  Triton fp8 kernel, and it decodes batches of 1 to 3 sequences (the model gpu_e2e.py's moe_latency_fp8 times).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from fp8_block_checkpoints import BlockFormat, write_block_checkpoint
from fp8_checkpoints import Fp8Format, quantization_config, read_checkpoint, write_checkpoint
from fp8_moe_checkpoints import moe_fp8_tensors
from fp8_moe_reference import moe_block_reference, moe_channel_reference
from quant_gpu import gpu_runner, top1_agreement
from test_quantization_fp8_gpu import SMALL
from test_runner_fakes import FakeScheduler, check_graph_decode_equals_eager, release_gpu_runner

from treadle_moe import FusedMoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QWEN3_30B_FP8 = Path(__file__).resolve().parents[3] / "benchmarks" / "configs" / "qwen3-30b-a3b-fp8"
FMT = BlockFormat("fp8", (128, 128))
STATIC = Fp8Format("fp8", "tensor", static=True)


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


@pytest.fixture(scope="module")
def checkpoint(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moe_fp8")
    write_block_checkpoint(hf, path, FMT)
    return path


def test_top1_agrees_with_the_torch_reference(hf: Any, checkpoint: Path) -> None:
    runner = gpu_runner(checkpoint)
    experts = runner._require_model().model.layers[0].mlp.experts
    assert experts.fp8_layout is not None and experts.fp8_layout.block == (128, 128)
    ref = moe_block_reference(hf, read_checkpoint(checkpoint), FMT.block)
    positions, agreement = top1_agreement(runner, ref, "qwen3-moe block fp8")
    assert "triton_fused" in experts.describe() and "fp8 tensor cores" in experts.describe()
    assert positions == 370 and agreement >= 0.75, agreement


@pytest.fixture(scope="module")
def static_checkpoint(
    hf: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("moe_fp8_static")
    tensors = moe_fp8_tensors(hf, STATIC)
    write_checkpoint(hf, path, tensors, quantization_config(STATIC))
    return path, tensors


def test_static_checkpoint_top1_agrees_with_the_torch_reference(
    hf: Any, static_checkpoint: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, tensors = static_checkpoint
    runner = gpu_runner(path)
    experts = runner._require_model().model.layers[0].mlp.experts
    assert experts.fp8_layout is not None and experts.fp8_layout.static_activations
    positions, agreement = top1_agreement(runner, moe_channel_reference(hf, tensors), "qwen3-moe static fp8")
    assert "triton_fused" in experts.describe() and "static per-tensor activations" in experts.describe()
    assert positions == 370 and agreement >= 0.75, agreement


@pytest.mark.parametrize("kind", ["checkpoint", "static", "online"])
def test_cuda_graph_decode_equals_eager(
    hf: Any, checkpoint: Path, static_checkpoint: tuple[Path, Any], kind: str, tmp_path: Path
) -> None:
    path = static_checkpoint[0] if kind == "static" else checkpoint
    online = kind == "online"
    if online:
        path = tmp_path / "bf16"
        hf.save_pretrained(path, safe_serialization=True)
    quantization = "fp8" if online else None
    make = lambda eager: gpu_runner(path, eager=eager, quantization=quantization)  # noqa: E731
    check_graph_decode_equals_eager(make, SMALL["vocab_size"])


def test_qwen3_30b_a3b_fp8_dummy_weights_decode() -> None:
    runner = gpu_runner(QWEN3_30B_FP8, load_format="dummy", max_model_len=1024)
    layers = [m for m in runner._require_model().modules() if isinstance(m, FusedMoE)]
    assert len(layers) == 48 and all(m.w13_weight.dtype == torch.float8_e4m3fn for m in layers)
    assert layers[0].w13_weight_scale is not None and tuple(layers[0].w13_weight_scale.shape) == (128, 12, 16)
    assert layers[0].w2_weight_scale is not None and tuple(layers[0].w2_weight_scale.shape) == (128, 16, 6)
    sched = FakeScheduler(runner)
    for i, n in enumerate((3, 40, 130)):
        sched.add(f"r{i}", list(range(1, n + 1)), max_tokens=8)
    assert all(len(tokens) == 8 for tokens in sched.run(budget=256).values())
    assert "triton_fused" in layers[0].describe() and "block-wise (128x128" in layers[0].describe()
    release_gpu_runner(runner)
