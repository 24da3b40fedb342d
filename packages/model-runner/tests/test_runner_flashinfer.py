"""GPU: the FlashInfer backend's CUDA-graph decode gives what its eager decode gives, through the whole runner.

The model is a tiny random Llama with the attention shape that matters (head_dim 128, GQA group 4 like
Llama-3.1-8B) in bfloat16, the only dtypes FlashInfer takes. Requests of staggered lengths finish one by one, so
decode batches shrink through sizes that are padded up to the captured ones (1, 2, 4, 8, 12).

Graph and eager runs differ only in rounding (a padded batch may pick other GEMM kernels, graph-mode decode always
splits KV), so greedy tokens agree until a near-tie flips; from there a request's two continuations part
legitimately. The check follows vLLM's check_logprobs_close: at each position the logprobs agree closely, and
where the tokens first differ each is among the other's top candidates with nearly the same logprob; that
request's comparison stops there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from test_runner_fakes import FakeScheduler, count_piecewise_replays, perturb_

from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams
from treadle_model_runner.runner import ModelRunner

VOCAB = 128
# the logits are bf16 of magnitude up to ~10 (one ulp: 0.03-0.06), so rounding moves a logprob by about that;
# attention over wrong pages or a stale plan moves logits by whole units
LOGPROB_ATOL = 0.1


@pytest.fixture(scope="module")
def llama_gqa4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=256, eos_token_id=[5, 7], bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(config).eval()
    perturb_(hf, seed=2, std=0.15)
    path = tmp_path_factory.mktemp("llama_gqa4")
    hf.save_pretrained(path, safe_serialization=True)
    return path


def _run(
    path: Path, prompts: list[list[int]], eager: bool, kv_cache_dtype: str
) -> tuple[dict[str, list[Any]], list[tuple[int, int]]]:
    """Greedy-decode every prompt; per request its (token, logprobs) steps, and (batch, graph size) per replay.
    With graphs, the prefill steps replay piecewise graphs (FlashInfer's prefill runs eagerly between them)."""
    config = ModelConfig(str(path), dtype="bfloat16", attention_backend="flashinfer", enforce_eager=eager)
    cache = CacheConfig(block_size=16, num_gpu_blocks_override=64, kv_cache_dtype=kv_cache_dtype)
    runner = ModelRunner(config, cache, 12, 64, "cuda")
    runner.load_model()
    runner.initialize_kv_cache()
    replays: list[tuple[int, int]] = []
    graphs = runner.graphs
    assert (graphs is None) == eager, "CUDA graph capture failed: see the log for the error"
    if graphs is not None:
        assert graphs.sizes == [1, 2, 4, 8, 12] and all(graphs.has(s) for s in graphs.sizes)
        replay = graphs.replay

        def counted(size: int) -> torch.Tensor:
            replays.append((runner.batch.num_reqs, size))
            return replay(size)

        graphs.replay = counted  # type: ignore[method-assign]
    pieces = count_piecewise_replays(runner)
    sched = FakeScheduler(runner)
    params = SamplingParams(temperature=0.0, logprobs=2)
    for i, prompt in enumerate(prompts):
        sched.add(f"r{i}", prompt, params, max_tokens=6 + 3 * i)
    sched.run(budget=64)
    assert eager or pieces, "the prefill steps must replay piecewise graphs"
    steps: dict[str, list[Any]] = {f"r{i}": [] for i in range(len(prompts))}
    for out in sched.outputs:
        for req_id, index in out.req_id_to_index.items():
            steps[req_id].extend(out.logprobs[index] or [])
    return steps, replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("num_requests", "kv_cache_dtype"), [(1, "auto"), (3, "auto"), (5, "auto"), (9, "auto"),
                                                              (3, "fp8"), (9, "fp8")])  # fmt: skip
def test_flashinfer_cuda_graph_decode_equals_eager(
    llama_gqa4: Path, num_requests: int, kv_cache_dtype: str
) -> None:
    pytest.importorskip("flashinfer")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (3 + 4 * i,), generator=gen).tolist() for i in range(num_requests)]
    eager, _ = _run(llama_gqa4, prompts, True, kv_cache_dtype)
    graph, replays = _run(llama_gqa4, prompts, False, kv_cache_dtype)

    assert replays, "decode-only steps must replay CUDA graphs"
    if num_requests > 1:
        assert any(n < size for n, size in replays), f"no replay was padded: {replays}"
        assert len({n for n, _ in replays}) > 1, f"the decode batch never shrank: {replays}"
    compared = 0
    for req_id, eager_steps in eager.items():
        graph_steps = graph[req_id]
        assert len(graph_steps) == len(eager_steps) == 6 + 3 * int(req_id[1:])
        for e, g in zip(eager_steps, graph_steps, strict=True):
            if e.token_ids[0] != g.token_ids[0]:  # a near-tie flipped: both must be top candidates of both
                assert g.token_ids[0] in e.token_ids[1:] and e.token_ids[0] in g.token_ids[1:], (req_id, e, g)
                assert abs(e.logprobs[0] - g.logprobs[0]) < LOGPROB_ATOL, (req_id, e, g)
                break
            assert g.logprobs[0] == pytest.approx(e.logprobs[0], abs=LOGPROB_ATOL), (req_id, e, g)
            compared += 1
    total = sum(len(steps) for steps in eager.values())
    assert compared >= 0.5 * total, f"only {compared} of {total} greedy tokens matched before a near-tie"
