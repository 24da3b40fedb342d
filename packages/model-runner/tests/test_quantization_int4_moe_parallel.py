"""4-bit mixture-of-experts checkpoints under tensor parallelism: two ranks on CPU (gloo).

A tiny Qwen3-MoE (8 experts of width 64, a dense layer) written as GPTQ in groups of 32 (int4_checkpoints.py),
asymmetric (v1 zero points) without act order, where each rank's 32 down-projection input rows are one whole group,
(the dense layer's down_proj, 48 of 96 inputs per rank, left unquantized), and with act order (desc_act), where a rank keeps every group's scales and its rows' g_idx. On each rank every
expert's weights dequantize exactly to its cut of the reference's (gate and up: its rows; down: its columns); greedy
tokens equal the reference's (the HF model on the dequantized weights) and the returned logprobs are within 1e-4 of
its log-softmax.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from int4_checkpoints import Int4Format, dequantized_reference, write_int4_checkpoint
from test_quantization_fp8_block_parallel import _check_tokens
from test_quantization_fp8_moe import _hf
from test_quantization_fp8_parallel import greedy_with_logprobs
from test_runner_fakes import make_runner
from test_runner_parallel import two_rank_results

from treadle_ir.ops.int4 import dequantize_int4
from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

LAYER = "model.layers.1.mlp.experts"  # layer 0 is dense (mlp_only_layers)
# the dense layer's down_proj (96 inputs: 48 per rank cut its groups of 32) is left unquantized without act order
FORMATS = {"gptq-asym": Int4Format("gptq", ignore=("model.layers.0.mlp.down_proj",)),
           "gptq-asym-act-order": Int4Format("gptq", act_order=True)}  # fmt: skip


def _experts(runner: Any) -> dict[str, Any]:
    """Each expert's dequantized w13 [2N / 2, K] and w2 [K, N / 2] as plain lists."""
    moe = runner._require_model().get_submodule(LAYER)
    scales, layout = moe.int4_scales(), moe.int4_layout
    out: dict[str, list[Any]] = {"w13": [], "w2": []}
    for e in range(moe.num_experts):
        for which, packed, rows in (("w13", moe.w13_weight, moe.hidden_size), ("w2", moe.w2_weight,
                                                                                moe.full_intermediate)):  # fmt: skip
            scale, zero, g_idx = scales.expert(e, which)
            out[which].append(
                dequantize_int4(packed[e], scale, zero, g_idx, layout.group_size_of(rows)).t().tolist()
            )
    return out


def _rank_main(rank: int, init_method: str, paths: dict[str, Path], results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got = {}
        for name, path in paths.items():
            runner = make_runner(path, tensor_parallel_size=2)
            got[name] = {**greedy_with_logprobs(runner), "experts": _experts(runner)}
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_two_ranks_load_their_slices_of_int4_moe_checkpoints(tmp_path: Path) -> None:
    hf = _hf("qwen3_moe", 64)
    paths, dequantized = {}, {}
    for name, fmt in FORMATS.items():
        paths[name] = tmp_path / name
        dequantized[name] = write_int4_checkpoint(hf, paths[name], fmt)
    by_rank = two_rank_results(_rank_main, paths, timeout_s=900)
    for name in FORMATS:
        weights = dequantized[name]
        for rank, got in by_rank.items():
            rows = slice(32 * rank, 32 * (rank + 1))
            for e in range(8):
                gate, up, down = (weights[f"{LAYER}.{e}.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
                w13 = torch.tensor(got[name]["experts"]["w13"][e])
                assert torch.equal(w13, torch.cat([gate[rows], up[rows]])), (name, rank, e)
                assert torch.equal(torch.tensor(got[name]["experts"]["w2"][e]), down[:, rows]), (
                    name,
                    rank,
                    e,
                )
        _check_tokens(dequantized_reference(hf, weights), by_rank[0][name])
