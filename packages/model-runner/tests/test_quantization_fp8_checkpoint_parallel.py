"""fp8 checkpoints under tensor parallelism on CPU (gloo): two ranks, each loading its slices of the files.

Two checkpoints of a Llama with GQA, q/k/v/o and MLP biases and an odd vocabulary (fp8_checkpoints.py): compressed-
tensors with per-channel weight scales and dynamic activations (sharded), and quant_method fp8 with per-tensor
scales and static activations. On each rank: a column-parallel layer (qkv, gate_up) holds exactly its rows of each
shard's fp8 bytes and their scales, a row-parallel one (o, down) its columns of the bytes and every row's scale; the
static input scale is the whole one. Greedy tokens equal the checkpoint reference's (fp8_reference.py; dynamic
inputs of o_proj / down_proj quantized per rank's column block, as each rank does) and the returned logprobs are
within 1e-4 of its log-softmax.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from fp8_checkpoints import FORMATS, read_checkpoint, write_fp8_checkpoint
from fp8_reference import fp8_checkpoint_reference
from test_quantization_fp8_parallel import CONFIG, MAX_TOKENS, PROMPTS, greedy_with_logprobs
from test_runner_fakes import make_runner, perturb_
from test_runner_parallel import two_rank_results

from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

CHECKPOINTS = ("ct-channel-dynamic", "fp8-static")
LAYERS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _run(path: Path) -> dict[str, Any]:
    runner = make_runner(path, tensor_parallel_size=2)
    decoded = greedy_with_logprobs(runner)
    model = runner._require_model()
    layers = {}  # plain lists: tensors would cross the queue as shared memory the exiting rank takes along
    for i in range(CONFIG["num_hidden_layers"]):
        for name in LAYERS:
            m = model.get_submodule(f"model.layers.{i}.{name}")
            input_scale = None if m.input_scale is None else m.input_scale.tolist()
            layers[f"model.layers.{i}.{name}"] = (m.weight.view(torch.uint8).tolist(), m.weight_scale.tolist(),
                                                  input_scale)  # fmt: skip
    return {**decoded, "layers": layers}


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


def _expected_slices(
    files: dict[str, torch.Tensor], name: str, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s fp8 bytes and per-row scales of treadle layer `name`, cut from the files' tensors."""
    prefix, _, leaf = name.rpartition(".")
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(leaf)
    if parts is None:  # row-parallel: this rank's half of the columns, every row's scale
        weight = files[f"{name}.weight"].view(torch.uint8)
        cols = weight.shape[1] // 2
        scale = files[f"{name}.weight_scale"].float().reshape(-1).expand(weight.shape[0])
        return weight[:, rank * cols : (rank + 1) * cols], scale
    weights, scales = [], []
    for part in parts:  # column-parallel: this rank's half of each shard's rows (2 key/value heads: one each)
        weight = files[f"{prefix}.{part}.weight"].view(torch.uint8)
        rows = weight.shape[0] // 2
        scale = files[f"{prefix}.{part}.weight_scale"].float().reshape(-1).expand(weight.shape[0])
        weights.append(weight[rank * rows : (rank + 1) * rows])
        scales.append(scale[rank * rows : (rank + 1) * rows])
    return torch.cat(weights), torch.cat(scales)


def _check_rank(files: dict[str, torch.Tensor], got: dict[str, Any], rank: int) -> None:
    for name, (q, scale, input_scale) in got["layers"].items():
        weight, expected_scale = _expected_slices(files, name, rank)
        assert torch.equal(torch.tensor(q, dtype=torch.uint8), weight), (rank, name)
        assert torch.equal(torch.tensor(scale), expected_scale), (rank, name)
        prefix, _, leaf = name.rpartition(".")
        hf = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(
            leaf, (leaf,)
        )
        given = [files.get(f"{prefix}.{p}.input_scale") for p in hf]
        assert input_scale == (None if given[0] is None else [max(float(g) for g in given)]), (rank, name)


def _check_tokens(hf: Any, files: dict[str, torch.Tensor], got: dict[str, Any]) -> None:
    ref = fp8_checkpoint_reference(hf, files, row_parallel_chunks=2)
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


def test_two_ranks_load_their_slices_of_fp8_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()
    perturb_(hf, seed=3, std=0.15)
    paths = [tmp_path / fmt for fmt in CHECKPOINTS]
    for path, fmt in zip(paths, CHECKPOINTS, strict=True):
        write_fp8_checkpoint(hf, path, FORMATS[fmt])
    by_rank = two_rank_results(_rank_main, paths)
    for path in paths:
        files = read_checkpoint(path)
        for rank, got in by_rank.items():
            _check_rank(files, got[str(path)], rank)
        _check_tokens(hf, files, by_rank[0][str(path)])
