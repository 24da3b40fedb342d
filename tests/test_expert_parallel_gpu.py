"""`tensor_parallel_size=2, enable_expert_parallel=True` on two GPUs (NCCL) against one GPU, on a tiny Qwen3-MoE
checkpoint with HF-random weights (fp32): each rank holds half the experts whole, so the Triton fused-MoE kernels
see expert ids -1 for the other rank's slots (skipped in the alignment, workspace zeroed) and the all-reduce sums
the two halves. Greedy tokens and logprobs equal one GPU's, with CUDA graphs (decode graphs capturing that path)
and eagerly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from test_tensor_parallel_gpu import _run, assert_two_equal_one

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tf.Qwen3MoeConfig(vocab_size=1001, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                               max_position_embeddings=1024, initializer_range=0.1,
                               tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3_moe_ep")
    tf.Qwen3MoeForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def test_expert_parallel_two_gpus_equal_one(moe_checkpoint: Path) -> None:
    one = _run(moe_checkpoint)
    two = _run(moe_checkpoint, tensor_parallel_size=2, enable_expert_parallel=True)
    two_eager = _run(moe_checkpoint, tensor_parallel_size=2, enable_expert_parallel=True, enforce_eager=True)
    assert_two_equal_one(one, two, two_eager)
