"""The block-scaled fp8 GEMM (``ops.fp8_block_linear``'s Triton provider, 128 x 128 weight blocks, activations
quantized per token group of 128) against the bf16 linear (``ops.linear``, the production op: the one-row Triton
kernel or cuBLAS) and the per-channel fp8 linear (``ops.fp8_linear``: its one-row kernel, else the row
quantization kernel + ``torch._scaled_mm``), on Llama-3.1-8B's projections at 1 to 4096 rows.

Each path's output is checked against the ``fp8_block_linear`` / ``fp8_linear`` spec first (||got - expected|| /
||expected|| <= 1e-2) and timed only if it passes. Timing: benchmarks/gemv_sweep.py's CUDA-graph timer, cycling
over enough weight copies (>= 256 MB of fp8) that no call finds its weight in L2, as a decode or prefill step
meets it. Reported per (projection, rows): µs of each path, block fp8 / bf16 and block / per-channel ratios (< 1:
block is faster), the block path's TFLOP/s and weight GB/s (fp8 bytes + scales). ``--sweep`` also times a grid of
alternative tiles for the block path (the one-row kernel's BLOCK_N / GROUPS / warps; the GEMM's BLOCK_M / BLOCK_N /
warps / stages, with and without its own activation quantization) and reports the best next to the production
choice (``fp8_block_linear.kernel_config``).

Usage (GPU machine): python benchmarks/fp8_block_gemm.py --out OUT/fp8_block_gemm.json [--sweep] [--rows 1,16]
``--smoke``: the plumbing on CPU (Triton's interpreter, one tiny shape, wall-clock timing; numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from gemv_sweep import _graph_us  # noqa: E402

import treadle_kernels  # noqa: E402, F401  (registers the triton providers)
from treadle_ir import ops  # noqa: E402
from treadle_ir.ops.fp8 import quantize_fp8_rows  # noqa: E402
from treadle_ir.ops.fp8_block import quantize_fp8_blocks  # noqa: E402
from treadle_kernels.ops.fp8_block_linear import GemmConfig, GemvConfig, kernel_config, run_block_linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 16, 64, 256, 1024, 4096)
BLOCK = 128
DEVICE = "cpu" if SMOKE else "cuda"
if SMOKE:
    SHAPES, ROWS, BLOCK = {"tiny": (48, 256)}, (1, 3, 70), 16
GEMV_SWEEP = [
    GemvConfig(bn, g, w) for bn in (4, 8, 16) for g in (4, 8, 16, 32) for w in (4, 8) if bn * g <= 256
]


def _gemm_sweep(rows: int) -> list[GemmConfig]:
    block_ms = [b for b in (16, 32, 64, 128) if b <= max(16, 2 * rows)][-2:]
    fused = (True, False) if rows <= 256 else (False,)
    return [GemmConfig(bm, bn, w, st, 8, q) for bm in block_ms for bn in (32, 64, 128, 256) for w in (4, 8)
            for st in (3, 4) for q in fused if bm * bn <= 128 * 256]  # fmt: skip


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))


def _wall_us(fn: Callable[[int], torch.Tensor], copies: int) -> float:
    start = time.perf_counter()
    for i in range(copies):
        fn(i)
    return (time.perf_counter() - start) * 1e6 / copies


def _timed(fn: Callable[[int], torch.Tensor], expected: torch.Tensor, copies: int) -> dict[str, Any]:
    try:
        err = _rel_err(fn(0), expected)
        if err > 1e-2:
            return {"error": f"rel err {err:.3g}"}
        return {"us": (_wall_us if SMOKE else _graph_us)(fn, copies), "rel_err": err}
    except Exception as e:  # a tile the compiler refuses (shared memory, registers)
        return {"error": f"{type(e).__name__}: {str(e)[:160]}"}


def _measure(name: str, n: int, k: int, rows: int, sweep: bool) -> dict[str, Any]:
    copies = 2 if SMOKE else max(2, -(-(256 << 20) // (n * k)))
    gen = torch.Generator(device=DEVICE).manual_seed(n + k + rows)
    x = torch.randn(rows, k, device=DEVICE, generator=gen).to(torch.bfloat16)
    bf16 = [
        (torch.randn(n, k, device=DEVICE, generator=gen) * k**-0.5).to(torch.bfloat16) for _ in range(copies)
    ]
    block = [quantize_fp8_blocks(w, BLOCK, BLOCK) for w in bf16]
    channel = [(q, s.view(-1).contiguous()) for q, s in (quantize_fp8_rows.native(w) for w in bf16)]
    expected_block = ops.fp8_block_linear.native(x, block[0][0], block[0][1], None, BLOCK, BLOCK)
    expected_channel = ops.fp8_linear.native(x, channel[0][0], channel[0][1], None)
    result: dict[str, Any] = {"name": name, "n": n, "k": k, "rows": rows, "weight_copies": copies}
    result["bf16"] = _timed(lambda i: ops.linear(x, bf16[i], None), x @ bf16[0].t(), copies)
    result["fp8_channel"] = _timed(lambda i: ops.fp8_linear(x, *channel[i], None), expected_channel, copies)
    with ops.fp8_block_linear.priority(["triton"]):
        chosen, skipped = ops.fp8_block_linear.explain(x, *block[0], None, BLOCK, BLOCK)
        assert chosen.name == "triton", skipped
        result["fp8_block"] = _timed(lambda i: ops.fp8_block_linear(x, *block[i], None, BLOCK, BLOCK),
                                     expected_block, copies)  # fmt: skip
    production = kernel_config(rows, n, x.device)
    result["fp8_block"]["config"] = list(production)
    us = result["fp8_block"].get("us")
    if us:
        result["fp8_block"]["tflops"] = 2 * rows * n * k / (us * 1e-6) / 1e12
        scales = 4 * -(-n // BLOCK) * -(-k // BLOCK)
        result["fp8_block"]["weight_gbps"] = (n * k + scales) / (us * 1e-3) / 1e6
    if sweep:
        configs: list[GemvConfig | GemmConfig] = [*GEMV_SWEEP] if rows == 1 else []
        configs += _gemm_sweep(rows)
        timed = []
        for cfg in configs:

            def run(i: int, c: GemvConfig | GemmConfig = cfg) -> torch.Tensor:
                return run_block_linear(x, block[i][0], block[i][1], None, BLOCK, BLOCK, c)

            timed.append({"config": [type(cfg).__name__, *cfg], **_timed(run, expected_block, copies)})
        ok = [t for t in timed if "us" in t]
        result["sweep_best"] = min(ok, key=lambda t: t["us"]) if ok else None
        result["sweep"] = timed
    return result


def _us(entry: dict[str, Any]) -> str:
    return f"{entry['us']:9.1f}" if "us" in entry else f"{'failed':>9}"


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
    return f"{a['us'] / b['us']:6.2f}" if "us" in a and "us" in b else f"{'-':>6}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also time a grid of alternative tiles")
    ap.add_argument("--smoke", action="store_true", help="the plumbing on CPU under the Triton interpreter")
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    device = "CPU (smoke)" if SMOKE else torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, commit {commit}")
    print(f"{'proj':8} {'rows':>5} {'bf16 us':>9} {'fp8ch us':>9} {'block us':>9} {'blk/bf16':>8} {'blk/ch':>6} "
          f"{'TFLOP/s':>8} {'GB/s':>7}  block config{'  | sweep best' if args.sweep else ''}")  # fmt: skip
    t0 = time.time()
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for name in args.shapes.split(","):
            r = _measure(name, *SHAPES[name], rows, args.sweep)
            results.append(r)
            blk = r["fp8_block"]
            best = r.get("sweep_best")
            extra = f"  | {best['config']} {best['us']:.1f} us" if best else ""
            print(f"{name:8} {rows:5d} {_us(r['bf16'])} {_us(r['fp8_channel'])} {_us(blk)} "
                  f"{_ratio(blk, r['bf16']):>8} {_ratio(blk, r['fp8_channel'])} {blk.get('tflops', 0):8.1f} "
                  f"{blk.get('weight_gbps', 0):7.0f}  {blk['config']}{extra}", flush=True)  # fmt: skip
            for path in ("bf16", "fp8_channel", "fp8_block"):
                if "error" in r[path]:
                    print(f"    {path}: {r[path]['error']}", flush=True)
    record = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "commit": commit, "command": " ".join(sys.argv), "block": [BLOCK, BLOCK], "wall_s": time.time() - t0,
              "results": results}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
