"""4-bit checkpoints through the Triton W4A16 kernel inside a real model, on CPU under Triton's interpreter.

The kernel tests check the kernel against the op's spec; this one checks the plumbing: the model's projections
handing the kernel their activations and 4-bit tensors (stacked shards, biases, act order). A tiny Llama in two
formats (GPTQ with act order and v1 zero points, AWQ) runs with ``w4a16_linear=triton``: a mixed step's logits are
within 1e-4 of the HF model holding the dequantized weights, and greedy continuations equal its `generate`. It runs
in a subprocess because ``TRITON_INTERPRET`` must be set before triton is imported.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from int4_checkpoints import FORMATS, dequantized_reference, write_int4_checkpoint
from test_models import _config
from test_runner_fakes import perturb_, run_interpreted

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import sys
    import transformers as tf
    from test_quantization_fp8 import check_greedy_continuations, check_mixed_batch_logits
    from test_runner_fakes import make_runner
    from treadle_ir import ops
    from treadle_kernels.ops import w4a16_linear as provider

    calls = []
    launch = provider.launch
    provider.launch = lambda *a, **k: calls.append(1) or launch(*a, **k)
    path, ref_dir, hf_dir = sys.argv[1:]
    ref = tf.AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with ops.w4a16_linear.priority(["triton"]):
        check_mixed_batch_logits(make_runner(path), ref, hf)
        check_greedy_continuations(make_runner(path, max_num_batched_tokens=16), ref)
    assert calls, "the Triton kernel never ran"
    print("kernel calls", len(calls))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suites cover the real kernels")
@pytest.mark.parametrize("fmt", ["gptq-asym-act-order", "awq"])
def test_llama_int4_on_triton_interpreter_matches_reference(tmp_path: Path, fmt: str) -> None:
    config, cls = _config("llama")
    torch.manual_seed(0)
    hf = cls(config).eval()
    perturb_(hf, seed=2, std=0.15)
    dequantized = write_int4_checkpoint(hf, tmp_path / "ckpt", FORMATS[fmt])
    dequantized_reference(hf, dequantized).save_pretrained(tmp_path / "ref", safe_serialization=True)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    out = run_interpreted(SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "ref"), str(tmp_path / "hf"))
    assert "kernel calls" in out
