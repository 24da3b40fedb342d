"""The Triton W4A16 kernel (treadle_kernels.ops.w4a16_linear) against the bf16 production linear, on Llama-3.1-8B's
projections, inside CUDA graphs, on the same GPU in the same process.

For each projection (qkv 6144 x 4096, o_proj 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336) and row count
(1, 16, 64, 256, 1024 by default):
- `bf16`: ``ops.linear`` on the bf16 weight (the unquantized engine's call: the Triton weight-streaming kernel at one
  row, cuBLAS beyond);
- `w4a16`: ``ops.w4a16_linear`` with the production tiles (`choose_config`), group size 128, in the three layouts the
  formats load as: zero points (AWQ, asymmetric GPTQ / compressed-tensors), symmetric (GPTQ-Int4, compressed-tensors
  W4A16 sym), and act order (GPTQ desc_act: a g_idx, the per-row gather path);
- `old`: the same dispatch with the GEMV turned off (``TREADLE_W4A16_GEMV_MAX_ROWS=0``: the tensor-core kernel at
  every row count below the dequantize threshold, the behaviour before ops/w4a16_gemv.py), per layout;
- `gemv`: the GEMV kernel forced (``launch_gemv`` with ``choose_gemv_config``'s tiles) at every row count up to its
  limit (16), above the default threshold too, per layout;
- with ``--sweep`` (default on), the zero-point layout at a grid of tiles around the production ones (`launch` with
  an explicit Config: tile sizes, split K, both ways of unpacking, warps, stages), so the production tiles can be
  retuned from one run; up to 16 rows also a grid of GEMV tiles (JSON ``gemv_sweep``, ``gemv_sweep_best``).
Every configuration is checked against the op's fp32 spec first (||got - expected|| / ||expected|| <= 1e-2) and timed
only if it passes. Timing: benchmarks/gemv_sweep.py's graph timer, cycling over enough weight copies (>= 256 MB of
4-bit weights) that no call finds its weight in L2. Reported: microseconds, GB/s (4-bit weight + scales + zero points +
activations + output, over time) against the measured copy bandwidth, TFLOP/s (2 m n k over time) against the measured
bf16 matmul rate, and the speedup over bf16. A table is printed; ``--out`` writes every number as JSON.

Usage (GPU machine): python3 benchmarks/w4a16_gemm.py --out OUT/w4a16_gemm.json --commit SHA
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from device_ceilings import copy_bandwidth_gbps, matmul_tflops
from gemv_sweep import _graph_us

import treadle_kernels  # noqa: F401  (registers the providers)
from treadle_ir import ops
from treadle_ir.ops.int4 import pack_int4_rows
from treadle_kernels.ops import w4a16_gemv as gemv
from treadle_kernels.ops import w4a16_linear as provider

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GROUP = 128
# (block_m, block_n, block_k, split_k, warps, stages, expand): for up to 16 rows, then up to 64, then more
SMALL_TILES = [
    *(provider.Config(16, bn, 128, split, 4, 4) for bn in (32, 64, 128) for split in (1, 4, 8, 16)),
    provider.Config(16, 64, 128, 8, 4, 3),
    provider.Config(16, 64, 64, 8, 4, 4),
    provider.Config(16, 64, 128, 8, 4, 4, expand=0),
]
MID_TILES = [
    provider.Config(bm, bn, 128, split, 4, 4) for bm in (32, 64) for bn in (64, 128) for split in (1, 4)
]
LARGE_TILES = [
    *(provider.Config(bm, bn, bk, 1, warps, 3)
      for bm, bn in ((64, 128), (128, 128), (128, 256)) for bk in (64, 128) for warps in (4, 8)),
    provider.Config(64, 128, 64, 2, 4, 3),
    provider.Config(128, 128, 64, 2, 8, 3),
]  # fmt: skip
# (block_m, block_n, block_k, split_k, warps, stages) of the GEMV; block_m is set to the rows' (capped at 8)
GEMV_TILES = [
    gemv.GemvConfig(1, bn, bk, split, 4, 1)
    for bn, bk in ((64, 128), (128, 128), (32, 128), (64, 64))
    for split in (4, 8, 16, 32)
]


@contextmanager
def _gemv_rows(value: str) -> Iterator[None]:
    """TREADLE_W4A16_GEMV_MAX_ROWS set to `value` for the dispatches (graph captures) inside."""
    old = os.environ.get("TREADLE_W4A16_GEMV_MAX_ROWS")
    os.environ["TREADLE_W4A16_GEMV_MAX_ROWS"] = value
    provider.gemv_max_rows.cache_clear()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TREADLE_W4A16_GEMV_MAX_ROWS"]
        else:
            os.environ["TREADLE_W4A16_GEMV_MAX_ROWS"] = old
        provider.gemv_max_rows.cache_clear()


def _weights(n: int, k: int, layout: str, seed: int) -> tuple[Any, ...]:
    """(packed_weight, scales, zeros, g_idx) of a random 4-bit projection, weights of about k^-0.5."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, device="cuda")
    scales = ((torch.rand(k // GROUP, n, generator=gen, device="cuda") + 0.5) * 0.3 * k**-0.5).to(
        torch.bfloat16
    )
    zeros = torch.randint(6, 11, (k // GROUP, n), generator=gen, device="cuda").to(torch.uint8)
    g_idx = None
    if layout == "act-order":
        perm = torch.randperm(k, generator=gen, device="cuda")
        g_idx = (torch.argsort(perm) // GROUP).to(torch.int32)
    return pack_int4_rows(q), scales, None if layout == "symmetric" else zeros, g_idx


def _bytes(m: int, n: int, k: int, weights: tuple[Any, ...]) -> int:
    tensors = [t for t in weights if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) + 2 * (m * k + m * n)


def _time_config(
    x: torch.Tensor, copies: list[tuple[Any, ...]], cfg: Any, expected: torch.Tensor
) -> dict[str, Any]:
    """One configuration (None: the op's dispatch; a GemvConfig: the GEMV) checked, then timed; its numbers or its
    error."""

    def call(i: int) -> torch.Tensor:
        if cfg is None:
            return ops.w4a16_linear(x, *copies[i], None, GROUP)
        if isinstance(cfg, gemv.GemvConfig):
            return gemv.launch_gemv(x, *copies[i], None, GROUP, cfg)
        return provider.launch(x, *copies[i], None, GROUP, cfg)

    try:
        got = call(0).float()
        err = float((got - expected).norm() / expected.norm())
        if err > 1e-2:
            return {"error": f"rel err {err:.3g}"}
        return {"us": _graph_us(call, len(copies)), "rel_err": err}
    except Exception as e:  # a tile the compiler refuses (shared memory, registers)
        return {"error": f"{type(e).__name__}: {str(e)[:160]}"}


def _measure(name: str, n: int, k: int, rows: int, sweep: bool, ceilings: dict[str, float]) -> dict[str, Any]:
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    copies_bf16 = max(2, -(-(256 << 20) // (n * k * 2)))
    bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies_bf16)]
    bf16_us = _graph_us(lambda i: ops.linear(x, bf16[i], None), copies_bf16)
    bf16.clear()
    flops = 2 * rows * n * k
    record: dict[str, Any] = {"name": name, "n": n, "k": k, "rows": rows, "bf16_us": bf16_us,
                              "bf16_tflops": flops / bf16_us / 1e6}  # fmt: skip
    copies = max(2, -(-(256 << 20) // (n * k // 2)))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for layout in ("zero-points", "symmetric", "act-order"):
        weights = [_weights(n, k, layout, seed) for seed in range(copies)]
        expected = ops.w4a16_linear.native(x, *weights[0], None, GROUP).float()
        production = provider.choose_config(rows, n, k, GROUP, sms)
        result = _time_config(x, weights, None, expected) | {"config": list(production)}
        with _gemv_rows("0"):
            result["old"] = _time_config(x, weights, None, expected)
        if rows <= gemv.MAX_ROWS:
            gemv_cfg = gemv.choose_gemv_config(rows, n, k, GROUP, sms)
            result["gemv"] = _time_config(x, weights, gemv_cfg, expected) | {"config": list(gemv_cfg)}
        for timed in (result, result["old"], result.get("gemv", {})):
            if "us" in timed:
                us = timed["us"]
                timed |= {"gbps": _bytes(rows, n, k, weights[0]) / us / 1e3, "tflops": flops / us / 1e6,
                          "speedup_vs_bf16": bf16_us / us}  # fmt: skip
                timed["of_copy_bandwidth"] = timed["gbps"] / ceilings["copy_gbps"]
                timed["of_bf16_matmul"] = timed["tflops"] / ceilings["bf16_tflops"]
        record[layout] = result
        if sweep and layout == "zero-points":
            grid = SMALL_TILES if rows <= 16 else MID_TILES if rows <= 64 else LARGE_TILES
            timed = [{"config": list(cfg)} | _time_config(x, weights, cfg, expected) for cfg in grid]
            ok = [t for t in timed if "us" in t]
            record["sweep_best"] = min(ok, key=lambda t: t["us"]) if ok else None
            record["sweep"] = timed
            if rows <= gemv.MAX_ROWS:
                block_m = min(gemv.MAX_BLOCK_M, 1 << (rows - 1).bit_length())
                grid_gemv = [cfg._replace(block_m=block_m) for cfg in GEMV_TILES]
                timed = [{"config": list(cfg)} | _time_config(x, weights, cfg, expected) for cfg in grid_gemv]
                ok = [t for t in timed if "us" in t]
                record["gemv_sweep_best"] = min(ok, key=lambda t: t["us"]) if ok else None
                record["gemv_sweep"] = timed
        weights.clear()
        torch.cuda.empty_cache()
    return record


def _row(r: dict[str, Any]) -> str:
    def cell(v: dict[str, Any] | None) -> str:
        if v is None:
            return f"{'-':>16}"
        return f"{v['us']:9.1f} {v['speedup_vs_bf16']:5.2f}x" if "us" in v else f"{'error':>16}"

    best = r.get("sweep_best")
    best_cell = f"{best['us']:9.1f} {tuple(best['config'])}" if best else ""
    zp = r["zero-points"]
    return (f"{r['name']:8} {r['rows']:5d} {r['bf16_us']:9.1f} {cell(zp)} {cell(r['symmetric'])} "
            f"{cell(r['act-order'])} {cell(zp['old'])} {cell(zp.get('gemv'))}  {best_cell}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON file for every number")
    ap.add_argument("--commit", default="")
    ap.add_argument("--rows", default="1,16,64,256,1024")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="production tiles only")
    args = ap.parse_args()
    t0 = time.time()
    ceilings = {"copy_gbps": copy_bandwidth_gbps(1 << 30), "bf16_tflops": matmul_tflops()}
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy_gbps']:.0f} GB/s, "
          f"bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s", flush=True)  # fmt: skip
    print(f"{'proj':8} {'rows':>5} {'bf16 us':>9} {'zero-points us':>16} {'symmetric us':>16} {'act-order us':>16} "
          f"{'zp old us':>16} {'zp gemv us':>16}  best swept (us, Config)", flush=True)  # fmt: skip
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            results.append(_measure(name, n, k, rows, args.sweep, ceilings))
            print(_row(results[-1]), flush=True)
    record = {"device": torch.cuda.get_device_name(), "commit": args.commit, "command": " ".join(sys.argv),
              "torch": torch.__version__, "ceilings": ceilings, "group_size": GROUP, "dtype": "bfloat16",
              "config_fields": list(provider.Config._fields), "gemv_config_fields": list(gemv.GemvConfig._fields),
              "gemv_max_rows": provider.gemv_max_rows(), "wall_s": time.time() - t0, "results": results}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
