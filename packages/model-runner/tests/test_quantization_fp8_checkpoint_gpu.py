"""fp8 checkpoints on a GPU (``-m gpu``), bf16: a random Llama quantized in the test and written as a compressed-tensors
FP8-dynamic checkpoint (per-channel weights, dynamic per-token activations, sharded) and as a quant_method fp8
static one (per-tensor weights and calibrated input scales), loaded as they are.

- teacher-forced top-1 of the CUDA bf16 engine (Triton fp8 kernel up to 16 rows, quantization kernel +
  torch._scaled_mm beyond, static scales through both) against the fp32 torch reference on CPU
  (fp8_reference.fp8_checkpoint_reference, the files' values and scales) over 370 positions: printed, >= 0.75
  (bf16 rounding flips some activations' e4m3 rounding, which four random layers amplify: the same comparison with
  treadle's bf16 native path on CPU agrees on 0.89 of the positions, in fp32 on all of them);
- CUDA-graph decode equals eager (tokens; hidden states within bf16 noise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fp8_checkpoints import FORMATS, read_checkpoint, write_fp8_checkpoint
from fp8_reference import fp8_checkpoint_reference
from quant_gpu import gpu_runner, peaked_llama, top1_agreement
from test_quantization_fp8_gpu import SMALL
from test_runner_fakes import (
    check_graph_decode_equals_eager,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CHECKPOINTS = ["ct-channel-dynamic", "fp8-static"]


@pytest.fixture(scope="module")
def hf() -> Any:
    return peaked_llama()


@pytest.fixture(scope="module", params=CHECKPOINTS)
def checkpoint(request: pytest.FixtureRequest, hf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    write_fp8_checkpoint(hf, path, FORMATS[request.param])
    return path


def test_top1_agrees_with_the_torch_reference(hf: Any, checkpoint: Path) -> None:
    runner = gpu_runner(checkpoint)
    assert runner.describe()["quantization"].startswith("fp8 checkpoint")
    ref = fp8_checkpoint_reference(hf, read_checkpoint(checkpoint))
    positions, agreement = top1_agreement(runner, ref, checkpoint.name)
    assert positions == 370 and agreement >= 0.75, agreement


def test_cuda_graph_decode_equals_eager(checkpoint: Path) -> None:
    check_graph_decode_equals_eager(lambda eager: gpu_runner(checkpoint, eager=eager), SMALL["vocab_size"])
