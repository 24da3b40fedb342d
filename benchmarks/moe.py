"""Fused-MoE micro-benchmark at Qwen3-30B-A3B shapes: Triton fused MoE against the torch reference.

Shapes: hidden K=2048, moe_intermediate N=768, E=128 experts, top-8, bf16, tokens 1…8192, softmax routing with
renormalization on random logits. Both sides run the same modular kernel (no-EP standard prepare/finalize) and
differ only in the experts: `triton_fused` vs `torch_reference` (a per-expert loop, like HF transformers).
Reported per token count: median time of each (Triton both eager and replayed from a CUDA graph, which hides
launch overhead the way the model runner does), speedup, TFLOP/s (6·M·top_k·K·N flops) and GB/s over the
minimum bytes (weights of the experts hit + activations in and out), with percentages of the device ceiling,
and the max-abs error of Triton against the reference.

    python benchmarks/moe.py results.json                       # benchmark (< 3 min on one H100)
    python benchmarks/moe.py tuned.json --tune                  # sweep block configs, write a configs/ file
    python benchmarks/moe.py t.json --tune --shape 64,1408,2048,6 --merge-into CONFIGS_FILE
                                # another shape (E,N,K,top_k: DeepSeek-V2-Lite / Moonlight), added to a configs/ file
Needs a CUDA GPU and PYTHONPATH holding packages/moe/src (and packages/ir/src, packages/kernels/src).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from treadle_moe import (
    ModularKernel,
    NoEPStandardPrepareFinalize,
    TorchExperts,
    TritonExperts,
    select_experts,
)
from treadle_moe.configs import BlockConfig, get_block_config, shape_key

E, TOP_K, K, N = 128, 8, 2048, 768  # --shape replaces them


def set_shape(text: str) -> None:
    """--shape E,N,K,TOP_K: the experts' shape every function here reads."""
    global E, N, K, TOP_K
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 4 or min(parts) < 1 or parts[3] > parts[0]:
        raise SystemExit(f"--shape wants E,N,K,TOP_K with 1 <= TOP_K <= E, got {text!r}")
    E, N, K, TOP_K = parts


TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
CEILINGS = {  # device name fragment -> (dense bf16 TFLOP/s, HBM GB/s), datasheet numbers
    "H100 80GB HBM3": (989.0, 3350.0),
    "H100 PCIe": (756.0, 2000.0),
    "H200": (989.0, 4800.0),
}


def make_problem(num_tokens: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(num_tokens, K, device="cuda", dtype=dtype, generator=gen)
    logits = torch.randn(num_tokens, E, device="cuda", generator=gen)
    topk_weights, topk_ids = select_experts(logits, TOP_K, renormalize=True)
    return {"hidden": hidden, "topk_weights": topk_weights, "topk_ids": topk_ids}


def make_weights(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    w13 = torch.randn(E, 2 * N, K, device="cuda", dtype=dtype, generator=gen) / K**0.5  # [E, 2N, K]
    w2 = torch.randn(E, K, N, device="cuda", dtype=dtype, generator=gen) / N**0.5  # [E, K, N]
    return w13, w2


def time_eager(fn: Callable[[], object], min_runs: int = 5, budget_s: float = 0.4) -> float:
    """Median milliseconds of `fn` (CUDA events), running at most ~budget_s."""
    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start_wall = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start_wall < budget_s and len(times) < 50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph(fn: Callable[[], object], replays: int = 20) -> float:
    """Milliseconds per call of `fn` captured `replays` times in one CUDA graph."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (3 * replays)


def min_bytes(topk_ids: torch.Tensor, dtype: torch.dtype) -> int:
    experts_hit = int(torch.unique(topk_ids).numel())
    size = torch.empty((), dtype=dtype).element_size()
    return size * (experts_hit * 3 * N * K + 2 * topk_ids.shape[0] * K)


def benchmark(dtype: torch.dtype, tokens: list[int]) -> list[dict[str, object]]:
    w13, w2 = make_weights(dtype)
    fused = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts())
    reference = ModularKernel(NoEPStandardPrepareFinalize(), TorchExperts())
    device_name = torch.cuda.get_device_name()
    peak_tflops, peak_gbs = next(
        (v for key, v in CEILINGS.items() if key in device_name), (float("nan"),) * 2
    )
    rows: list[dict[str, object]] = []
    for m in tokens:
        p = make_problem(m, dtype)

        def run_fused(p: dict[str, torch.Tensor] = p) -> torch.Tensor:
            return fused(p["hidden"], w13, w2, p["topk_weights"], p["topk_ids"])

        def run_reference(p: dict[str, torch.Tensor] = p) -> torch.Tensor:
            return reference(p["hidden"], w13, w2, p["topk_weights"], p["topk_ids"])

        error = (run_fused().float() - run_reference().float()).abs().max().item()
        fused_ms, ref_ms = time_eager(run_fused), time_eager(run_reference)
        graph_ms = time_graph(run_fused)
        flops, nbytes = 6 * m * TOP_K * K * N, min_bytes(p["topk_ids"], dtype)
        config, source = get_block_config(m, E, N, K, TOP_K, dtype, device_name)
        best = min(fused_ms, graph_ms)
        row: dict[str, object] = {
            "tokens": m,
            "torch_reference_ms": round(ref_ms, 4),
            "triton_eager_ms": round(fused_ms, 4),
            "triton_graph_ms": round(graph_ms, 4),
            "speedup_eager": round(ref_ms / fused_ms, 2),
            "triton_tflops": round(flops / best / 1e9, 2),
            "triton_gbs": round(nbytes / best / 1e6, 1),
            "reference_tflops": round(flops / ref_ms / 1e9, 2),
            "pct_peak_tflops": round(100 * flops / best / 1e9 / peak_tflops, 1),
            "pct_peak_gbs": round(100 * nbytes / best / 1e6 / peak_gbs, 1),
            "max_abs_err_vs_reference": error,
            "block_config": config.to_json(),
            "config_source": source,
        }
        print(json.dumps({k: v for k, v in row.items() if k != "block_config"}), flush=True)
        rows.append(row)
    return rows


def candidate_configs(num_tokens: int) -> list[BlockConfig]:
    per_expert = num_tokens * TOP_K / E
    block_ms = [16, 32, 64] if per_expert < 64 else [32, 64, 128]
    out = []
    for bm, bn, bk, warps, stages in itertools.product(block_ms, [64, 128], [64, 128], [4, 8], [3, 4]):
        if bm == 128 and bn == 128 and bk == 128:
            continue  # does not fit shared memory with 4 stages
        out.append(
            BlockConfig(bm, bn, bk, group_m=1 if per_expert < 64 else 8, num_warps=warps, num_stages=stages)
        )
    return out


def sweep(
    tokens: list[int],
    call: Callable[[ModularKernel, dict[str, torch.Tensor]], Callable[[], object]],
    extra: tuple[BlockConfig, ...] = (),
) -> dict[str, dict[str, int]]:
    """{M: the fastest config} over candidate_configs(M) (+ `extra`), each timed replayed from a CUDA graph;
    `call(kernel, problem)` is the MoE forward to time (bf16 activations: make_problem's)."""
    table: dict[str, dict[str, int]] = {}
    for m in tokens:
        p = make_problem(m, torch.bfloat16)
        results = []
        for config in [*candidate_configs(m), *extra]:
            kernel = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts(block_config=config))
            try:
                ms = time_graph(call(kernel, p), 5)
            except Exception as exc:  # out of shared memory and the like: skip the config
                print(f"skip {config}: {type(exc).__name__}", flush=True)
                continue
            results.append((ms, config))
        ms, best = min(results, key=lambda r: r[0])
        print(f"M={m}: {ms * 1000:.1f} us with {best}", flush=True)
        table[str(m)] = best.to_json()
    return table


def tune(dtype: torch.dtype, tokens: list[int]) -> dict[str, object]:
    w13, w2 = make_weights(dtype)

    def call(k: ModularKernel, p: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        hidden = p["hidden"].to(dtype)
        return lambda: k(hidden, w13, w2, p["topk_weights"], p["topk_ids"])

    table = sweep(tokens, call)
    return {"device_name": torch.cuda.get_device_name(), "shapes": {shape_key(E, N, K, dtype): table}}


def format_config_file(data: dict[str, object]) -> str:
    """The configs/ layout: one line per token count, so diffs of a retune stay readable."""
    shapes = data["shapes"]
    assert isinstance(shapes, dict)
    lines = ["{", f'  "device_name": {json.dumps(data["device_name"])},']
    tool = data.get("tuned_with", "benchmarks/moe.py --tune")
    lines.append(f'  "tuned_with": "{tool} (torch {torch.__version__})",')
    lines.append('  "shapes": {')
    for i, (key, table) in enumerate(shapes.items()):
        lines.append(f"    {json.dumps(key)}: {{")
        entries = [f"      {json.dumps(m)}: {json.dumps(cfg)}" for m, cfg in table.items()]
        lines.append(",\n".join(entries))
        lines.append("    }" + ("," if i < len(shapes) - 1 else ""))
    return "\n".join([*lines, "  }", "}"]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "output", type=Path, help="where to write the JSON results (or, with --tune, the config)"
    )
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument(
        "--tune", action="store_true", help="sweep block configs and write a configs/ JSON file"
    )
    parser.add_argument("--shape", default=None, help="E,N,K,TOP_K (default: Qwen3-30B-A3B's 128,768,2048,8)")
    parser.add_argument(
        "--merge-into", type=Path, default=None, help="with --tune: add the tuned shape to this configs/ file"
    )
    args = parser.parse_args()
    if args.shape:
        set_shape(args.shape)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/moe.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    started = time.perf_counter()
    if args.tune:
        result: dict[str, object] = tune(dtype, tokens)
    else:
        rows = benchmark(dtype, tokens)
        result = {
            "benchmark": "fused_moe",
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "python": platform.python_version(),
            "shape": {
                "hidden": K,
                "moe_intermediate": N,
                "num_experts": E,
                "top_k": TOP_K,
                "dtype": args.dtype,
            },
            "baseline": "torch_reference experts (per-expert loop), same process, same inputs",
            "results": rows,
        }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(format_config_file(result) if args.tune else json.dumps(result, indent=2) + "\n")
    if args.tune and args.merge_into:
        merged = json.loads(args.merge_into.read_text())
        merged["shapes"].update(result["shapes"])  # type: ignore[call-overload]
        merged["tuned_with"] = merged["tuned_with"].rsplit(" (torch", 1)[0]
        merged["tuned_with"] += f", benchmarks/moe.py --tune --shape {args.shape}"
        args.merge_into.write_text(format_config_file(merged))


if __name__ == "__main__":
    main()
