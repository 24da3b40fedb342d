"""MXFP4 fused-MoE micro-benchmark at gpt-oss-20b shapes: Triton fused MoE with bf16 experts against the same experts
in MXFP4 (treadle_moe.experts.mxfp4: e2m1 values, an e8m0 scale per 32 inputs), in the same process on the same inputs.

Shapes: hidden K=2880, intermediate N=2880, E=32 experts, top-4, bf16 activations, gpt-oss's biases and swigluoai,
softmax over the top-4 of random logits; tokens 1, 4, 16, 64, 256, 1024, 4096 (`--tokens`). Both run the same modular
kernel (no-EP standard prepare/finalize, `TritonExperts`) and differ only in the weights: bf16 (the baseline, the
dequantized path) and MXFP4 round-to-nearest from them (`quantize_experts_mxfp4`); the bf16 baseline runs on the
dequantized MXFP4 weights, so both compute the same products. Each is timed replayed from a CUDA graph (as decode
steps run); reported per token count: microseconds, GB/s over the minimum bytes (the weights of the experts hit: 2
bytes a value in bf16, 17/32 of a byte in MXFP4, plus activations), the speed ratio (bf16 time / MXFP4 time, > 1 is
faster), and the MXFP4 output's relative error against the bf16 output (summation order only: the same weights).
MXFP4 runs twice: with the default block config (`mxfp4_*`, `speedup`; experts/triton_mxfp4.py's measured tiles)
and with the tables' config as the default was before them (`table_*`, `table_speedup`: weight-only 4-bit tables or
the fallback, BLOCK_K >= 32, never swapped). `--sweep`: GEMM tiles at each token count instead (BLOCK_N, BLOCK_K,
plain and computing C^T = W A^T), every one timed, the best first.

    PYTHONPATH=packages/moe/src:packages/ir/src:packages/kernels/src python benchmarks/moe_mxfp4.py out.json
    ... benchmarks/moe_mxfp4.py out.json --tokens 1,64
    ... benchmarks/moe_mxfp4.py sweep.json --tokens 1,16,64 --sweep
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
from collections.abc import Iterator

import torch

from treadle_moe import ModularKernel, NoEPStandardPrepareFinalize, TritonExperts
from treadle_moe.configs import BlockConfig, get_block_config
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.mxfp4 import Mxfp4ExpertScales, dequantize_mxfp4, quantize_experts_mxfp4

K, N, E, TOP_K = 2880, 2880, 32, 4
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]


def _time_graph(call: object, iters: int = 50) -> float:
    """Microseconds per replay of `call()` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()  # type: ignore[operator]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()  # type: ignore[operator]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def _tiles(tokens: int, wide: bool = False) -> Iterator[BlockConfig]:
    """The GEMM tiles a sweep times: BLOCK_M 16 (32 and 64 from 256 tokens), each plain and swapped; `wide`: BLOCK_N
    16-64, BLOCK_K 128-512, 2-8 warps and 1-4 stages, plain (the decode sizes' question: latency or bandwidth); from
    256 tokens BLOCK_M 32-128, BLOCK_N 64-128, BLOCK_K 64-128, 4 or 8 warps, plain and swapped."""
    if wide and tokens >= 256:
        for bm, bn, bk, warps, swap in itertools.product(
            (32, 64) if tokens < 1024 else (64, 128), (64, 128), (64, 128), (4, 8), (False, True)
        ):
            yield BlockConfig(bm, bn, bk, group_m=8, num_warps=warps, num_stages=3, swap_ab=swap)
        return
    if wide:
        for bn, bk, warps, stages in itertools.product(
            (16, 32, 64), (128, 256, 512), (2, 4, 8), (1, 2, 3, 4)
        ):
            yield BlockConfig(16, bn, bk, group_m=1, num_warps=warps, num_stages=stages)
        return
    for bm in (16,) if tokens < 256 else (32, 64):
        for bn, bk, swap in itertools.product((32, 64, 128), (128, 256), (False, True)):
            yield BlockConfig(bm, bn, bk, group_m=1, num_warps=4, num_stages=3, swap_ab=swap)


def _table_config(tokens: int) -> BlockConfig:
    """The tables' config for this batch as MXFP4 took it before the measured tiles (BLOCK_K >= 32, not swapped)."""
    config, _ = get_block_config(
        tokens, E, N, K, TOP_K, torch.bfloat16, torch.cuda.get_device_name(), int4=True
    )
    return dataclasses.replace(config, block_k=max(32, config.block_k))


def _with_env(variant: str, call: object) -> object:
    """`call()` with the environment variable `variant` ("NAME=VALUE") set."""
    name, value = variant.split("=", 1)
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        return call()  # type: ignore[operator]
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def make_experts() -> tuple[torch.Generator, torch.Tensor, torch.Tensor, Mxfp4ExpertScales, ExpertEpilogue]:
    """gpt-oss-20b-shaped experts quantized to MXFP4 on the GPU (blocks w13, w2 and their scales) with bf16 biases,
    and the generator that made them (seed 0), for the inputs that follow."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * N, K, device="cuda", generator=gen) * K**-0.5
    w2 = torch.randn(E, K, N, device="cuda", generator=gen) * N**-0.5
    b13, b2, scales = quantize_experts_mxfp4(w13, w2)
    del w13, w2
    biases = torch.randn(E, 2 * N, device="cuda").bfloat16(), torch.randn(E, K, device="cuda").bfloat16()
    return gen, b13, b2, scales, ExpertEpilogue(*biases)


def benchmark(
    tokens: list[int], sweep: bool = False, wide: bool = False, variants: tuple[str, ...] = ()
) -> list[dict[str, object]]:
    gen, b13, b2, scales, epilogue = make_experts()
    dq13 = dequantize_mxfp4(b13, scales.w13_scale, torch.bfloat16)
    dq2 = dequantize_mxfp4(b2, scales.w2_scale, torch.bfloat16)
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts())
    rows = []
    for m in tokens:
        x = torch.randn(m, K, device="cuda", generator=gen).bfloat16()
        top, ids = torch.randn(m, E, device="cuda", generator=gen).topk(TOP_K, dim=-1)
        weights, ids = top.softmax(-1), ids.to(torch.int32)
        experts_hit = int(ids.unique().numel())

        bf16 = functools.partial(kernel, x, dq13, dq2, weights, ids, "swigluoai", epilogue=epilogue)
        mxfp4 = functools.partial(
            kernel, x, b13, b2, weights, ids, "swigluoai", epilogue=epilogue, mxfp4=scales
        )

        ref, out = bf16().float(), mxfp4().float()
        error = float((out - ref).norm() / ref.norm())
        activations = 2 * m * K * 2
        row: dict[str, object] = {"tokens": m, "experts_hit": experts_hit, "relative_error": error}
        kernel_args = (x, b13, b2, weights, ids, "swigluoai")

        def run(config: BlockConfig, args: tuple[object, ...] = kernel_args) -> object:
            kernel = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts(config))
            return kernel(*args, epilogue=epilogue, mxfp4=scales)

        if sweep:
            timed = []
            for c in _tiles(m, wide):
                timed.append({**c.to_json(), "us": round(_time_graph(functools.partial(run, c)), 2)})
                print(m, timed[-1], flush=True)
            row["tiles"] = sorted(timed, key=lambda t: float(t["us"]))
            print(m, row["tiles"][:5], flush=True)
            rows.append(row)
            continue
        table = functools.partial(run, _table_config(m))
        row["table_relative_error"] = float((table().float() - ref).norm() / ref.norm())  # type: ignore[attr-defined]
        timed = [("bf16", bf16, 2.0), ("mxfp4", mxfp4, 17 / 32), ("table", table, 17 / 32)]
        for variant in variants:
            # the GEMM reads its knobs at each launch, so each variant is its own kernel (and its own graph)
            timed.append((variant, functools.partial(_with_env, variant, mxfp4), 17 / 32))
            out = _with_env(variant, mxfp4).float()  # type: ignore[attr-defined]
            row[f"{variant}_relative_error"] = float((out - ref).norm() / ref.norm())
        for name, call, per_value in timed:
            us = _time_graph(call)
            moved = experts_hit * 3 * N * K * per_value + activations
            row[f"{name}_us"], row[f"{name}_gbs"] = round(us, 2), round(moved / us / 1e3, 1)
        for name, key in (("mxfp4", "speedup"), ("table", "table_speedup")):
            row[key] = round(float(row["bf16_us"]) / float(row[f"{name}_us"]), 3)  # type: ignore[arg-type]
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file for the results")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--sweep", action="store_true", help="time GEMM tiles instead")
    parser.add_argument("--wide", action="store_true", help="with --sweep: warps, stages and wider tiles")
    parser.add_argument("--variant", action="append", default=[], help="also time MXFP4 under NAME=VALUE")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    result = {"device": torch.cuda.get_device_name(), "shape": {"K": K, "N": N, "E": E, "top_k": TOP_K},
              "rows": benchmark(tokens, args.sweep, args.wide, tuple(args.variant))}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
