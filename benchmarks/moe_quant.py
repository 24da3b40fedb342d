"""What the quantized fused-MoE micro-benchmarks share (moe_fp8.py, moe_w4a16.py): one MoE forward as a call for
the timers, the bytes a call must move, and a row's numbers for the bf16 baseline and for each quantized layout,
timed the same way (benchmarks/moe.py's CUDA-graph and eager timers) on the same problem.

Bytes: the weights of the experts the problem hits (w13 and w2: 3·N·K values each, at `bytes_per_value`, scales
included by the caller's figure) plus the bf16 activations in and out. Not a benchmark itself."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from moe import TOP_K, E, K, N, format_config_file, time_eager, time_graph

from treadle_moe import ModularKernel

TIMING = "*_us: one CUDA graph of 20 calls replayed 3 times, per call; *_eager_us: median eager call"
BASELINE = "Triton fused MoE on the same bf16 weights (before quantization), same process, same inputs"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def moved_bytes(topk_ids: torch.Tensor, bytes_per_value: float) -> int:
    experts_hit = int(torch.unique(topk_ids).numel())
    return int(bytes_per_value * experts_hit * 3 * N * K) + 2 * 2 * topk_ids.shape[0] * K


def forward_call(
    kernel: ModularKernel, p: dict[str, torch.Tensor], w13: torch.Tensor, w2: torch.Tensor, **scales: Any
) -> Callable[[], torch.Tensor]:
    """The MoE forward of problem `p` on these weights (`scales`: fp8= or int4=), as a no-argument call."""
    return lambda: kernel(p["hidden"], w13, w2, p["topk_weights"], p["topk_ids"], **scales)


def bf16_row(
    m: int, run: Callable[[], torch.Tensor], topk_ids: torch.Tensor
) -> tuple[dict[str, object], float]:
    """The baseline's numbers for `m` tokens, and its graph-replayed microseconds."""
    us = 1000 * time_graph(run)
    row: dict[str, object] = {
        "tokens": m,
        "bf16_us": round(us, 2),
        "bf16_eager_us": round(1000 * time_eager(run), 2),
        "bf16_tflops": round(6 * m * TOP_K * K * N / us / 1e6, 2),
        "bf16_gbs": round(moved_bytes(topk_ids, 2) / us / 1e3, 1),
    }
    return row, us


def layout_row(name: str, m: int, run: Callable[[], torch.Tensor], moved: int, peak: tuple[str, float],
               peak_gbs: float, bf16_us: float) -> dict[str, object]:  # fmt: skip
    """A quantized layout's timings for `m` tokens: µs, TFLOP/s (and its share of the `peak` rate, named by its
    label), GB/s over `moved` bytes (and its share of `peak_gbs`), and the speed ratio to the row's bf16 time."""
    us = 1000 * time_graph(run)
    tflops = 6 * m * TOP_K * K * N / us / 1e6
    peak_label, peak_tflops = peak
    return {
        f"{name}_us": round(us, 2),
        f"{name}_eager_us": round(1000 * time_eager(run), 2),
        f"{name}_tflops": round(tflops, 2),
        f"{name}_pct_peak_{peak_label}_tflops": round(100 * tflops / peak_tflops, 1),
        f"{name}_gbs": round(moved / us / 1e3, 1),
        f"{name}_pct_peak_gbs": round(100 * moved / us / 1e3 / peak_gbs, 1),
        f"{name}_speed_ratio_vs_bf16": round(bf16_us / us, 3),
    }


def environment(benchmark: str, **shape: object) -> dict[str, object]:
    """The result file's header: device, versions, the Qwen3-30B-A3B shape (plus `shape`), baseline, timing."""
    return {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "shape": {"hidden": K, "moe_intermediate": N, "num_experts": E, "top_k": TOP_K, "activations": "bf16"}
        | shape,
        "baseline": BASELINE,
        "timing": TIMING,
    }


def main(
    doc: str,
    weights: str,
    tokens: list[int],
    benchmark: Callable[[list[int]], dict[str, object]],
    tune: Callable[[list[int]], dict[str, object]],
) -> None:
    """The command line of moe_fp8.py / moe_w4a16.py (`doc`, their docstring): OUT.json [--tokens] [--tune]; the
    benchmark's JSON, or with --tune the tuned table in the configs/ layout; `weights` names them in the help."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "output", type=Path, help="where to write the JSON results (or, with --tune, the config)"
    )
    parser.add_argument("--tokens", default=",".join(map(str, tokens)), help="comma-separated token counts")
    parser.add_argument(
        "--tune", action="store_true", help=f"sweep {weights} block configs and write a configs/ JSON file"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"the {weights} MoE benchmark needs a CUDA GPU")
    counts = [int(t) for t in args.tokens.split(",")]
    started = time.perf_counter()
    result = tune(counts) if args.tune else benchmark(counts)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(format_config_file(result) if args.tune else json.dumps(result, indent=2) + "\n")
