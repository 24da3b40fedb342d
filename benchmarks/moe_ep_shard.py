"""One rank's routed experts under expert parallelism against tensor parallelism, on one GPU (Qwen3-30B-A3B shapes).

With two ranks, expert parallelism gives a rank 64 whole experts of the 128 (N = 768) and tensor parallelism a
half-width slice of all 128 (N = 384); both take every token and finish with the same all-reduce, so the difference
between them on a rank is this layer's kernel time (and how evenly the router spreads the load over the ranks).
This times one layer of each as the model runner builds it (treadle_moe FusedMoE with the placement or the shard),
replayed from CUDA graphs, on the same hidden states and router logits:
  - `uniform`: random router logits (each expert about M * top_k / E slots, both ranks alike);
  - `skewed`: logits with one shared component, so that rank 0's experts take --skew of the slots (the EP rank
    with the heavier half then sets the step's pace; TP ranks stay even).
Reported per token count: median µs of each and EP / TP.

    python benchmarks/moe_ep_shard.py --out OUT.json [--tokens 16,64,256,512,1024,4096]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from treadle_moe import FusedMoE
from treadle_moe.placement import ExpertPlacement

E, TOP_K, K, N = 128, 8, 2048, 768


def layer(placement: ExpertPlacement | None, intermediate: int, seed: int) -> FusedMoE:
    moe = FusedMoE(E, TOP_K, K, intermediate, dtype=torch.bfloat16, device="cuda", placement=placement)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        moe.w13_weight.normal_(0.0, 0.02, generator=gen)
        moe.w2_weight.normal_(0.0, 0.02, generator=gen)
    return moe


def logits_for(m: int, skew: float | None, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(m, E, device="cuda", generator=gen)
    if skew is not None:  # raise rank 0's experts until they take `skew` of the top-k slots
        lo, hi = 0.0, 8.0
        for _ in range(30):
            bias = (lo + hi) / 2
            shifted = logits.clone()
            shifted[:, : E // 2] += bias
            share = (shifted.topk(TOP_K, dim=-1).indices < E // 2).float().mean().item()
            lo, hi = (bias, hi) if share < skew else (lo, bias)
        logits[:, : E // 2] += (lo + hi) / 2
    return logits.to(torch.bfloat16)


def graph_us(fn, replays: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16,64,256,512,1024,4096")
    parser.add_argument("--skew", type=float, default=0.6)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ep = [layer(ExpertPlacement.linear(E, r, 2), N, seed=1) for r in (0, 1)]
    tp = layer(None, N // 2, seed=2)
    rows = []
    for m in [int(t) for t in args.tokens.split(",")]:
        hidden = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        for routing, skew in (("uniform", None), ("skewed", args.skew)):
            logits = logits_for(m, skew, seed=m)
            share = (logits.float().topk(TOP_K, dim=-1).indices < E // 2).float().mean().item()
            ep_us = [graph_us(lambda moe=moe, h=hidden, g=logits: moe(h, g)) for moe in ep]
            tp_us = graph_us(lambda h=hidden, g=logits: tp(h, g))
            row = {"tokens": m, "routing": routing, "rank0_share": round(share, 3),
                   "ep_rank_us": [round(t, 1) for t in ep_us], "tp_rank_us": round(tp_us, 1),
                   "ep_over_tp": round(max(ep_us) / tp_us, 3)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    record = {
        "benchmark": "moe_ep_shard",
        "device": torch.cuda.get_device_name(),
        "commit": os.environ.get("COMMIT", ""),
        "command": " ".join(["python3", "benchmarks/moe_ep_shard.py", *sys.argv[1:]]),
        "workload": f"Qwen3-30B-A3B layer shapes (E={E}, top-{TOP_K}, K={K}, N={N}), bf16, one rank of two: EP 64 "
        f"whole experts against TP all 128 at N/2, CUDA-graph replays, median of 50",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
