"""4-bit checkpoints under tensor parallelism on CPU (gloo): two ranks, each loading its slices of the files.

A Llama with GQA, q/k/v/o and MLP biases and an odd vocabulary (test_quantization_fp8_parallel's), written as
(int4_checkpoints.py): AWQ in groups of 32 with one projection ignored (intermediate size 128: each rank's 64
down_proj inputs are two whole groups), and GPTQ with act order and zero points at intermediate size 96 (48 inputs per
rank, which cut the groups of 32: an act-order rank keeps every group's scales, as vLLM does). On each rank every
projection of layer 0 dequantizes exactly to its part of the reference's weight (column-parallel: its rows of each
shard; row-parallel: its columns); greedy tokens equal the reference's (the HF model on the dequantized weights) and
the returned logprobs are within 1e-4 of its log-softmax. The same compressed-tensors checkpoint without act order at
intermediate size 96 is refused on both ranks, naming the cut groups.

Phi-3 (no biases) as AWQ at intermediate size 128 and as GPTQ with act order and zero points at 96: its checkpoint
quantizes qkv_proj and gate_up_proj whole (one qweight, scale set, zero points and g_idx over every part's columns),
and each rank must keep its columns of each part (its q, its k, its v), not a block of the whole.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from int4_checkpoints import FORMATS, dequantized_reference, write_int4_checkpoint
from test_quantization_fp8_parallel import CONFIG, MAX_TOKENS, PROMPTS, greedy_with_logprobs
from test_runner_fakes import make_runner, perturb_
from test_runner_parallel import two_rank_results

from treadle_ir.ops.int4 import dequantize_int4
from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

LAYERS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# checkpoint -> (architecture, format, intermediate size)
CHECKPOINTS = {"awq": ("llama", "awq", 128), "gptq-asym-act-order": ("llama", "gptq-asym-act-order", 96),
               "ct-sym": ("llama", "ct-sym", 96), "phi3-awq": ("phi3", "awq", 128),
               "phi3-gptq-asym-act-order": ("phi3", "gptq-asym-act-order", 96)}  # fmt: skip
REFUSED = "ct-sym"


def _run(path: Path) -> dict[str, Any]:
    try:
        runner = make_runner(path, tensor_parallel_size=2)
    except ValueError as e:
        return {"error": str(e)}
    decoded = greedy_with_logprobs(runner)
    model = runner._require_model()
    weights = {}  # plain lists: tensors would cross the queue as shared memory the exiting rank takes along
    for name in LAYERS:
        m = model.get_submodule(f"model.layers.0.{name}")
        if m.packed_weight is None:
            weights[name] = m.weight.tolist()
        else:
            args = (m.packed_weight, m.group_scale, m.group_zero, m.group_index, m.group_size)
            weights[name] = dequantize_int4(*args).t().tolist()
    return {**decoded, "weights": weights}


def _rank_main(rank: int, init_method: str, paths: list[Path], results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got = {str(path): _run(path) for path in paths}
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def _expected(ref: Any, name: str, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of the reference's weight behind treadle layer `name` of layer 0."""
    prefix, _, leaf = name.rpartition(".")
    parts = STACKED.get(leaf)
    if parts is None:  # row-parallel: this rank's half of the columns
        weight = ref.get_submodule(f"model.layers.0.{name}").weight
        cols = weight.shape[1] // 2
        return weight[:, rank * cols : (rank + 1) * cols]
    modules = dict(ref.named_modules())
    if f"model.layers.0.{name}" in modules:  # Phi-3: the stacked projection itself, its parts' rows in order
        config = ref.config
        head_dim = config.hidden_size // config.num_attention_heads
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        sizes = [q, kv, kv] if leaf == "qkv_proj" else [config.intermediate_size] * 2
        weights = list(modules[f"model.layers.0.{name}"].weight.split(sizes))
    else:
        weights = [modules[f"model.layers.0.{prefix}.{part}"].weight for part in parts]
    slices = []
    # column-parallel: this rank's half of each shard's rows (2 key/value heads: one each)
    for weight in weights:
        rows = weight.shape[0] // 2
        slices.append(weight[rank * rows : (rank + 1) * rows])
    return torch.cat(slices)


def _check_tokens(ref: Any, got: dict[str, Any]) -> None:
    for i, prompt in enumerate(PROMPTS):
        req_id = f"r{i}"
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0].tolist()  # fmt: skip
            ref_logprobs = torch.log_softmax(ref(torch.tensor([expected])).logits[0].float(), dim=-1)
        assert got["tokens"][req_id] == expected[len(prompt) :], req_id
        entries = got["logprobs"][req_id]
        assert len(entries) == MAX_TOKENS, req_id
        for step, (token_ids, values) in enumerate(entries):
            row = ref_logprobs[len(prompt) - 1 + step]
            torch.testing.assert_close(torch.tensor(values), row[token_ids], atol=1e-4, rtol=0)


def test_two_ranks_load_their_slices_of_int4_checkpoints(tmp_path: Path) -> None:
    refs, paths = {}, []
    for name, (arch, fmt, intermediate) in CHECKPOINTS.items():
        torch.manual_seed(0)
        if arch == "llama":
            hf = tf.LlamaForCausalLM(tf.LlamaConfig(**{**CONFIG, "intermediate_size": intermediate}))
        else:
            config = {k: v for k, v in CONFIG.items() if not k.endswith("_bias")}
            hf = tf.Phi3ForCausalLM(
                tf.Phi3Config(**{**config, "intermediate_size": intermediate, "pad_token_id": 0})
            )
        hf = hf.eval()
        perturb_(hf, seed=3, std=0.15)
        path = tmp_path / name
        refs[str(path)] = dequantized_reference(hf, write_int4_checkpoint(hf, path, FORMATS[fmt]))
        paths.append(path)
    by_rank = two_rank_results(_rank_main, paths, timeout_s=900)
    for path in paths:
        key = str(path)
        if path.name == REFUSED:
            for got in by_rank.values():
                assert "cuts its groups of 32" in got[key]["error"], got[key]
            continue
        for rank, got in by_rank.items():
            for name, weight in got[key]["weights"].items():
                assert torch.equal(torch.tensor(weight), _expected(refs[key], name, rank)), (
                    path.name,
                    rank,
                    name,
                )
        _check_tokens(refs[key], by_rank[0][key])
