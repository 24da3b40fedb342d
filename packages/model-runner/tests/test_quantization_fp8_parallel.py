"""fp8 under tensor parallelism on CPU (gloo): two ranks, each quantizing its own slices.

Weights: a row-parallel projection's (o_proj, down_proj) fp8 slice and scales equal, byte for byte, its columns of
the one-rank quantization (each row's amax is taken over both ranks' columns). Activations: each rank quantizes
its own input columns per token, so the two-rank model is the fp8 reference (fp8_reference.py) whose o_proj and
down_proj inputs are quantized in two column blocks: greedy tokens equal that reference's and the returned
logprobs are within 1e-4 of its log-softmax (a Llama with GQA, q/k/v/o and MLP biases, an odd vocabulary).
"""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from fp8_reference import fp8_reference
from test_runner_fakes import FakeScheduler, make_runner, perturb_
from test_runner_parallel import _free_port

from treadle_model_runner import SamplingParams
from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel
from treadle_model_runner.runner import ModelRunner

CONFIG = {"vocab_size": 129, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False, "eos_token_id": None,
          "bos_token_id": None}  # fmt: skip
PROMPTS = [[5, 17, 33, 2, 90, 61, 7], [100, 4, 4, 28, 77, 3, 12, 45, 9, 11, 64, 30, 2]]
MAX_TOKENS = 10


def greedy_with_logprobs(runner: ModelRunner) -> dict[str, Any]:
    """PROMPTS decoded greedily for MAX_TOKENS with 3 logprobs a token, 8 tokens a step: tokens and logprobs."""
    sched = FakeScheduler(runner, seed=5)
    for i, prompt in enumerate(PROMPTS):
        sched.add(f"r{i}", prompt, SamplingParams(temperature=0.0, logprobs=3), max_tokens=MAX_TOKENS)
    tokens = sched.run(budget=8)
    logprobs: dict[str, list[tuple[list[int], list[float]]]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    for out in sched.outputs:
        for req_id, per_token in zip(out.req_ids, out.logprobs, strict=False):
            logprobs[req_id] += [(list(lp.token_ids), list(lp.logprobs)) for lp in per_token or []]
    return {"tokens": tokens, "logprobs": logprobs}


def check_same_greedy(got: dict[str, Any], expected: dict[str, Any], label: Any) -> None:
    """Two greedy_with_logprobs results: the same tokens, and each token's logprob ids equal with values within 1e-4."""
    assert got["tokens"] == expected["tokens"], label
    for req_id, steps in expected["logprobs"].items():
        pairs = list(zip(got["logprobs"][req_id], steps, strict=True))
        assert pairs, (label, req_id)
        for (ids_a, lp_a), (ids_b, lp_b) in pairs:
            assert ids_a == ids_b, label
            assert max(abs(a - b) for a, b in zip(lp_a, lp_b, strict=True)) < 1e-4, label


def _run(path: Path, tp: int) -> dict[str, Any]:
    runner = make_runner(path, quantization="fp8", tensor_parallel_size=tp)
    decoded = greedy_with_logprobs(runner)
    layer = runner._require_model().model.layers[0]
    weights = {  # plain lists: tensors would cross the queue as shared memory the exiting rank takes along
        name: (m.weight.view(torch.uint8).tolist(), m.weight_scale.tolist())
        for name, m in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj))
    }
    return {**decoded, "weights": weights}


def _rank_main(rank: int, init_method: str, path: Path, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got = _run(path, tp=2)
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_two_fp8_ranks_match_the_chunked_reference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()
    perturb_(hf, seed=3, std=0.15)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, init, tmp_path, results)) for r in range(2)]
    for p in procs:
        p.start()
    one_rank = _run(tmp_path, tp=1)
    by_rank = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert not any(isinstance(v, str) for v in by_rank.values()), by_rank
    assert [p.exitcode for p in procs] == [0, 0]

    for rank, got in by_rank.items():  # row-parallel slices: exactly the one-rank quantization's columns
        for name, (full_q, full_scale) in one_rank["weights"].items():
            q, scale = (torch.tensor(t) for t in got["weights"][name])
            full = torch.tensor(full_q)
            cols = full.shape[1] // 2
            assert torch.equal(q, full[:, rank * cols : (rank + 1) * cols]), (rank, name)
            assert torch.equal(scale, torch.tensor(full_scale)), (rank, name)

    got = by_rank[0]
    ref = fp8_reference(hf, row_parallel_chunks=2)
    for i, prompt in enumerate(PROMPTS):
        req_id = f"r{i}"
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0].tolist()  # fmt: skip
        assert got["tokens"][req_id] == expected[len(prompt) :], req_id
        with torch.no_grad():
            ref_logprobs = torch.log_softmax(ref(torch.tensor([expected])).logits[0].float(), dim=-1)
        entries = got["logprobs"][req_id]
        assert len(entries) == MAX_TOKENS, req_id
        for step, (token_ids, values) in enumerate(entries):
            row = ref_logprobs[len(prompt) - 1 + step]
            torch.testing.assert_close(torch.tensor(values), row[token_ids], atol=1e-4, rtol=0)
    # the one-rank engine quantizes the row-parallel inputs over whole rows: a different (also exact) reference
    assert one_rank["tokens"] != got["tokens"] or one_rank["logprobs"] != got["logprobs"]
