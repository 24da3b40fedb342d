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
MXFP4 runs three times: the default (`mxfp4_*`, `speedup`), the grouped GEMM alone (`gemm_*`) and the grouped GEMM
computing C^T = W A^T (`swap_ab_*`; experts/triton_mxfp4.py). `--sweep gemv|gemm`: that kernel's tiles at each token
count instead (GEMV: BLOCK_N, BLOCK_K, warps, stages; GEMM: BLOCK_N, BLOCK_K, stages, plain and SWAP_AB), every one
timed, the best first.

    PYTHONPATH=packages/moe/src:packages/ir/src:packages/kernels/src python benchmarks/moe_mxfp4.py out.json
    ... benchmarks/moe_mxfp4.py out.json --tokens 1,64
    ... benchmarks/moe_mxfp4.py sweep.json --tokens 1,16,64 --sweep gemm
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator

import torch

from treadle_moe import ModularKernel, NoEPStandardPrepareFinalize, TritonExperts
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.mxfp4 import dequantize_mxfp4, quantize_experts_mxfp4

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


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """The TREADLE_MOE_MXFP4_* variables `values` name (gemv_max_rows="0": TREADLE_MOE_MXFP4_GEMV_MAX_ROWS=0) set
    inside the block, as they were after it."""
    names = {f"TREADLE_MOE_MXFP4_{key.upper()}": value for key, value in values.items()}
    old = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in old.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


GEMM_ONLY = {"gemv_max_rows": "0", "swap_ab_max_m": "0"}
GEMM_SWAP_AB = {"gemv_max_rows": "0", "swap_ab_max_m": "1024"}


def _tiles(mode: str, tokens: int) -> Iterator[tuple[BlockConfig, dict[str, str]]]:
    """The tiles a sweep times: the GEMV's at this batch's BLOCK_M, or the GEMM's at BLOCK_M 16 (32 and 64 from
    256 tokens), each plain and with SWAP_AB."""
    if mode == "gemv":
        block_m = min(8, 1 << max(-(-tokens * TOP_K // E) - 1, 0).bit_length())
        for bn, bk, warps, stages in itertools.product((16, 32), (256, 512), (2, 4), (1, 3)):
            yield BlockConfig(block_m, bn, bk, group_m=1, num_warps=warps, num_stages=stages), {}
        return
    for bm in (16,) if tokens < 256 else (32, 64):
        for bn, bk, stages, env in itertools.product(
            (32, 64, 128), (128, 256), (3,), (GEMM_ONLY, GEMM_SWAP_AB)
        ):
            yield BlockConfig(bm, bn, bk, group_m=1, num_warps=4, num_stages=stages), env


def _sweep(mode: str, tokens: int, call: Callable[[TritonExperts], object]) -> list[dict[str, object]]:
    """Every tile of `_tiles` timed on `call(experts)`, fastest first."""
    timed = []
    for config, env in _tiles(mode, tokens):
        with _env(**env):
            us = _time_graph(functools.partial(call, TritonExperts(config)))
        swap = env.get("swap_ab_max_m", "0") != "0"
        timed.append({**config.to_json(), "swap_ab": swap, "us": round(us, 2)})
    return sorted(timed, key=lambda t: float(t["us"]))  # type: ignore[arg-type]


def benchmark(tokens: list[int], sweep: str | None = None) -> list[dict[str, object]]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * N, K, device="cuda", generator=gen) * K**-0.5
    w2 = torch.randn(E, K, N, device="cuda", generator=gen) * N**-0.5
    b13, b2, scales = quantize_experts_mxfp4(w13, w2)
    dq13 = dequantize_mxfp4(b13, scales.w13_scale, torch.bfloat16)
    dq2 = dequantize_mxfp4(b2, scales.w2_scale, torch.bfloat16)
    del w13, w2
    biases = torch.randn(E, 2 * N, device="cuda").bfloat16(), torch.randn(E, K, device="cuda").bfloat16()
    epilogue = ExpertEpilogue(*biases)
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
        if sweep:
            args = (x, b13, b2, weights, ids, "swigluoai")

            def run(experts: TritonExperts, args: tuple[object, ...] = args) -> object:
                kernel = ModularKernel(NoEPStandardPrepareFinalize(), experts)
                return kernel(*args, epilogue=epilogue, mxfp4=scales)

            row["tiles"] = _sweep(sweep, m, run)
            print(row["tokens"], row["tiles"][:3], flush=True)  # type: ignore[index]
            rows.append(row)
            continue
        for name, env in (("gemm", GEMM_ONLY), ("swap_ab", GEMM_SWAP_AB)):
            with _env(**env):
                row[f"{name}_relative_error"] = float((mxfp4().float() - ref).norm() / ref.norm())
        for name, call, per_value, env in (
            ("bf16", bf16, 2.0, {}), ("mxfp4", mxfp4, 17 / 32, {}), ("gemm", mxfp4, 17 / 32, GEMM_ONLY),
            ("swap_ab", mxfp4, 17 / 32, GEMM_SWAP_AB),
        ):  # fmt: skip
            with _env(**env):
                us = _time_graph(call)
            moved = experts_hit * 3 * N * K * per_value + activations
            row[f"{name}_us"], row[f"{name}_gbs"] = round(us, 2), round(moved / us / 1e3, 1)
        for name, key in (("mxfp4", "speedup"), ("gemm", "gemm_speedup"), ("swap_ab", "swap_ab_speedup")):
            row[key] = round(float(row["bf16_us"]) / float(row[f"{name}_us"]), 3)  # type: ignore[arg-type]
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file for the results")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--sweep", choices=("gemv", "gemm"), help="time this kernel's tiles instead")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    result = {"device": torch.cuda.get_device_name(), "shape": {"K": K, "N": N, "E": E, "top_k": TOP_K},
              "rows": benchmark(tokens, args.sweep)}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
