"""DeepSeek-V2 and -V3 (test_models_deepseek.py's tiny configs) on two ranks (gloo, CPU, fp32) give the one-rank
tokens and logprobs: under tensor parallelism (MLA's 4 heads 2 a rank: V2's q_proj and V3's q_b_proj cut by heads
beside the replicated latent projection, kv_b_proj's per-head W_UK / W_UV blocks, o_proj row-parallel; the dense
layer's MLP, the shared expert and the routed experts' columns cut) and, for V3, under expert parallelism (whole
experts a rank, the router and its correction bias replicated).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from test_models_deepseek import _tiny
from test_quantization_fp8_parallel import check_same_greedy, greedy_with_logprobs
from test_runner_fakes import make_runner
from test_runner_parallel import two_rank_results

from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel
from treadle_model_runner.runner import ModelRunner

# mode -> (checkpoint, enable_expert_parallel)
MODES = {"v2 tp": ("v2", False), "v3 tp": ("v3", False), "v3 ep": ("v3", True)}


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


def _rank_main(rank: int, init_method: str, paths: dict[str, Path], results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
        got = {}
        for mode, (kind, ep) in MODES.items():
            runner = make_runner(paths[kind], tensor_parallel_size=2, enable_expert_parallel=ep)
            got[mode] = {**greedy_with_logprobs(runner), "shards": _shards(runner)}
        destroy_tensor_parallel()
        results.put((rank, got))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_two_ranks_match_one_under_tensor_and_expert_parallelism(tmp_path: Path) -> None:
    paths = {kind: _tiny(kind, tmp_path / kind)[1] for kind in ("v2", "v3")}
    by_rank = two_rank_results(_rank_main, paths)
    for kind, path in paths.items():
        one = make_runner(path)
        expected, full = greedy_with_logprobs(one), _shards(one)
        assert full == {"heads": 4, "kv_b_proj": (4 * 40, 32), "o_proj": (64, 4 * 24), "w13": (8, 64, 64)}
        for rank, got in by_rank.items():
            for mode in (m for m, (k, _) in MODES.items() if k == kind):
                check_same_greedy(got[mode], expected, (mode, rank))
                # heads always cut in two; the experts' columns (tp) or whole experts (ep)
                w13 = (4, 64, 64) if mode.endswith("ep") else (8, 32, 64)
                assert got[mode]["shards"] == {"heads": 2, "kv_b_proj": (2 * 40, 32), "o_proj": (64, 2 * 24),
                                               "w13": w13}, (mode, rank)  # fmt: skip
