"""Block-wise fp8 checkpoints on a GPU (``-m gpu``), bf16: a random Llama (hidden 512, 2 key/value heads of 64, so k
and v are one 128-row block each) quantized block-wise (128 x 128) in the test and written in both spellings
(fp8_block_checkpoints.py), loaded as they are; and dummy weights for a Qwen3-8B-FP8 config.json.

- teacher-forced top-1 of the CUDA bf16 engine (the Triton one-row kernel in decode, the block-scaled GEMM quantizing
  its own activations up to 64 rows, the group quantization kernel + GEMM beyond) against the fp32 torch reference on
  CPU (fp8_block_checkpoints.block_reference: dequantized weights, activations quantized per group of 128) over 370
  positions: printed, >= 0.75 (as for the per-channel checkpoints: bf16 rounding flips some activations' e4m3
  rounding, which four random layers amplify);
- CUDA-graph decode equals eager (tokens; hidden states within bf16 noise);
- benchmarks/configs/qwen3-8b-fp8 with --load-format dummy builds fp8 projections with 128 x 128 block scales and
  decodes (the shapes benchmarks/fp8_block_gemm.py times).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fp8_block_checkpoints import BlockFormat, block_reference, write_block_checkpoint
from fp8_checkpoints import read_checkpoint
from quant_gpu import gpu_runner, peaked_llama, top1_agreement
from test_quantization_fp8_gpu import SMALL
from test_runner_fakes import (
    FakeScheduler,
    check_graph_decode_equals_eager,
    release_gpu_runner,
)

from treadle_model_runner.layers.linear import Linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FORMATS = {
    "fp8": BlockFormat("fp8", (128, 128)),
    "ct": BlockFormat("compressed-tensors", (128, 128), num_shards=2),
}
QWEN3_8B_FP8 = Path(__file__).resolve().parents[3] / "benchmarks" / "configs" / "qwen3-8b-fp8"


@pytest.fixture(scope="module")
def hf() -> Any:
    return peaked_llama()


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoint(request: pytest.FixtureRequest, hf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    write_block_checkpoint(hf, path, FORMATS[request.param])
    return path


def test_top1_agrees_with_the_torch_reference(hf: Any, checkpoint: Path) -> None:
    runner = gpu_runner(checkpoint)
    assert "128x128 block" in runner.describe()["quantization"]
    ref = block_reference(hf, read_checkpoint(checkpoint), (128, 128), True)
    positions, agreement = top1_agreement(runner, ref, checkpoint.name)
    assert positions == 370 and agreement >= 0.75, agreement


def test_cuda_graph_decode_equals_eager(checkpoint: Path) -> None:
    check_graph_decode_equals_eager(lambda eager: gpu_runner(checkpoint, eager=eager), SMALL["vocab_size"])


def test_qwen3_8b_fp8_dummy_weights_decode() -> None:
    runner = gpu_runner(QWEN3_8B_FP8, load_format="dummy", max_model_len=1024)
    layers = [m for m in runner._require_model().modules() if isinstance(m, Linear)]
    assert len(layers) == 4 * 36 and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    qkv = layers[0]
    assert qkv.weight_scale is not None and tuple(qkv.weight_scale.shape) == (
        (4096 + 2 * 1024) // 128,
        4096 // 128,
    )
    sched = FakeScheduler(runner)
    for i, n in enumerate((3, 40, 130)):
        sched.add(f"r{i}", list(range(1, n + 1)), max_tokens=8)
    assert all(len(tokens) == 8 for tokens in sched.run(budget=256).values())
    release_gpu_runner(runner)
