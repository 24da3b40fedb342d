"""A whole model on the Triton attention backend against the torch backend, on CPU under Triton's interpreter.

The kernel tests check each Triton kernel against its reference; this one checks the plumbing of a real step:
the runner's metadata, positions and slot mappings, the attention layer handing q and k over unrotated
(``forward_rope``), the fused decode kernel for the small decode batches and the unified kernel for prefills
and chunked prefills. A tiny Llama with random weights (head dim 32, the fused kernel's smallest) runs a mixed schedule (chunked prefills, decodes of
three requests, then one) on both backends; every step's hidden states must agree to 1e-4 and the greedy
tokens exactly. It runs in a subprocess because ``TRITON_INTERPRET`` must be set before triton is imported.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
from test_runner_fakes import perturb_, run_interpreted

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from test_runner_fakes import FakeScheduler, make_runner, record_hidden
    from treadle_kernels.attention import triton_backend

    fused_calls = []
    fused = triton_backend.fused_decode_attention
    triton_backend.fused_decode_attention = lambda *a, **k: fused_calls.append(1) or fused(*a, **k)

    path = sys.argv[1]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (9, 5, 14)]
    results = {}
    for backend in ("torch", "triton"):
        runner = make_runner(path, attention_backend=backend, block_size=4)
        hidden = record_hidden(runner)
        sched = FakeScheduler(runner, seed=1)
        for i, p in enumerate(prompts):
            sched.add(f"r{i}", p, max_tokens=3 + 4 * i)
        results[backend] = (sched.run(budget=8), hidden)
    (ref_tokens, ref_hidden), (tokens, hidden) = results["torch"], results["triton"]
    assert tokens == ref_tokens, (tokens, ref_tokens)
    assert len(hidden) == len(ref_hidden)
    for step, (h, r) in enumerate(zip(hidden, ref_hidden, strict=True)):
        torch.testing.assert_close(h, r, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    assert fused_calls, "the fused decode kernel never ran"
    print("steps", len(hidden), "fused decode calls", len(fused_calls), "tokens", tokens)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suites cover the real kernels")
def test_llama_on_triton_interpreter_matches_torch_backend(tmp_path: Path) -> None:
    config = tf.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(config).eval()
    perturb_(hf, seed=4, std=0.15)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert "steps" in run_interpreted(SCRIPT, str(tmp_path))
