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
import transformers as tf
from fp8_block_checkpoints import BlockFormat, block_reference, write_block_checkpoint
from fp8_checkpoints import read_checkpoint
from test_quantization_fp8_gpu import SMALL
from test_runner_fakes import (
    FakeScheduler,
    check_graph_decode_equals_eager,
    record_hidden,
    release_gpu_runner,
)

from treadle_model_runner import CacheConfig, ModelConfig
from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.runner import ModelRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FORMATS = {
    "fp8": BlockFormat("fp8", (128, 128)),
    "ct": BlockFormat("compressed-tensors", (128, 128), num_shards=2),
}
QWEN3_8B_FP8 = Path(__file__).resolve().parents[3] / "benchmarks" / "configs" / "qwen3-8b-fp8"


def _runner(path: Path, eager: bool = False, **model: Any) -> ModelRunner:
    config = ModelConfig(
        str(path), dtype="bfloat16", attention_backend="triton", enforce_eager=eager, **model
    )
    runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=256), 16, 512, "cuda")
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


@pytest.fixture(scope="module")
def hf() -> Any:
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, eos_token_id=None, bos_token_id=None)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked logits: top-1 is not decided by noise
    return model


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoint(request: pytest.FixtureRequest, hf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    write_block_checkpoint(hf, path, FORMATS[request.param])
    return path


def test_top1_agrees_with_the_torch_reference(hf: Any, checkpoint: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    sequences = [torch.randint(1, SMALL["vocab_size"], (n,), generator=gen).tolist() for n in (100, 150, 120)]
    runner = _runner(checkpoint)
    assert "128x128 block" in runner.describe()["quantization"]
    sched = FakeScheduler(runner)
    hidden = record_hidden(runner)
    for i, seq in enumerate(sequences):
        sched.add(f"s{i}", seq, max_tokens=1)
    out = sched.step({f"s{i}": len(seq) for i, seq in enumerate(sequences)})
    with torch.no_grad():
        got = runner._require_model().compute_logits(hidden[0]).float().argmax(dim=-1).cpu()
    release_gpu_runner(runner)
    ref = block_reference(hf, read_checkpoint(checkpoint), (128, 128), True)
    by_id = {f"s{i}": seq for i, seq in enumerate(sequences)}
    with torch.no_grad():  # in the batch's request order
        expected = torch.cat([ref(torch.tensor([by_id[r]])).logits[0].argmax(dim=-1) for r in out.req_ids])
    agreement = float((got == expected).float().mean())
    print(
        f"{checkpoint.name}: CUDA bf16 vs fp32 reference top-1 agreement {agreement:.3f} over {len(got)} positions"
    )
    assert len(got) == 370 and agreement >= 0.75, agreement


def test_cuda_graph_decode_equals_eager(checkpoint: Path) -> None:
    check_graph_decode_equals_eager(lambda eager: _runner(checkpoint, eager=eager), SMALL["vocab_size"])


def test_qwen3_8b_fp8_dummy_weights_decode() -> None:
    runner = _runner(QWEN3_8B_FP8, load_format="dummy", max_model_len=1024)
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
