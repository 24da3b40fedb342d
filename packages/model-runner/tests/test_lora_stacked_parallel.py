"""LoRA adapters on Phi-3's stacked projections under tensor parallelism on CPU (gloo): two ranks, each a ModelRunner
holding its rows of every part of qkv_proj and gate_up_proj, run test_lora_parallel.py's mixed batch (base rows and
two PEFT adapters on qkv_proj, o_proj, gate_up_proj and down_proj; one rank 8, one rsLoRA rank 4). On both ranks
every scheduled position's logits are within 1e-4 of the HF model with that request's adapter merged into its
weights, and the tokens equal the one-rank runner's (and the merged model's `generate`).

Each rank must take its rows of lora_B [q + k + v rows, r] part by part (its q rows, its k rows, its v rows), as
the stacked weight is cut; a cut of B as one block would give rank 0 every q row and no k or v row. Two tiny
Phi-4-mini-like models (partial rotary, longrope on its long factors, tied embeddings): "gqa" has two key/value heads,
one on each rank; "mqa" has one, which both ranks hold (each rank's k and v rows of B are then all of them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lora_fixtures import MergedReference, save_adapter
from test_lora_parallel import Case, check_run, run_one_and_two_ranks
from test_models import _config
from test_runner_fakes import perturb_

from treadle_model_runner.lora import LoRARequest

PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _cases(root: Path) -> dict[str, Case]:
    config, cls = _config("phi4_mini")
    configs = {"gqa": config, "mqa": type(config)(**(config.to_dict() | {"num_key_value_heads": 1}))}
    cases = {}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        hf = cls(config).eval()
        perturb_(hf, seed=seed, std=0.15)
        hf.save_pretrained(root / name / "base", safe_serialization=True)
        adapters = {
            "a": save_adapter(hf, root / name / "a", seed=10 + seed, r=8, alpha=16, targets=PHI3_TARGETS),
            "b": save_adapter(hf, root / name / "b", seed=20 + seed, r=4, alpha=6, targets=PHI3_TARGETS,
                              use_rslora=True),
        }  # fmt: skip
        loras = {a: LoRARequest(a, i + 1, str(path)) for i, (a, path) in enumerate(adapters.items())}
        cases[name] = Case(hf, root / name / "base", loras, adapters)
    return cases


def test_two_ranks_cut_stacked_adapters_part_by_part(tmp_path: Path) -> None:
    cases = _cases(tmp_path)
    assert cases["mqa"].hf.config.num_key_value_heads == 1 and cases["gqa"].hf.config.num_key_value_heads == 2
    one_rank, by_rank = run_one_and_two_ranks(cases)
    for name, case in cases.items():
        merged = MergedReference(case.hf, case.adapters)
        check_run(one_rank[name], one_rank[name], merged, name)
        for rank, runs in sorted(by_rank.items()):
            check_run(runs[name], one_rank[name], merged, f"{name} rank {rank}")
