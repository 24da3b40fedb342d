"""What the quantized-checkpoint GPU tests share (fp8 per channel, block-wise fp8, 4-bit): the bf16 CUDA runner,
the random Llama they quantize, and the teacher-forced top-1 comparison of one prefill step against a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as tf
from test_quantization_fp8_gpu import SMALL
from test_runner_fakes import FakeScheduler, record_hidden, release_gpu_runner

from treadle_model_runner import CacheConfig, ModelConfig
from treadle_model_runner.runner import ModelRunner


def gpu_runner(path: Path, eager: bool = False, **model: Any) -> ModelRunner:
    """A bf16 runner on CUDA with the Triton backend (`model`: more ModelConfig fields)."""
    config = ModelConfig(
        str(path), dtype="bfloat16", attention_backend="triton", enforce_eager=eager, **model
    )
    runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=256), 16, 512, "cuda")
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


def peaked_llama() -> Any:
    """The random HF Llama (SMALL) the tests quantize, its lm_head scaled so top-1 is not decided by noise."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, eos_token_id=None, bos_token_id=None)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def top1_agreement(runner: ModelRunner, ref: Any, label: str) -> tuple[int, float]:
    """Prefill three random sequences in one step on `runner` (then released) and compare each position's top-1
    with the reference model `ref` (HF, CPU, fp32): (positions, agreement), printed."""
    gen = torch.Generator().manual_seed(7)
    sequences = [torch.randint(1, SMALL["vocab_size"], (n,), generator=gen).tolist() for n in (100, 150, 120)]
    sched = FakeScheduler(runner)
    hidden = record_hidden(runner)
    for i, seq in enumerate(sequences):
        sched.add(f"s{i}", seq, max_tokens=1)
    out = sched.step({f"s{i}": len(seq) for i, seq in enumerate(sequences)})
    with torch.no_grad():
        got = runner._require_model().compute_logits(hidden[0]).float().argmax(dim=-1).cpu()
    release_gpu_runner(runner)
    by_id = {f"s{i}": seq for i, seq in enumerate(sequences)}
    with torch.no_grad():  # in the batch's request order
        expected = torch.cat([ref(torch.tensor([by_id[r]])).logits[0].argmax(dim=-1) for r in out.req_ids])
    agreement = float((got == expected).float().mean())
    print(f"{label}: CUDA bf16 vs fp32 reference top-1 agreement {agreement:.3f} over {len(got)} positions")
    return len(got), agreement
