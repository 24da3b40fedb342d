"""Tensor parallelism over four ranks on CPU (gloo): what two ranks cannot show. With 4 query heads and 2 key/value
heads each rank holds one query head and a key/value head shared with its neighbour (OLMo 2 with one key/value head:
all four hold it, and its q/k norms sum squares over four ranks); vocabularies of 129 and 131 rows do not divide by
four; MLP and expert columns (96, 32, the shared expert's 48) are cut in four. Each model's tokens
and logprobs, for test_runner_parallel.py's request mix (chunked prefills, sampling, prompt logprobs, a request
verifying drafts), equal the one-rank runner's.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from test_runner_parallel import _run, check_same_outputs, model_configs, save_checkpoints, two_rank_results

from treadle_model_runner.parallel import destroy_tensor_parallel, init_tensor_parallel

RANKS = 4
MODELS = ("llama", "gemma3", "olmo2", "qwen3_moe", "qwen2_moe")  # test_runner_parallel.model_configs()


def _checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    return save_checkpoints(root, {name: model_configs()[name] for name in MODELS}, seed=20)


def _rank_main(rank: int, init_method: str, dirs: dict[str, tuple[Path, str]], results: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_tensor_parallel(rank, RANKS, init_method, torch.device("cpu"))
        got = {name: _run(path, fmt, tp=RANKS) for name, (path, fmt) in dirs.items()}
        destroy_tensor_parallel()
        results.put((rank, got if rank == 0 else None))
    except BaseException:
        results.put((rank, traceback.format_exc()))
        raise


def test_four_ranks_match_one(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path)
    expected = {name: _run(path, fmt, tp=1) for name, (path, fmt) in dirs.items()}
    got = two_rank_results(_rank_main, dirs, ranks=RANKS, timeout_s=900)[0]
    check_same_outputs(got, expected)
