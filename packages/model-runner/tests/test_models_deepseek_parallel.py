"""DeepSeek-V2 and -V3 (test_models_deepseek.py's tiny configs) on two ranks (gloo, CPU, fp32).

- Under tensor parallelism (MLA's 4 heads 2 a rank: V2's q_proj and V3's q_b_proj cut by heads beside the replicated
  latent projection, kv_b_proj's per-head W_UK / W_UV blocks, o_proj row-parallel; the dense layer's MLP, the shared
  expert and the routed experts' columns cut) and, for V3, under expert parallelism (whole experts a rank, the router
  and its correction bias replicated): the one-rank tokens, logprobs within 1e-4.
- V3 from a block-wise fp8 checkpoint (16 x 16 blocks, test_quantization_fp8_deepseek.py's) under tensor
  parallelism: each rank's fp8 bytes and block grids are exactly its cut of the one-rank model's (q_b_proj's rows
  and o_proj's columns halved, fused_qkv_a_proj whole, every expert's gate and up rows and down columns halved) and
  its kv_b_proj its heads' rows of the dequantized weight; greedy tokens equal the one-rank run's. The logprobs only
  within 0.1: the ranks sum o_proj / down_proj in another order, and where that moves an activation across an e4m3
  rounding boundary its group quantizes to the neighbouring step, which this tiny model's near-tied routing can
  turn into another expert (every part is exact on its own: leaving any one projection unquantized gives 1e-6).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from fp8_block_checkpoints import BlockFormat, write_block_checkpoint
from test_models_deepseek import _tiny, tiny_hf
from test_quantization_fp8_parallel import check_same_greedy, greedy_with_logprobs
from test_runner_fakes import make_runner
from test_runner_parallel import two_rank_results

from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel
from treadle_model_runner.runner import ModelRunner

# mode -> (checkpoint, enable_expert_parallel)
MODES = {"v2 tp": ("v2", False), "v3 tp": ("v3", False), "v3 ep": ("v3", True), "fp8 tp": ("fp8", False)}


def _shards(runner: ModelRunner) -> dict[str, Any]:
    """What one rank holds of the first MoE layer: its heads, kv_b_proj's and o_proj's shapes, its experts."""
    layer = runner._require_model().model.layers[1]
    attn, experts = layer.self_attn, layer.mlp.experts
    return {
        "heads": attn.num_heads,
        "kv_b_proj": tuple(attn.kv_b_proj.weight.shape),
        "o_proj": tuple(attn.o_proj.weight.shape),
        "w13": tuple(experts.w13_weight.shape),
    }


def _fp8_tensors(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """The first MoE layer's fp8 bytes (as uint8), block grids and dequantized kv_b_proj."""
    layer = runner._require_model().model.layers[1]
    attn, experts = layer.self_attn, layer.mlp.experts
    out = {"kv_b_proj": attn.kv_b_proj.weight.detach().clone()}
    for name in ("fused_qkv_a_proj", "q_b_proj", "o_proj"):
        proj = getattr(attn, name)
        out[name], out[f"{name} grid"] = (
            proj.weight.view(torch.uint8).clone(),
            proj.weight_scale.detach().clone(),
        )
    for name in ("w13", "w2"):
        out[name] = getattr(experts, f"{name}_weight").view(torch.uint8).clone()
        out[f"{name} grid"] = getattr(experts, f"{name}_weight_scale").detach().clone()
    return out


def _cut(full: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s part of the one-rank `_fp8_tensors`: halves of rows or columns (module docstring)."""

    def half(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.chunk(2, dim=dim)[rank]

    def gate_up(t: torch.Tensor) -> torch.Tensor:  # [E, gate rows + up rows, ...]: half of each
        gate, up = t.chunk(2, dim=1)
        return torch.cat([half(gate, 1), half(up, 1)], dim=1)

    cut = {
        "fused_qkv_a_proj": full["fused_qkv_a_proj"],
        "fused_qkv_a_proj grid": full["fused_qkv_a_proj grid"],
    }
    cut |= {"kv_b_proj": half(full["kv_b_proj"], 0), "q_b_proj": half(full["q_b_proj"], 0),
            "q_b_proj grid": half(full["q_b_proj grid"], 0), "o_proj": half(full["o_proj"], 1),
            "o_proj grid": half(full["o_proj grid"], 1), "w13": gate_up(full["w13"]),
            "w13 grid": gate_up(full["w13 grid"]), "w2": half(full["w2"], 2), "w2 grid": half(full["w2 grid"], 2)}  # fmt: skip
    return cut


def _rank_main(rank: int, init_method: str, paths: dict[str, Path], results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got: dict[str, Any] = {}
        for mode, (kind, ep) in MODES.items():
            runner = make_runner(paths[kind], tensor_parallel_size=2, enable_expert_parallel=ep)
            got[mode] = {**greedy_with_logprobs(runner), "shards": _shards(runner)}
            if (
                kind == "fp8"
            ):  # plain lists: tensors would cross the queue as shared memory the exiting rank takes
                got[mode]["fp8"] = {k: t.tolist() for k, t in _fp8_tensors(runner).items()}
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_two_ranks_match_one_under_tensor_and_expert_parallelism(tmp_path: Path) -> None:
    paths = {kind: _tiny(kind, tmp_path / kind)[1] for kind in ("v2", "v3")}
    paths["fp8"] = tmp_path / "fp8"
    write_block_checkpoint(
        tiny_hf("v3", q_lora_rank=32, vocab_size=160), paths["fp8"], BlockFormat("fp8", (16, 16))
    )
    by_rank = two_rank_results(_rank_main, paths)
    for kind, path in paths.items():
        one = make_runner(path)
        expected, full = greedy_with_logprobs(one), _shards(one)
        assert full == {"heads": 4, "kv_b_proj": (4 * 40, 32), "o_proj": (64, 4 * 24), "w13": (8, 64, 64)}
        for rank, got in by_rank.items():
            for mode in (m for m, (k, _) in MODES.items() if k == kind):
                # heads always cut in two; the experts' columns (tp) or whole experts (ep)
                w13 = (4, 64, 64) if mode.endswith("ep") else (8, 32, 64)
                assert got[mode]["shards"] == {"heads": 2, "kv_b_proj": (2 * 40, 32), "o_proj": (64, 2 * 24),
                                               "w13": w13}, (mode, rank)  # fmt: skip
                if kind != "fp8":
                    check_same_greedy(got[mode], expected, (mode, rank))
                    continue
                for name, t in _cut(_fp8_tensors(one), rank).items():
                    assert torch.equal(torch.tensor(got[mode]["fp8"][name], dtype=t.dtype), t), (name, rank)
                assert got[mode]["tokens"] == expected["tokens"], rank
                for req_id, steps in expected["logprobs"].items():
                    for (ids_a, lp_a), (ids_b, lp_b) in zip(
                        got[mode]["logprobs"][req_id], steps, strict=True
                    ):
                        assert (
                            ids_a == ids_b and max(abs(a - b) for a, b in zip(lp_a, lp_b, strict=True)) < 0.1
                        )
