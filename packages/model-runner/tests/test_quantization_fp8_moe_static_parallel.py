"""fp8 mixture-of-experts with static activation scales under tensor parallelism: two ranks on CPU (gloo).

A tiny Mixtral written as a Mixtral-8x7B-Instruct-FP8-style checkpoint (quant_method fp8, activation_scheme static:
per-tensor weight scales and per-expert input scales, fp8_moe_checkpoints.py). Each rank holds 16 of every expert's
32 intermediate columns; a static input scale is one value for the whole input, so the ranks' slices of the down
input quantize as the whole would: greedy tokens equal the static reference's (fp8_moe_reference.py) and the
returned logprobs are within 1e-4 of its log-softmax. Each rank's experts hold its rows of the files' gate / up
bytes (per-tensor scales broadcast to them) and fold the same input scales (the files' maxima).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from fp8_checkpoints import Fp8Format, quantization_config, write_checkpoint
from fp8_moe_checkpoints import moe_fp8_tensors
from fp8_moe_reference import moe_channel_reference
from test_quantization_fp8_block_parallel import _check_tokens
from test_quantization_fp8_moe import _hf
from test_quantization_fp8_parallel import greedy_with_logprobs
from test_runner_fakes import make_runner
from test_runner_parallel import two_rank_results

from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

FMT = Fp8Format("fp8", "tensor", static=True)
LAYER = "model.layers.1.mlp.experts"
FILES = "model.layers.1.block_sparse_moe.experts"


def _rank_main(rank: int, init_method: str, path: Path, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        runner = make_runner(path, tensor_parallel_size=2)
        got = greedy_with_logprobs(runner)
        moe = runner._require_model().get_submodule(LAYER)
        scales = moe.fp8_scales()
        # plain lists (tensors would cross the queue as shared memory the exiting rank takes along)
        got["experts"] = {"w13": moe.w13_weight.view(torch.uint8).tolist(), "s13": moe.w13_weight_scale.tolist(),
                          "inputs": [scales.w13_input.item(), scales.w2_input.item()]}  # fmt: skip
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_two_ranks_run_a_static_fp8_moe_checkpoint(tmp_path: Path) -> None:
    hf = _hf("mixtral")
    files = moe_fp8_tensors(hf, FMT)
    write_checkpoint(hf, tmp_path, files, quantization_config(FMT))
    by_rank = two_rank_results(_rank_main, tmp_path)
    w13_max = max(float(files[f"{FILES}.{e}.{p}.input_scale"]) for e in range(4) for p in ("w1", "w3"))
    w2_max = max(float(files[f"{FILES}.{e}.w2.input_scale"]) for e in range(4))
    for rank, got in by_rank.items():
        rows = slice(16 * rank, 16 * (rank + 1))
        for e in range(4):
            gate, up = files[f"{FILES}.{e}.w1.weight"][rows], files[f"{FILES}.{e}.w3.weight"][rows]
            w13 = torch.cat([gate, up]).view(torch.uint8)
            assert torch.equal(torch.tensor(got["experts"]["w13"][e], dtype=torch.uint8), w13), (rank, e)
            s13 = torch.cat(
                [files[f"{FILES}.{e}.{p}.weight_scale"].reshape(1).expand(16) for p in ("w1", "w3")]
            )
            assert torch.equal(torch.tensor(got["experts"]["s13"][e]), s13), (rank, e)
        assert got["experts"]["inputs"] == [w13_max, w2_max], rank
    _check_tokens(moe_channel_reference(hf, files), by_rank[0])
    assert by_rank[0]["tokens"] == by_rank[1]["tokens"]
