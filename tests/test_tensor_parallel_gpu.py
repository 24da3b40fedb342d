"""`tensor_parallel_size=2` on two GPUs (NCCL), against one GPU, on a tiny Llama checkpoint with HF-random weights
(fp32, so sums of two partial products and one full product agree to rounding): the same greedy tokens and
logprobs, and with CUDA graphs (decode graphs and piecewise graphs holding the all-reduces) the same tokens as eager;
each engine shuts down promptly, so three engines run one after another in this process.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from treadle import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tf.LlamaConfig(vocab_size=1001, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                            initializer_range=0.1, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_tp")
    tf.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def _run(path: Path, **engine: Any) -> list[Any]:
    llm = LLM(str(path), dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, **engine)
    try:
        prompts: list[Any] = [{"prompt_token_ids": [(7 * i + 3 * j) % 1000 + 1 for j in range(5 + 23 * i)]}
                              for i in range(12)]  # fmt: skip
        greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
        outs = llm.generate(prompts, greedy)
    finally:
        start = time.monotonic()
        llm.shutdown()
        # leaving the NCCL group must not wait on the CUDA graphs that captured its all-reduces (the group's
        # teardown gives up after 20 s, and the next group in this process would then fail to start)
        assert time.monotonic() - start < 10, f"shutdown took {time.monotonic() - start:.1f} s"
    del llm
    gc.collect()  # rank 0's runner lives in this process: free its memory before the next engine sizes its cache
    torch.cuda.empty_cache()
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def test_two_gpus_equal_one(checkpoint: Path) -> None:
    one = _run(checkpoint)
    two = _run(checkpoint, tensor_parallel_size=2)
    two_eager = _run(checkpoint, tensor_parallel_size=2, enforce_eager=True)
    assert_two_equal_one(one, two, two_eager)


def assert_two_equal_one(one: list[Any], two: list[Any], two_eager: list[Any]) -> None:
    """Two GPUs' greedy tokens (graphs and eager) equal one GPU's; logprobs name the same tokens, within 1e-3."""
    assert [ids for ids, _ in two] == [ids for ids, _ in one]
    assert [ids for ids, _ in two_eager] == [ids for ids, _ in two]
    worst = 0.0
    for (_, lps), (_, ref) in zip(two, one, strict=True):
        for pos, ref_pos in zip(lps, ref, strict=True):
            assert list(pos) == list(ref_pos)
            worst = max(worst, *(abs(pos[t].logprob - ref_pos[t].logprob) for t in pos))
    assert worst < 1e-3, worst


def _small_all_reduce_rank(rank: int, init_method: str) -> None:
    from treadle_model_runner import parallel

    device = torch.device("cuda", rank)
    parallel.init_tensor_parallel(rank, 2, init_method, device)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            parallel.prepare_small_all_reduce(dtype, device)
            assert parallel._small is not None, (
                "the one-shot kernel was not set up (its check failed: see the log)"
            )
            limit = parallel._small.max_bytes // torch.tensor([], dtype=dtype).element_size()
            gen = torch.Generator(device=device).manual_seed(rank)
            # eligible sizes, one not a multiple of 16 bytes, and one over the limit (both NCCL)
            for numel in (8, 4096, 3 * 4096 + 8, limit, 4100 + 3, 2 * limit):
                x = torch.randn(numel, generator=gen, device=device).to(dtype)
                expected = x.clone()
                torch.distributed.all_reduce(expected)
                assert torch.equal(parallel.all_reduce(x.clone()), expected), (dtype, numel)
            # inside a CUDA graph: replays read the static input's new values
            static = torch.zeros(2, 4096, device=device, dtype=dtype)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = parallel.all_reduce(static)
            for _ in range(3):
                fresh = torch.randn(2, 4096, generator=gen, device=device).to(dtype)
                static.copy_(fresh)
                graph.replay()
                torch.distributed.all_reduce(fresh)
                assert torch.equal(out, fresh), dtype
            graph.reset()
    finally:
        parallel.destroy_tensor_parallel()


def test_small_all_reduce_equals_nccl() -> None:
    """The symmetric-memory one-shot all-reduce (symm_all_reduce.py) gives NCCL's sums, eagerly and in a graph."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_small_all_reduce_rank, args=(f"tcp://127.0.0.1:{port}",), nprocs=2, join=True)
