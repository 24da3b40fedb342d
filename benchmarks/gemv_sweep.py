"""Tile sweep of the fused small-batch linear kernel (treadle_kernels.ops.linear) against the unfused path it
replaces, on Llama-3.1-8B's projections, inside CUDA graphs (as a decode step runs them).

For each projection (qkv with the input norm fused, o_proj plain, gate_up with the post-attention norm fused,
down with SiLU-and-mul fused, lm_head plain) and each row count (1, 2, 4, 8, 16), every tile config is timed,
and so is the same-run baseline: the Triton norm / activation kernel followed by cuBLAS `F.linear` (what decode
ran before), and cuBLAS `F.linear` alone. Each timed graph cycles over enough copies of the weight (>= 256 MB in
all) that no call finds its weight in L2. Every config's output is checked against the op's native spec first.

Usage (GPU machine): python3 benchmarks/gemv_sweep.py --out OUT/gemv.json --commit SHA [--compile-only I/N]
`--compile-only I/N` runs part I of N of the configs once each (fills Triton's cache; several processes at once).
`--rows 1` sweeps only one row (with TREADLE_PDL=1 in the environment: the configs launched with PDL).
`--chosen` times only the one-row config each projection runs with (`linear._config`), with programmatic dependent
launch off and on (back-to-back calls in one graph: with PDL each call overlaps the tail of the one before).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import treadle_kernels  # noqa: F401  (registers the triton providers)
from treadle_ir import ops
from treadle_kernels.ops import linear as fused
from treadle_kernels.ops import support
from treadle_kernels.ops.linear import Config

SHAPES = {  # name: (prologue, n, k)
    "qkv+norm": (fused._NORM, 6144, 4096),
    "o_proj": (fused._PLAIN, 4096, 4096),
    "gate_up+norm": (fused._NORM, 28672, 4096),
    "down+silu": (fused._SILU, 4096, 14336),
    "lm_head": (fused._PLAIN, 128256, 4096),
}
ROW_COUNTS = (1, 2, 4, 8, 16)
ROWS1 = [
    Config(1, bn, bk, w, st)
    for bn in (4, 8, 16)
    for bk in (512, 1024, 2048, 4096)
    for w in (4, 8, 16)
    for st in (1, 3)
    if 2048 <= bn * bk <= 32768
]
ROWS16 = [Config(16, bn, bk, 4, st) for bn in (16, 32, 64) for bk in (64, 128, 256) for st in (2, 4)]


def _inputs(prologue: int, n: int, k: int, rows: int, copies: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    width = 2 * k if prologue in (fused._SILU, fused._GELU_TANH) else k
    return {
        "x": torch.randn(rows, width, device=dev, dtype=dt),
        "residual": torch.randn(rows, k, device=dev, dtype=dt),
        "norm_weight": torch.rand(k, device=dev, dtype=dt) + 0.5,
        "weights": [torch.randn(n, k, device=dev, dtype=dt) * k**-0.5 for _ in range(copies)],
    }


def _fused_call(prologue: int, t: dict, w: torch.Tensor, cfg: Config) -> torch.Tensor:
    k = w.shape[1]
    if prologue == fused._NORM:
        return fused._launch(prologue, t["x"], k, w, None, cfg, t["residual"], t["norm_weight"], 1e-5)[0]
    return fused._launch(prologue, t["x"], k, w, None, cfg)[0]


def _unfused_call(prologue: int, t: dict, w: torch.Tensor) -> torch.Tensor:
    if prologue == fused._NORM:
        return F.linear(ops.fused_add_rms_norm(t["x"], t["residual"], t["norm_weight"], 1e-5)[0], w)
    if prologue == fused._SILU:
        return F.linear(ops.silu_and_mul(t["x"]), w)
    return F.linear(t["x"], w)


def _native(prologue: int, t: dict, w: torch.Tensor) -> torch.Tensor:
    if prologue == fused._NORM:
        return ops.add_rms_norm_linear.native(t["x"], t["residual"], t["norm_weight"], 1e-5, w, None)[0]
    if prologue == fused._SILU:
        return ops.silu_and_mul_linear.native(t["x"], w, None)
    return F.linear(t["x"], w)


def _graph_us(fn, copies: int, repeats: int = 4, replays: int = 20) -> float:
    """Mean µs per call of fn(i) over a CUDA graph that calls it for every weight copy, `repeats` times."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for i in range(copies):
                fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * repeats * copies)


def _configs(rows: int) -> list[Config]:
    return ROWS1 if rows == 1 else ROWS16


def compile_part(part: int, parts: int, row_counts: tuple[int, ...]) -> None:
    jobs = [
        (name, rows, cfg)
        for name in SHAPES
        for rows in {min(r, 16) for r in row_counts}
        for cfg in _configs(rows)
    ]
    for i, (name, rows, cfg) in enumerate(jobs):
        if i % parts == part:
            prologue, n, k = SHAPES[name]
            t = _inputs(prologue, n, k, rows, 1)
            _fused_call(prologue, t, t["weights"][0], cfg)
    torch.cuda.synchronize()


def _measure(prologue: int, n: int, k: int, rows: int) -> dict:
    weight_bytes = n * k * 2
    copies = max(2, math.ceil(256e6 / weight_bytes))
    t = _inputs(prologue, n, k, rows, copies)
    ws = t["weights"]
    expected = _native(prologue, t, ws[0]).float()
    entry: dict = {
        "n": n,
        "k": k,
        "rows": rows,
        "weight_MB": round(weight_bytes / 1e6, 1),
        "unfused_us": round(_graph_us(lambda i: _unfused_call(prologue, t, ws[i]), copies), 2),
        "cublas_linear_only_us": round(_graph_us(lambda i: F.linear(t["x"][:, :k], ws[i]), copies), 2),
        "configs": [],
    }
    for cfg in _configs(rows):
        got = _fused_call(prologue, t, ws[0], cfg).float()
        err = ((got - expected).norm() / expected.norm()).item()
        us = _graph_us(lambda i, c=cfg: _fused_call(prologue, t, ws[i], c), copies)
        entry["configs"].append({"config": list(cfg), "us": round(us, 2), "rel_err": round(err, 5)})
    ok = [c for c in entry["configs"] if c["rel_err"] <= 1e-2]
    entry["bad_configs"] = [c["config"] for c in entry["configs"] if c["rel_err"] > 1e-2]
    entry["best"] = best = min(ok, key=lambda c: c["us"]) if ok else None
    if best:
        entry["best_GBps"] = round(weight_bytes / best["us"] / 1e3, 1)
        entry["speedup_vs_unfused"] = round(entry["unfused_us"] / best["us"], 3)
    return entry


def sweep(row_counts: tuple[int, ...] = ROW_COUNTS) -> dict:
    results: dict = {}
    for name, (prologue, n, k) in SHAPES.items():
        for rows in row_counts:
            entry = results[f"{name}/rows{rows}"] = _measure(prologue, n, k, rows)
            best = entry["best"] or {"us": float("nan"), "config": None}
            print(
                f"{name:14s} rows {rows:2d}: unfused {entry['unfused_us']:7.2f} us, "
                f"cublas {entry['cublas_linear_only_us']:7.2f}, best {best['us']:7.2f} {best['config']} "
                f"{entry.get('best_GBps', 0)} GB/s",
                flush=True,
            )
    return results


def _chosen_entry(prologue: int, n: int, k: int) -> dict:
    cfg = fused._config(prologue, 1, n, k)
    assert cfg is not None, f"no one-row config for {n} x {k}"
    copies = max(2, math.ceil(256e6 / (n * k * 2)))
    t = _inputs(prologue, n, k, 1, copies)
    ws = t["weights"]
    entry = {"config": list(cfg), "weight_MB": round(n * k * 2 / 1e6, 1)}
    entry["unfused_us"] = round(_graph_us(lambda i: _unfused_call(prologue, t, ws[i]), copies), 2)
    for label, flag in (("us", "0"), ("pdl_us", "1")):
        os.environ["TREADLE_PDL"] = flag
        support.pdl_enabled.cache_clear()
        entry[label] = round(_graph_us(lambda i: _fused_call(prologue, t, ws[i], cfg), copies), 2)
    os.environ.pop("TREADLE_PDL")
    support.pdl_enabled.cache_clear()
    entry["GBps"] = round(n * k * 2 / entry["us"] / 1e3, 1)
    entry["pdl_GBps"] = round(n * k * 2 / entry["pdl_us"] / 1e3, 1)
    return entry


def chosen() -> dict:
    """The production one-row config of each projection, PDL off and on, against the unfused path."""
    results: dict = {}
    for name, (prologue, n, k) in SHAPES.items():
        results[name] = _chosen_entry(prologue, n, k)
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--compile-only")
    parser.add_argument(
        "--chosen", action="store_true", help="only the production one-row configs, PDL off / on"
    )
    parser.add_argument("--rows", default=",".join(map(str, ROW_COUNTS)), help="row counts to sweep")
    args = parser.parse_args()
    row_counts = tuple(int(r) for r in args.rows.split(","))
    if args.compile_only:
        part, parts = (int(v) for v in args.compile_only.split("/"))
        compile_part(part, parts, row_counts)
        return
    t0 = time.time()
    results = chosen() if args.chosen else sweep(row_counts)
    record = {
        "item": "fused small-batch linear kernel: tile sweep vs the unfused Triton-norm/activation + cuBLAS path",
        "device": torch.cuda.get_device_name(),
        "commit": args.commit,
        "command": "python3 benchmarks/gemv_sweep.py --out gemv.json"
        + (" --chosen" if args.chosen else "")
        + f" --rows {args.rows} (TREADLE_PDL={os.environ.get('TREADLE_PDL', '0')})",
        "baseline": "unfused_us: Triton norm or SiLU kernel + cuBLAS F.linear (the previous decode path); "
        "cublas_linear_only_us: F.linear alone; all inside CUDA graphs, same run, weights cycled past L2",
        "seconds": round(time.time() - t0, 1),
        "numbers": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
