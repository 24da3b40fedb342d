"""Block-wise fp8 under tensor parallelism: each rank keeps the blocks of its slice of the weight.

Without processes (the layers built as rank 1 of 2): a column-parallel qkv layer holds, for each of q, k, v, the
block rows of its rows of that shard, stacked in block units; a row-parallel layer the block columns of its input
columns; a block that a rank's slice would split is refused naming the shard and the block.
Two ranks on CPU (gloo), a Llama with GQA, q/k/v/o and MLP biases and an odd vocabulary, 16 x 16 blocks, written
in both spellings (quant_method fp8 with weight_scale_inv, compressed-tensors): each rank's fp8 bytes and scale
grid equal its cut of the files' tensors; greedy tokens equal the group-quantizing reference's
(fp8_block_checkpoints.block_reference: the groups of block_k never straddle the ranks' column split, so the two
ranks compute what one does, up to the all-reduce's summation order) and the returned logprobs are within 1e-4 of
its log-softmax. Dummy weights for the same config.json: every rank's fp8 bytes and tile scales equal its cut of
the one-rank dummy model's (each rank quantizes only whole tiles of its slice).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from fp8_block_checkpoints import BlockFormat, block_reference, write_block_checkpoint
from fp8_checkpoints import read_checkpoint
from test_quantization_fp8_parallel import CONFIG, MAX_TOKENS, PROMPTS, greedy_with_logprobs
from test_runner_fakes import make_runner, perturb_
from test_runner_parallel import two_rank_results

from treadle_model_runner.layers import fp8_weights, linear
from treadle_model_runner.layers.fp8_weights import WeightBlocks
from treadle_model_runner.layers.linear import RowParallelLinear, StackedLinear
from treadle_model_runner.parallel import TensorParallel, destroy_tensor_parallel, init_tensor_parallel

FORMATS = {
    "fp8": BlockFormat("fp8", (16, 16)),
    "ct": BlockFormat("compressed-tensors", (16, 16), num_shards=2),
}
LAYERS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _as_rank_1_of_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "get_tp", lambda: TensorParallel(rank=1, size=2))


def test_a_rank_keeps_the_blocks_of_its_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    _as_rank_1_of_2(monkeypatch)
    blocks = WeightBlocks(16, 16, "config.json's weight_block_size [16, 16]")
    qkv = StackedLinear(64, {"q": 64, "k": 32, "v": 32}, parallel=True)
    fp8_weights.allocate(qkv, torch.device("cpu"), True, False, blocks)
    assert qkv.weight_scale is not None and qkv.weight_scale.shape == (4, 4)  # (32 + 16 + 16) rows / 16
    grids = {s: torch.arange(rows // 16 * 4, dtype=torch.float32).view(-1, 4) + 100 * i
             for i, (s, rows) in enumerate({"q": 64, "k": 32, "v": 32}.items())}  # fmt: skip
    for shard, grid in grids.items():
        fp8_weights.load_scale(qkv, "weight_scale", shard, grid, f"{shard}_proj.weight_scale")
    expected = torch.cat(
        [grids["q"][2:4], grids["k"][1:2], grids["v"][1:2]]
    )  # rank 1: the second half of each
    assert torch.equal(qkv.weight_scale, expected)

    down = RowParallelLinear(96, 64)
    fp8_weights.allocate(down, torch.device("cpu"), True, False, blocks)
    grid = torch.arange(4 * 6, dtype=torch.float32).view(4, 6)
    fp8_weights.load_scale(down, "weight_scale", None, grid, "down_proj.weight_scale")
    assert down.weight_scale is not None and torch.equal(down.weight_scale, grid[:, 3:])  # columns 48-95

    wide = WeightBlocks(32, 32, "config.json's weight_block_size [32, 32]")
    problem = fp8_weights.block_alignment_problem(qkv, wide)
    assert (
        problem is not None and "k shard are cut at rows 16-32 of 32, not multiples of block_n 32" in problem
    )
    problem = fp8_weights.block_alignment_problem(down, WeightBlocks(16, 32, ""))
    assert (
        problem is not None and "input columns are cut at 48-96 of 96, not multiples of block_k 32" in problem
    )


def _layers(model: Any) -> dict[str, tuple[list[Any], list[Any]]]:
    """Plain lists (tensors would cross the queue as shared memory the exiting rank takes along)."""
    got = {}
    for i in range(CONFIG["num_hidden_layers"]):
        for name in LAYERS:
            m = model.get_submodule(f"model.layers.{i}.{name}")
            got[f"model.layers.{i}.{name}"] = (m.weight.view(torch.uint8).tolist(), m.weight_scale.tolist())
    return got


def _rank_main(rank: int, init_method: str, paths: list[Path], dummy: Path, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got: dict[str, Any] = {}
        for path in paths:
            runner = make_runner(path, tensor_parallel_size=2)
            got[str(path)] = {**greedy_with_logprobs(runner), "layers": _layers(runner._require_model())}
        runner = make_runner(dummy, tensor_parallel_size=2, load_format="dummy")
        got["dummy"] = _layers(runner._require_model())
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def _cut(weights: dict[str, torch.Tensor], name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s fp8 bytes and block scales of treadle layer `name`, cut from one-rank tensors
    (`weights[hf_name] = (bytes, grid)`): half of each shard's rows, or half of the columns (row-parallel)."""
    prefix, _, leaf = name.rpartition(".")
    parts = PARTS.get(leaf)
    if parts is None:
        q, grid = weights[name]
        cols, block_cols = q.shape[1] // 2, grid.shape[1] // 2
        return q[:, rank * cols : (rank + 1) * cols], grid[:, rank * block_cols : (rank + 1) * block_cols]
    qs, grids = [], []
    for part in parts:
        q, grid = weights[f"{prefix}.{part}"]
        rows, block_rows = q.shape[0] // 2, grid.shape[0] // 2
        qs.append(q[rank * rows : (rank + 1) * rows])
        grids.append(grid[rank * block_rows : (rank + 1) * block_rows])
    return torch.cat(qs), torch.cat(grids)


def _check_layers(weights: dict[str, torch.Tensor], got: dict[str, Any], rank: int) -> None:
    for name, (q, grid) in got.items():
        expected_q, expected_grid = _cut(weights, name, rank)
        assert torch.equal(torch.tensor(q, dtype=torch.uint8), expected_q), (rank, name)
        assert torch.equal(torch.tensor(grid), expected_grid), (rank, name)


def _check_tokens(ref: Any, got: dict[str, Any]) -> None:
    for i, prompt in enumerate(PROMPTS):
        req_id = f"r{i}"
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0].tolist()  # fmt: skip
            ref_logprobs = torch.log_softmax(ref(torch.tensor([expected])).logits[0].float(), dim=-1)
        assert got["tokens"][req_id] == expected[len(prompt) :], req_id
        for step, (token_ids, values) in enumerate(got["logprobs"][req_id]):
            row = ref_logprobs[len(prompt) - 1 + step]
            torch.testing.assert_close(torch.tensor(values), row[token_ids], atol=1e-4, rtol=0)


def _one_rank_dummy(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The one-rank dummy model's per-HF-projection (bytes, grid), cut out of its stacked layers."""
    model = make_runner(path, load_format="dummy")._require_model()
    weights = {}
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf not in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            continue
        q, grid = m.weight.view(torch.uint8), m.weight_scale
        if leaf not in PARTS:
            weights[name] = (q, grid)
            continue
        start = 0
        for part, rows in zip(PARTS[leaf], m.shard_sizes.values(), strict=True):
            weights[f"{name.rpartition('.')[0]}.{part}"] = (
                q[start : start + rows],
                grid[start // 16 : (start + rows) // 16],
            )
            start += rows
    return weights


def test_two_ranks_load_their_blocks_of_block_fp8_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()
    perturb_(hf, seed=3, std=0.15)
    paths = [tmp_path / name for name in FORMATS]
    for path, fmt in zip(paths, FORMATS.values(), strict=True):
        write_block_checkpoint(hf, path, fmt)
    dummy = tmp_path / "dummy"
    dummy.mkdir()
    (dummy / "config.json").write_text((paths[0] / "config.json").read_text())
    by_rank = two_rank_results(_rank_main, paths, dummy)
    for path, fmt in zip(paths, FORMATS.values(), strict=True):
        files = read_checkpoint(path)
        weights = {name.removesuffix(".weight"): (t.view(torch.uint8), files[f"{name.removesuffix('.weight')}.{fmt.scale_name}"])
                   for name, t in files.items() if t.dtype == torch.float8_e4m3fn}  # fmt: skip
        for rank, got in by_rank.items():
            _check_layers(weights, got[str(path)]["layers"], rank)
        _check_tokens(block_reference(hf, files, fmt.block, True), by_rank[0][str(path)])
    assert json.loads((dummy / "config.json").read_text())["quantization_config"]["weight_block_size"] == [
        16,
        16,
    ]
    one_rank = _one_rank_dummy(dummy)
    for rank, got in by_rank.items():
        _check_layers(one_rank, got["dummy"], rank)
