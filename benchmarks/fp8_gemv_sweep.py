"""Tile sweep of the fp8 small-batch linear kernel (treadle_kernels.ops.fp8_linear_kernels.fp8_small_m_linear_kernel)
on Llama-3.1-8B's projections, inside CUDA graphs, next to the bf16 production path at the same rows.

For each projection (qkv 6144 x 4096, o_proj 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336) and row count
(1: ROWS 1, multiply and row sum; 8: ROWS 16, tl.dot): the production tiles (`fp8_linear._kernel_config`) are timed,
then every tile of the grid below. Every config's output is checked against the op's native spec first
(||got - expected|| / ||expected|| <= 1e-2) and timed only if it passes. Timing: benchmarks/gemv_sweep.py's graph
timer, cycling over enough weight copies (>= 256 MB) that no call finds its weight in L2. GB/s = fp8 weight bytes
/ time. The bf16 row is `ops.linear` on the bf16 weight (what an unquantized engine runs unfused).

Usage (GPU machine): python3 benchmarks/fp8_gemv_sweep.py --out OUT/fp8_gemv.json --commit SHA
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from gemv_sweep import _graph_us

from treadle_ir import ops
from treadle_ir.ops.fp8 import quantize_fp8_rows
from treadle_kernels.ops import fp8_linear, fp8_linear_kernels

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (ROWS, BLOCK_N, BLOCK_K, num_warps, num_stages); each is one Triton compile (about a second)
ROWS1 = [(1, bn, bk, w, 3) for bn in (4, 8, 16) for bk in (1024, 2048, 4096) for w in (4, 8)]
ROWS16 = [(16, bn, bk, 4, 3) for bn in (32, 64) for bk in (128, 256)]


def _launch(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, out: torch.Tensor, cfg: tuple) -> None:
    rows, block_n, block_k, warps, stages = cfg
    n, k = w.shape
    fp8_linear_kernels.fp8_small_m_linear_kernel[(-(-n // block_n),)](
        x, x.stride(0), w, s, s, s, out, out.stride(0), x.shape[0], n, k, HAS_BIAS=False, STATIC=False, ROWS=rows,
        BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=False, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _measure(n: int, k: int, rows: int) -> dict:
    copies = max(2, -(-(256 << 20) // (n * k)))
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
    quant = [quantize_fp8_rows.native(wb) for wb in bf16]
    fp8 = [(q, sc.view(-1).contiguous()) for q, sc in quant]
    out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    expected = ops.fp8_linear.native(x, fp8[0][0], fp8[0][1], None).float()
    result = {"n": n, "k": k, "rows": rows, "weight_copies": copies}
    result["bf16_us"] = _graph_us(lambda i: ops.linear(x, bf16[i], None), copies)
    if rows > 1:  # the default path beyond one row: the quantization kernel, then torch._scaled_mm

        def scaled(i: int) -> torch.Tensor:
            return fp8_linear.scaled_mm_linear(*fp8_linear.quantize_fp8_rows(x), fp8[i][0], fp8[i][1], None)

        err = ((scaled(0).float() - expected).norm() / expected.norm()).item()
        result["scaled_mm_us"] = _graph_us(scaled, copies) if err <= 1e-2 else f"rel err {err:.3g}"
    production = (*fp8_linear._kernel_config(rows, n), 3)
    timed = []
    for cfg in [production, *(ROWS1 if rows == 1 else ROWS16)]:
        try:
            _launch(x, fp8[0][0], fp8[0][1], out, cfg)
            torch.cuda.synchronize()
            err = ((out.float() - expected).norm() / expected.norm()).item()
            if err > 1e-2:
                timed.append({"config": cfg, "error": f"rel err {err:.3g}"})
                continue
            us = _graph_us(lambda i, c=cfg: _launch(x, fp8[i][0], fp8[i][1], out, c), copies)
            timed.append({"config": cfg, "us": us, "gbps": n * k / (us * 1e-6) / 1e9})
        except Exception as e:  # a tile the compiler refuses (shared memory, registers)
            timed.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
    ok = [t for t in timed if "us" in t]
    result["production"] = timed[0]
    result["best"] = min(ok, key=lambda t: t["us"]) if ok else None
    result["all"] = timed
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    ap.add_argument("--rows", default="1,8")
    args = ap.parse_args()
    t0 = time.time()
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for name, (n, k) in SHAPES.items():
            r = _measure(n, k, rows) | {"name": name}
            results.append(r)
            prod, best = r["production"], r["best"]
            print(f"{name} rows {rows}: bf16 {r['bf16_us']:.1f} us; _scaled_mm {r.get('scaled_mm_us')}; "
                  f"fp8 production {prod.get('us', prod)} "
                  f"best {best and (best['config'], round(best['us'], 2), round(best['gbps']))}", flush=True)  # fmt: skip
    record = {"device": torch.cuda.get_device_name(), "commit": args.commit, "command": " ".join(sys.argv),
              "wall_s": time.time() - t0, "results": results}  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
