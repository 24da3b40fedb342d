"""Register caps (``maxnreg``) for the one-row linear kernel: each candidate tile config of Llama-3.1-8B's
projections timed uncapped and under a range of caps, plus the config ``linear._config`` runs today.

A cap makes ptxas fit each thread into fewer registers, so more programs share an SM (or, below what the tile
needs, spills). On an H200 with Triton 3.6 it moved single projections by 1-2 us where tiles alone did not
(results/gpu-regcap-h200-3570cf7/call4). Timing as in gemv_sweep.py: CUDA graphs cycling enough weight copies
that no call finds its weight in L2, every config checked against the op's native spec first, each timed twice.

Usage (GPU machine): python3 benchmarks/gemv_caps.py --out OUT/caps.json [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from treadle_kernels.ops import linear as fused

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import gemv_sweep as gs

CONFIGS = {  # projection: candidate (block_n, block_k, warps, stages)
    "qkv+norm": [(8, 2048, 4, 3), (8, 4096, 8, 3), (4, 2048, 4, 3)],
    "o_proj": [(4, 2048, 4, 3), (4, 2048, 4, 1), (4, 4096, 8, 3), (8, 4096, 8, 3)],
    "gate_up+norm": [(8, 4096, 8, 3), (8, 2048, 4, 3), (8, 2048, 8, 3)],
    "down+silu": [(8, 2048, 8, 1), (4, 2048, 8, 3), (8, 1024, 8, 3)],
    "lm_head": [(4, 4096, 4, 3), (8, 4096, 8, 3)],
}
CAPS = (0, 56, 64, 72, 80, 88, 96, 104, 112, 128)  # 0: no cap


def _call(prologue: int, t: dict, w: torch.Tensor, cfg: fused.Config) -> torch.Tensor:
    k = w.shape[1]
    if prologue == fused._NORM:
        return fused._launch(prologue, t["x"], k, w, None, cfg, t["residual"], t["norm_weight"], 1e-5)[0]
    return fused._launch(prologue, t["x"], k, w, None, cfg)[0]


def _sweep(name: str, tiles: list[tuple[int, int, int, int]], res: dict) -> None:
    prologue, n, k = gs.SHAPES[name]
    copies = max(2, -(-256 * 2**20 // (n * k * 2)))
    t = gs._inputs(prologue, n, k, 1, copies)
    ref = gs._native(prologue, t, t["weights"][0]).float()
    chosen = fused._config(prologue, 1, n, k)
    assert chosen is not None
    res["chosen"][name] = list(chosen)
    runs = [(str(c), fused.Config(1, *c, maxnreg=cap)) for c in tiles for cap in CAPS]
    for label, cfg in [*runs, ("chosen", chosen)]:
        got = _call(prologue, t, t["weights"][0], cfg).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()

        def fn(i: int, cfg: fused.Config = cfg) -> torch.Tensor:
            return _call(prologue, t, t["weights"][i], cfg)

        us = [gs._graph_us(fn, copies) for _ in range(2)]
        key = f"{name} {label} cap={cfg.maxnreg}"
        res["us"][key] = {"us": us, "rel_err": err}
        print(f"{key:45s} {us[0]:8.2f} {us[1]:8.2f} err {err:.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "commit": args.commit, "us": {}, "chosen": {}}
    for name, tiles in CONFIGS.items():
        _sweep(name, tiles, res)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
