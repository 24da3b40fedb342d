"""fp8 mixture-of-experts under tensor parallelism: two ranks on CPU (gloo).

A tiny Qwen3-MoE (8 experts of width 32, a dense layer) written as a block-wise fp8 checkpoint with 16 x 16 blocks:
each rank holds 16 of every expert's 32 intermediate columns, one block. Each rank's expert bytes and block grids
equal its cut of the files' (gate and up: its block rows; down: its block column); greedy tokens equal the
group-quantizing reference's (fp8_moe_reference.py: the activation groups never straddle the ranks' split, so two
ranks compute what one does, up to the all-reduce's summation order) and the returned logprobs are within 1e-4 of
its log-softmax. Online fp8 on the unquantized checkpoint: every rank's down-projection scales are the whole rows'
(amax over both ranks' columns), equal to the one-rank model's.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from fp8_block_checkpoints import BlockFormat, write_block_checkpoint
from fp8_checkpoints import read_checkpoint
from fp8_moe_reference import moe_block_reference
from test_quantization_fp8_block_parallel import _check_tokens
from test_quantization_fp8_moe import _hf
from test_quantization_fp8_parallel import greedy_with_logprobs
from test_runner_fakes import make_runner
from test_runner_parallel import two_rank_results

from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

FMT = BlockFormat("fp8", (16, 16))
LAYER = "model.layers.1.mlp.experts"  # layer 0 is dense (mlp_only_layers)


def _experts(runner: Any) -> dict[str, Any]:
    """Plain lists (tensors would cross the queue as shared memory the exiting rank takes along)."""
    moe = runner._require_model().get_submodule(LAYER)
    return {
        "w13": moe.w13_weight.view(torch.uint8).tolist(),
        "w2": moe.w2_weight.view(torch.uint8).tolist(),
        "s13": moe.w13_weight_scale.tolist(),
        "s2": moe.w2_weight_scale.tolist(),
    }


def _rank_main(rank: int, init_method: str, path: Path, plain: Path, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        runner = make_runner(path, tensor_parallel_size=2)
        got = {**greedy_with_logprobs(runner), "experts": _experts(runner)}
        online = make_runner(plain, tensor_parallel_size=2, quantization="fp8")
        got["online_s2"] = online._require_model().get_submodule(LAYER).w2_weight_scale.tolist()
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_two_ranks_load_their_blocks_of_a_block_fp8_moe_checkpoint(tmp_path: Path) -> None:
    hf = _hf("qwen3_moe")
    path, plain = tmp_path / "fp8", tmp_path / "plain"
    write_block_checkpoint(hf, path, FMT)
    hf.save_pretrained(plain, safe_serialization=True)
    by_rank = two_rank_results(_rank_main, path, plain)
    files = read_checkpoint(path)
    one_rank_s2 = make_runner(plain, quantization="fp8")._require_model().get_submodule(LAYER).w2_weight_scale
    for rank, got in by_rank.items():
        rows, blocks = slice(16 * rank, 16 * (rank + 1)), slice(rank, rank + 1)
        for e in range(8):
            name = f"{LAYER}.{e}"
            w13 = torch.cat([files[f"{name}.gate_proj.weight"][rows], files[f"{name}.up_proj.weight"][rows]])
            assert torch.equal(
                torch.tensor(got["experts"]["w13"][e], dtype=torch.uint8), w13.view(torch.uint8)
            )
            w2 = files[f"{name}.down_proj.weight"][:, rows]
            assert torch.equal(torch.tensor(got["experts"]["w2"][e], dtype=torch.uint8), w2.view(torch.uint8))
            s13 = torch.cat([files[f"{name}.gate_proj.weight_scale_inv"][blocks],
                             files[f"{name}.up_proj.weight_scale_inv"][blocks]])  # fmt: skip
            assert torch.equal(torch.tensor(got["experts"]["s13"][e]), s13), (rank, e)
            s2 = files[f"{name}.down_proj.weight_scale_inv"][:, blocks]
            assert torch.equal(torch.tensor(got["experts"]["s2"][e]), s2), (rank, e)
        assert torch.equal(torch.tensor(got["online_s2"]), one_rank_s2), rank
    _check_tokens(moe_block_reference(hf, files, FMT.block), by_rank[0])
