"""Sweep of the persistent, software-pipelined one-row linear kernel (treadle_kernels.ops.linear_stream_kernels)
against the production small-batch linear kernel, on Llama-3.1-8B's projections at one row, inside CUDA graphs.

For each projection (qkv with the input norm fused, o_proj plain, gate_up with the post-attention norm fused, down
with SiLU-and-mul fused, lm_head plain): the production config (`linear._config(prologue, 1, n, k)`, what batch-1
decode runs) is timed, then every stream config: block_n in (4, 8, 16) x block_k in (512, 1024, 2048) with
2048 <= block_n * block_k <= 16384, num_warps in (4, 8), num_stages in (2, 3, 4), num_programs = SM count x
(1, 2, 4). Every config's output is checked against the op's native spec first (||got - expected|| / ||expected||
<= 1e-2; the norm prologue's residual_out too) and timed only if it passes. Timing as benchmarks/gemv_sweep.py
(whose inputs, native spec and graph timer this reuses): mean us per call in a CUDA graph cycling over enough
weight copies (>= 256 MB) that no call finds its weight in L2. GB/s = weight bytes / time.

Usage (GPU machine): python3 benchmarks/gemv_stream_sweep.py --out OUT/gemv_stream.json --commit SHA
`--compile-only I/N` runs part I of N of the kernel variants once each (fills Triton's cache; several processes
at once); num_programs is not specialised on, so each (prologue, tiles, warps, stages) compiles once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from gemv_sweep import SHAPES, _fused_call, _graph_us, _inputs, _native

from treadle_kernels.ops import linear as fused

MAX_REL_ERR = 1e-2
# the sweep's axes (--block-n etc. override them): tiles with 2048 <= block_n * block_k <= 32768 are kept
GRID = {"block_n": (4, 8, 16), "block_k": (512, 1024, 2048), "warps": (4, 8), "stages": (2, 3, 4),
        "programs_per_sm": (1, 2, 4)}  # fmt: skip


class StreamConfig(NamedTuple):
    block_n: int  # outputs per tile
    block_k: int  # inputs per k tile
    num_warps: int
    num_stages: int  # pipeline depth of the flattened (tile, k tile) loop
    num_programs: int  # persistent grid size


def stream_configs(num_sms: int) -> list[StreamConfig]:
    return [
        StreamConfig(bn, bk, w, st, num_sms * per_sm)
        for bn in GRID["block_n"]
        for bk in GRID["block_k"]
        for w in GRID["warps"]
        for st in GRID["stages"]
        for per_sm in GRID["programs_per_sm"]
        if 2048 <= bn * bk <= 32768
    ]


def _stream_call(prologue: int, t: dict, w: torch.Tensor, cfg: StreamConfig) -> tuple:
    from treadle_kernels.ops.linear_stream_kernels import launch_stream  # imports triton: not for --help

    k = w.shape[1]
    if prologue == fused._NORM:
        return launch_stream(prologue, t["x"], k, w, None, *cfg, t["residual"], t["norm_weight"], 1e-5)
    return launch_stream(prologue, t["x"], k, w, None, *cfg)


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    return ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _stream_err(prologue: int, t: dict, w: torch.Tensor, cfg: StreamConfig, expected: torch.Tensor) -> float:
    out, residual_out = _stream_call(prologue, t, w, cfg)
    err = _rel_err(out, expected)
    if prologue == fused._NORM:
        err = max(err, _rel_err(residual_out, t["x"] + t["residual"]))
    return err


def _gbps(weight_bytes: int, us: float) -> float:
    return round(weight_bytes / us / 1e3, 1)


def measure(name: str, num_sms: int) -> dict:
    prologue, n, k = SHAPES[name]
    weight_bytes = n * k * 2
    copies = max(2, math.ceil(256e6 / weight_bytes))
    t = _inputs(prologue, n, k, 1, copies)
    ws = t["weights"]
    expected = _native(prologue, t, ws[0])
    production = fused._config(prologue, 1, n, k)
    assert production is not None, f"no production one-row config for {name} ({n} x {k})"
    production_us = _graph_us(lambda i: _fused_call(prologue, t, ws[i], production), copies)
    entry: dict = {
        "n": n,
        "k": k,
        "weight_MB": round(weight_bytes / 1e6, 1),
        "production": {
            "config": list(production),
            "us": round(production_us, 2),
            "GBps": _gbps(weight_bytes, production_us),
            "rel_err": round(_rel_err(_fused_call(prologue, t, ws[0], production), expected), 5),
        },
        "configs": [],
        "bad_configs": [],
    }
    for cfg in stream_configs(num_sms):
        try:
            err = _stream_err(prologue, t, ws[0], cfg, expected)
        except (
            Exception
        ) as exc:  # e.g. triton's OutOfResources (shared memory) for deep pipelines of wide tiles
            entry["bad_configs"].append({"config": list(cfg), "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        if not err <= MAX_REL_ERR:  # NaN fails too
            entry["bad_configs"].append({"config": list(cfg), "rel_err": err})
            continue
        us = _graph_us(lambda i, c=cfg: _stream_call(prologue, t, ws[i], c)[0], copies)
        entry["configs"].append({"config": list(cfg), "us": round(us, 2), "rel_err": round(err, 5)})
    best = min(entry["configs"], key=lambda c: c["us"]) if entry["configs"] else None
    entry["best"] = best
    if best:
        entry["best_GBps"] = _gbps(weight_bytes, best["us"])
        entry["speedup_vs_production"] = round(production_us / best["us"], 3)
    return entry


def sweep(num_sms: int) -> dict:
    results: dict = {}
    for name in SHAPES:
        entry = results[name] = measure(name, num_sms)
        prod, best = entry["production"], entry["best"] or {"us": float("nan"), "config": None}
        print(
            f"{name:14s}: production {prod['us']:7.2f} us {prod['config']} {prod['GBps']} GB/s; "
            f"best stream {best['us']:7.2f} us {best['config']} {entry.get('best_GBps', 0)} GB/s "
            f"(x{entry.get('speedup_vs_production', float('nan'))}; {len(entry['bad_configs'])} bad configs)",
            flush=True,
        )
    return results


def compile_part(part: int, parts: int, num_sms: int) -> None:
    """Part `part` of `parts` of the kernel variants, each run once: one shape per prologue (n and k are all
    multiples of 16, so they share a compile), one num_programs per tile config (not specialised on)."""
    names: dict[int, str] = {}  # prologue -> the first projection with it
    for name, (prologue, _, _) in SHAPES.items():
        names.setdefault(prologue, name)
    configs = [c for c in stream_configs(num_sms) if c.num_programs == num_sms * GRID["programs_per_sm"][0]]
    jobs = [(name, cfg) for name in names.values() for cfg in [None, *configs]]  # None: the production config
    for i, (name, cfg) in enumerate(jobs):
        if i % parts == part:
            prologue, n, k = SHAPES[name]
            t = _inputs(prologue, n, k, 1, 1)
            if cfg is None:
                production = fused._config(prologue, 1, n, k)
                assert production is not None, f"no production one-row config for {name} ({n} x {k})"
                _fused_call(prologue, t, t["weights"][0], production)
            else:
                try:
                    _stream_call(prologue, t, t["weights"][0], cfg)
                except Exception as exc:  # recorded by the sweep itself
                    print(f"{name} {cfg}: {type(exc).__name__}", flush=True)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--commit", default="unknown", help="the commit measured, recorded in the JSON")
    parser.add_argument(
        "--compile-only", metavar="I/N", help="only compile part I of N of the kernel variants"
    )
    for axis, values in GRID.items():
        parser.add_argument(f"--{axis.replace('_', '-')}", default=",".join(map(str, values)),
                            help=f"comma-separated {axis} values (default %(default)s)")  # fmt: skip
    args = parser.parse_args()
    for axis in GRID:
        GRID[axis] = tuple(int(v) for v in getattr(args, axis).split(","))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (this sweep times kernels inside CUDA graphs)")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    if args.compile_only:
        part, parts = (int(v) for v in args.compile_only.split("/"))
        compile_part(part, parts, num_sms)
        return
    t0 = time.time()
    results = sweep(num_sms)
    record = {
        "item": "persistent software-pipelined one-row linear kernel: config sweep vs the production kernel",
        "device": torch.cuda.get_device_name(),
        "num_sms": num_sms,
        "commit": args.commit,
        "command": "python3 benchmarks/gemv_stream_sweep.py --out gemv_stream.json "
        + " ".join(f"--{a.replace('_', '-')} {','.join(map(str, v))}" for a, v in GRID.items())
        + f" (TREADLE_PDL={os.environ.get('TREADLE_PDL', '0')}, "
        f"TREADLE_STREAM_LINEAR={os.environ.get('TREADLE_STREAM_LINEAR', '0')})",
        "dtype": "bfloat16",
        "baseline": "production: small_m_linear_kernel with linear._config's one-row config, same run; all inside "
        "CUDA graphs, weights cycled past L2 (gemv_sweep._graph_us)",
        "seconds": round(time.time() - t0, 1),
        "numbers": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
