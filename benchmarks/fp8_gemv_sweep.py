"""Tile sweep of the fp8 small-batch linear kernel (treadle_kernels.ops.fp8_linear_kernels.fp8_small_m_linear_kernel)
on Llama-3.1-8B's projections, inside CUDA graphs, next to the bf16 production path at the same rows.

For each projection (qkv 6144 x 4096, o_proj 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336) and row count
(1: ROWS 1, multiply and row sum; 8: ROWS 16, tl.dot): the production tiles (`fp8_linear._kernel_config`) are timed,
then every tile of the grid below. Every config's output is checked against the op's native spec first
(||got - expected|| / ||expected|| <= 1e-2) and timed only if it passes. Timing: benchmarks/gemv_sweep.py's graph
timer, cycling over enough weight copies (>= 256 MB) that no call finds its weight in L2. GB/s = fp8 weight bytes
/ time. The bf16 row is `ops.linear` on the bf16 weight (what an unquantized engine runs unfused).
MMA: an experimental tensor-core variant (fp8_mma_linear_kernel below: fp8 operands straight into tl.dot, 1-16 rows
padded to 16), timed at every row count next to the production kernel and torch._scaled_mm.

Usage (GPU machine): python3 benchmarks/fp8_gemv_sweep.py --out OUT/fp8_gemv.json --commit SHA
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from gemv_sweep import _graph_us

from treadle_ir import ops
from treadle_ir.ops.fp8 import quantize_fp8_rows
from treadle_kernels.ops import fp8_linear, fp8_linear_kernels
from treadle_kernels.ops.fp8_linear_kernels import FP8_MAX, reciprocal, round_e4m3, scale_of

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (ROWS, BLOCK_N, BLOCK_K, num_warps, num_stages); each is one Triton compile (about a second)
ROWS1 = [(1, bn, bk, w, 3) for bn in (4, 8, 16) for bk in (1024, 2048, 4096) for w in (4, 8)]
ROWS16 = [(16, bn, bk, 4, 3) for bn in (32, 64) for bk in (128, 256)]
# fp8_mma_linear_kernel (tensor cores, fp8 operands; ROWS 16 for 1-16 rows):
# ("mma", BLOCK_N, BLOCK_K, num_warps, num_stages, MAX_IMPRECISE)
MMA = [
    ("mma", bn, bk, w, st, 0) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4,) for st in (3, 5)
] + [
    ("mma", 32, 256, 8, 4, 0),
    ("mma", 64, 256, 8, 4, 0),
    ("mma", 32, 256, 4, 4, 1 << 30),
]  # 1 << 30: not compiled (Triton 3.6)


# An experiment, not a treadle kernel: measured slower than fp8_small_m_linear_kernel at one row and no faster than
# torch._scaled_mm at 8 and 16 rows (H200, results/gpu-fp8-mma-h200-068b6bd.json), so it lives here only.
@triton.jit
def fp8_mma_linear_kernel(
    x_ptr,
    x_row_stride,
    weight_ptr,
    weight_scale_ptr,
    bias_ptr,
    input_scale_ptr,
    out_ptr,
    out_row_stride,
    num_rows,
    n,
    k,
    HAS_BIAS: tl.constexpr,
    STATIC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr = 0,
):
    """``fp8_small_m_linear_kernel``'s math on the tensor cores: the on-the-fly e4m3 activations and the fp8 weight
    tile go to ``tl.dot`` as they are (no conversion of the weight on the CUDA cores, which bound the one-row
    kernel's bandwidth), the up to ROWS (>= 16, the dot's smallest M) rows padded with zeros. MAX_IMPRECISE 0: the
    accumulation is promoted to full fp32 after every instruction (Hopper's fp8 MMA adds in reduced precision).
    UPCAST (the CPU interpreter): fp32 operands, as the interpreter has no fp8 dot."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    rows = tl.arange(0, ROWS)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
    w_rows = weight_ptr + offs_n.to(tl.int64)[:, None] * k
    tile = tl.arange(0, BLOCK_K)

    if STATIC:
        x_scale = tl.load(input_scale_ptr + tl.zeros([ROWS], dtype=tl.int32))
    else:
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tile
            a = tl.load(x_rows + cols[None, :], mask=row_mask[:, None] & (cols < k)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
        x_scale = scale_of(amax)
    inv_scale = reciprocal(x_scale)

    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tile
        k_mask = cols < k
        w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(x_rows + cols[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        y = tl.minimum(tl.maximum(a.to(tl.float32) * inv_scale[:, None], -FP8_MAX), FP8_MAX)
        if UPCAST:
            acc = tl.dot(round_e4m3(y), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            q = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
            acc = tl.dot(q, tl.trans(w), acc, max_num_imprecise_acc=MAX_IMPRECISE)

    w_scale = tl.load(weight_scale_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _launch(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, out: torch.Tensor, cfg: tuple) -> None:
    if cfg[0] == "mma":
        _, block_n, block_k, warps, stages, imprecise = cfg
        n, k = w.shape
        fp8_mma_linear_kernel[(-(-n // block_n),)](
            x, x.stride(0), w, s, s, s, out, out.stride(0), x.shape[0], n, k, HAS_BIAS=False, STATIC=False,
            ROWS=16, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=False, MAX_IMPRECISE=imprecise, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
        return
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
    for cfg in [production, *(ROWS1 if rows == 1 else ROWS16), *MMA]:
        try:
            _launch(x, fp8[0][0], fp8[0][1], out, cfg)
            torch.cuda.synchronize()
            err = ((out.float() - expected).norm() / expected.norm()).item()
            worst = ((out.float() - expected).abs().max() / expected.abs().max()).item()
            if err > 1e-2:
                timed.append({"config": cfg, "error": f"rel err {err:.3g}"})
                continue
            us = _graph_us(lambda i, c=cfg: _launch(x, fp8[i][0], fp8[i][1], out, c), copies)
            timed.append({"config": cfg, "us": us, "gbps": n * k / (us * 1e-6) / 1e9, "rel_err": err,
                          "max_err_over_max": worst})  # fmt: skip
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
