"""Expert parallelism on CPU (gloo): two ranks with enable_expert_parallel, each holding whole experts (half of
them), give the one-rank runner's tokens and logprobs, for Qwen3-MoE, Mixtral and Qwen2-MoE (its shared expert
still split like a dense MLP). A block-wise fp8 Qwen3-MoE checkpoint whose experts' width (32) does not cut into
whole 32-column blocks on two ranks, refused under plain tensor parallelism, loads with expert parallelism and
decodes as the group-quantizing reference (fp8_moe_reference.py) does; a GPTQ (4-bit, act order) Qwen3-MoE decodes as
the HF model on its dequantized weights.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from fp8_block_checkpoints import BlockFormat, write_block_checkpoint
from fp8_checkpoints import Fp8Format, read_checkpoint, write_checkpoint
from fp8_checkpoints import quantization_config as fp8_quantization_config
from fp8_moe_checkpoints import moe_fp8_tensors
from fp8_moe_reference import moe_block_reference, moe_channel_reference
from int4_checkpoints import Int4Format, dequantized_reference, write_int4_checkpoint
from test_quantization_fp8_block_parallel import _check_tokens
from test_quantization_fp8_moe import MOE, _hf
from test_quantization_fp8_parallel import greedy_with_logprobs
from test_runner_fakes import make_runner, perturb_
from test_runner_parallel import SMALL, two_rank_results

from treadle_model_runner.config import ModelConfig
from treadle_model_runner.layers.fp8_weights import WeightBlocks
from treadle_model_runner.models import sparse_moe
from treadle_model_runner.parallel import TensorParallel, destroy_tensor_parallel, init_tensor_parallel
from treadle_model_runner.quantization.experts import check_expert_blocks
from treadle_model_runner.runner.describe import log_expert_parallel
from treadle_moe import FusedMoE

FP8 = BlockFormat("fp8", (16, 32))  # two ranks would hold 16 of each expert's 32 down columns: half a block


def _checkpoints(root: Path) -> dict[str, Path]:
    moe = {"vocab_size": 128, "num_experts_per_tok": 2, **SMALL}
    configs = {
        "qwen3_moe": tf.Qwen3MoeConfig(
            num_experts=4, moe_intermediate_size=32, norm_topk_prob=True, head_dim=16, **moe
        ),
        "mixtral": tf.MixtralConfig(num_local_experts=4, **moe),
        "qwen2_moe": tf.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, **moe
        ),
    }
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(i)
        hf = tf.AutoModelForCausalLM.from_config(config).eval()
        perturb_(hf, seed=i, std=0.15)
        hf.save_pretrained(root / name, safe_serialization=True)
    return {name: root / name for name in configs}


def _fp8_model() -> Any:
    """Qwen3-MoE of 8 experts of width 32; the dense layer 0's MLP (128: 64 per rank) and attention cut in whole
    blocks, so only the experts' cut is misaligned."""
    torch.manual_seed(5)
    config = tf.Qwen3MoeConfig(**MOE, num_experts=8, moe_intermediate_size=32, intermediate_size=128,
                               norm_topk_prob=True, mlp_only_layers=[0])  # fmt: skip
    hf = tf.Qwen3MoeForCausalLM(config).eval()
    perturb_(hf, seed=1, std=0.15)
    return hf


def _experts(runner: Any) -> tuple[int, list[Any]]:
    """The first FusedMoE's first global expert and its w13 (plain lists: tensors would cross the queue as shared
    memory the exiting rank takes along)."""
    moe = next(m for m in runner._require_model().modules() if isinstance(m, FusedMoE))
    return moe.placement.first, moe.w13_weight.tolist()


def _rank_main(
    rank: int, init_method: str, dirs: dict[str, Path], quantized: dict[str, Path], results: Any
) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got = {}
        for name, path in dirs.items():
            runner = make_runner(path, tensor_parallel_size=2, enable_expert_parallel=True)
            got[name] = {**greedy_with_logprobs(runner), "experts": _experts(runner)}
        for name, path in quantized.items():
            runner = make_runner(path, tensor_parallel_size=2, enable_expert_parallel=True)
            got[name] = greedy_with_logprobs(runner)
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_two_expert_parallel_ranks_match_one(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path)
    hf = _fp8_model()
    write_block_checkpoint(hf, tmp_path / "fp8", FP8)
    hf4 = _hf("qwen3_moe", 64)
    int4_weights = write_int4_checkpoint(hf4, tmp_path / "int4", Int4Format("gptq", act_order=True))
    by_rank = two_rank_results(
        _rank_main, dirs, {"fp8": tmp_path / "fp8", "int4": tmp_path / "int4"}, timeout_s=900
    )
    for name, path in dirs.items():
        one = make_runner(path)
        expected = greedy_with_logprobs(one)
        _, full = _experts(one)
        for rank, got in by_rank.items():
            first, w13 = got[name]["experts"]
            assert (first, len(w13)) == (2 * rank, 2), (name, rank)  # whole experts 2r, 2r + 1
            assert torch.equal(torch.tensor(w13), torch.tensor(full[first : first + 2])), (name, rank)
            assert got[name]["tokens"] == expected["tokens"], (name, rank)
            for req_id, steps in expected["logprobs"].items():
                pairs = list(zip(got[name]["logprobs"][req_id], steps, strict=True))
                assert pairs, name
                for (ids_a, lp_a), (ids_b, lp_b) in pairs:
                    assert ids_a == ids_b, name
                    assert max(abs(a - b) for a, b in zip(lp_a, lp_b, strict=True)) < 1e-4, name
    _check_tokens(moe_block_reference(hf, read_checkpoint(tmp_path / "fp8"), FP8.block), by_rank[0]["fp8"])
    _check_tokens(dequantized_reference(hf4, int4_weights), by_rank[0]["int4"])


def _expert_parallel_rank(monkeypatch: pytest.MonkeyPatch, rank: int, size: int) -> None:
    monkeypatch.setattr(sparse_moe, "get_tp", lambda: TensorParallel(rank=rank, size=size))
    monkeypatch.setattr(sparse_moe, "is_expert_parallel", lambda: True)


def test_expert_parallel_layers_hold_whole_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 holds experts 2 and 3 at their full width 96, so 32-wide blocks fit (cut, 48 would not)."""
    _expert_parallel_rank(monkeypatch, 1, 2)
    moe = sparse_moe.ParallelFusedMoE(4, 2, 64, 96, renormalize=True)
    assert tuple(moe.w13_weight.shape) == (2, 192, 64) and moe.placement.local_experts == range(2, 4)
    check_expert_blocks(sparse_moe.MoeCausalLM(), "layer.experts", moe, WeightBlocks(32, 32, "blocks"))
    full = torch.arange(4 * 192 * 64, dtype=torch.float32).view(4, 192, 64)
    assert moe.full_shape("w13_weight") == (4, 192, 64)
    assert torch.equal(moe.take_shard("w13_weight", full), full[2:])
    with pytest.raises(
        ValueError, match=r"num_experts \(3\) is not divisible by the expert-parallel size \(2\)"
    ):
        sparse_moe.ParallelFusedMoE(3, 2, 64, 96, renormalize=True)


def test_enable_expert_parallel_is_validated() -> None:
    assert ModelConfig(model="m").enable_expert_parallel is False
    with pytest.raises(ValueError, match="enable_expert_parallel must be true or false, got 'yes'"):
        ModelConfig(model="m", enable_expert_parallel="yes")  # type: ignore[arg-type]


def test_the_expert_parallel_decision_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _expert_parallel_rank(monkeypatch, 1, 2)
    model = torch.nn.Sequential(sparse_moe.ParallelFusedMoE(4, 2, 64, 96, renormalize=True))
    with caplog.at_level(logging.INFO, logger="treadle_model_runner.runner.describe"):
        log_expert_parallel(model, True, 2)
        log_expert_parallel(model, True, 1)
        log_expert_parallel(torch.nn.Sequential(), True, 2)
        log_expert_parallel(model, False, 2)
    assert caplog.messages == [
        "expert parallelism: this rank holds whole experts 2-3 of 4 in each of 1 MoE layers",
        "expert parallelism: no effect (one device)",
        "expert parallelism: no effect (the model has no routed experts)",
    ]


STATIC = Fp8Format("fp8", "tensor", static=True)
MIXTRAL_FILES = "model.layers.1.block_sparse_moe.experts"


def _static_rank_main(rank: int, init_method: str, path: Path, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        runner = make_runner(path, tensor_parallel_size=2, enable_expert_parallel=True)
        got = greedy_with_logprobs(runner)
        moe = runner._require_model().get_submodule("model.layers.1.mlp.experts")
        scales = moe.fp8_scales()
        got["w13"] = moe.w13_weight.view(torch.uint8).tolist()
        got["inputs"] = [scales.w13_input.item(), scales.w2_input.item()]
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_static_fp8_expert_parallel_ranks_fold_every_experts_input_scales(tmp_path: Path) -> None:
    """A Mixtral-8x7B-Instruct-FP8-style checkpoint (per-expert static input scales, growing with the expert id):
    each rank holds its two whole experts but folds all four experts' input scales, as one device does, so the
    tokens are the static reference's."""
    hf = _hf("mixtral")
    files = moe_fp8_tensors(hf, STATIC)
    write_checkpoint(hf, tmp_path, files, fp8_quantization_config(STATIC))
    by_rank = two_rank_results(_static_rank_main, tmp_path)
    w13_max = max(
        float(files[f"{MIXTRAL_FILES}.{e}.{p}.input_scale"]) for e in range(4) for p in ("w1", "w3")
    )
    w2_max = max(float(files[f"{MIXTRAL_FILES}.{e}.w2.input_scale"]) for e in range(4))
    for rank, got in by_rank.items():
        for i, e in enumerate((2 * rank, 2 * rank + 1)):
            w13 = torch.cat([files[f"{MIXTRAL_FILES}.{e}.{p}.weight"] for p in ("w1", "w3")]).view(
                torch.uint8
            )
            assert torch.equal(torch.tensor(got["w13"][i], dtype=torch.uint8), w13), (rank, e)
        assert got["inputs"] == [w13_max, w2_max], rank
    _check_tokens(moe_channel_reference(hf, files), by_rank[0])
