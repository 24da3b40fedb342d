"""4-bit checkpoints on a GPU (``-m gpu``), bf16: a random Llama quantized in the test (int4_checkpoints.py, groups of
128) and written as AWQ, GPTQ with act order and zero points, and compressed-tensors symmetric W4A16, loaded as they
are; and an 8B-shaped dummy model with a 4-bit config.json.

- teacher-forced top-1 of the CUDA bf16 engine (the Triton W4A16 kernel at every row count: split K for decode,
  large tiles for the 370-token prefill) against the fp32 HF model on the dequantized weights, on CPU: printed,
  >= 0.85 (bf16 activations, and the fp16 scales rounded to bf16 as vLLM does for bf16 models);
- CUDA-graph decode equals eager (tokens; hidden states within bf16 noise);
- Llama-3.1-8B's shapes with an AWQ config.json and dummy weights: every projection 4-bit, the weights under 6 GiB
  (4-bit codes + fp16 scales + the bf16 embedding and lm_head), and a batch decodes with CUDA graphs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from int4_checkpoints import Int4Format, dequantized_reference, write_int4_checkpoint
from quant_gpu import gpu_runner, peaked_llama, top1_agreement
from test_quantization_fp8_gpu import SMALL
from test_runner_fakes import (
    FakeScheduler,
    check_graph_decode_equals_eager,
    release_gpu_runner,
)

from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.quantization import weight_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CHECKPOINTS = {
    "awq": Int4Format("awq", group_size=128),
    "gptq-act-order": Int4Format("gptq", group_size=128, act_order=True),
    "ct-sym": Int4Format("compressed-tensors", group_size=128, symmetric=True),
}
LLAMA_8B = Path(__file__).resolve().parents[3] / "benchmarks" / "configs" / "llama-3.1-8b" / "config.json"


@pytest.fixture(scope="module")
def hf() -> Any:
    return peaked_llama()


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request: pytest.FixtureRequest, hf: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    path = tmp_path_factory.mktemp(request.param)
    return path, dequantized_reference(hf, write_int4_checkpoint(hf, path, CHECKPOINTS[request.param]))


def test_top1_agrees_with_the_dequantized_reference(checkpoint: tuple[Path, Any]) -> None:
    path, ref = checkpoint
    runner = gpu_runner(path)
    assert runner.describe()["quantization"].startswith("4-bit checkpoint")
    positions, agreement = top1_agreement(runner, ref, path.name)
    assert positions == 370 and agreement >= 0.85, agreement


def test_cuda_graph_decode_equals_eager(checkpoint: tuple[Path, Any]) -> None:
    path, _ = checkpoint
    check_graph_decode_equals_eager(lambda eager: gpu_runner(path, eager=eager), SMALL["vocab_size"])


def test_llama_8b_shapes_with_dummy_4bit_weights(tmp_path: Path) -> None:
    config = json.loads(LLAMA_8B.read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                     "version": "gemm"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = gpu_runner(tmp_path, load_format="dummy")
    model = runner._require_model()
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(layers) == 4 * 32 and all(m.packed_weight is not None for m in layers)
    gib = weight_bytes(model) / (1 << 30)
    print(f"Llama-3.1-8B shapes, AWQ dummy weights: {gib:.2f} GiB")
    assert gib < 6.0, gib
    sched = FakeScheduler(runner)
    for i in range(8):
        sched.add(f"r{i}", list(range(1 + i, 40 + i)), max_tokens=8)
    tokens = sched.run(budget=512)
    assert all(len(t) == 8 for t in tokens.values())
    release_gpu_runner(runner)
