"""fp8 fused-MoE micro-benchmark at Qwen3-30B-A3B shapes: Triton fused MoE with bf16 weights against fp8 weights,
per channel and block-wise (128 x 128, Qwen3-30B-A3B-FP8's layout), in the same process on the same inputs.

Shapes: hidden K=2048, moe_intermediate N=768, E=128 experts, top-8, bf16 activations, softmax routing with
renormalization on random logits, tokens 1, 16, 64, 256, 1024, 4096 (`--tokens`). The three run the same modular
kernel (no-EP standard prepare/finalize, `TritonExperts`) and differ only in the weights: bf16 (the baseline), fp8
per channel (what `--quantization fp8` gives; activations quantized per token) and fp8 block-wise (activations per
(token, 128) group). Each is timed replayed from a CUDA graph (as the model runner runs decode steps) and eagerly;
reported per token count: microseconds, TFLOP/s (6·M·top_k·K·N flops; fp8 also as a share of twice the bf16
datasheet rate), GB/s over the minimum bytes (the weights of
the experts hit, at 1 or 2 bytes a value, plus activations in and out), the fp8 speed ratio to bf16 (bf16 time /
fp8 time, > 1 is faster), and the fp8 output's relative error against the torch reference on the same fp8 weights
(the dense IR ops per expert: `fp8_rel_err_vs_reference`) and against the bf16 output (what fp8 costs).

    python benchmarks/moe_fp8.py results.json                  # benchmark (about a minute on one H200)
    python benchmarks/moe_fp8.py tuned.json --tune             # sweep fp8 block configs (block-wise weights)
The --tune file holds the `dtype=float8_e4m3fn` shape key (both fp8 layouts use it; block-wise runs BLOCK_K <= 128):
merge its entry into packages/moe/src/treadle_moe/configs/<device>.json. Needs a CUDA GPU with fp8 (sm_89+) and
PYTHONPATH holding packages/moe/src, packages/ir/src and packages/kernels/src.
"""

from __future__ import annotations

import json

import torch
from moe import (
    CEILINGS,
    TOP_K,
    E,
    K,
    N,
    make_problem,
    make_weights,
    sweep,
)
from moe_quant import bf16_row, environment, forward_call, layout_row, main, moved_bytes, relative_error

from treadle_moe import (
    Fp8Layout,
    ModularKernel,
    NoEPStandardPrepareFinalize,
    TorchExperts,
    TritonExperts,
)
from treadle_moe.configs import BlockConfig, get_block_config, shape_key
from treadle_moe.experts.fp8 import quantize_experts

TOKENS = [1, 16, 64, 256, 1024, 4096]
LAYOUTS = {"fp8_channel": Fp8Layout(), "fp8_block128": Fp8Layout((128, 128))}


def benchmark(tokens: list[int]) -> list[dict[str, object]]:
    w13, w2 = make_weights(torch.bfloat16)
    quantized = {name: quantize_experts(w13, w2, layout) for name, layout in LAYOUTS.items()}
    fused = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts())
    reference = ModularKernel(NoEPStandardPrepareFinalize(), TorchExperts())
    device_name = torch.cuda.get_device_name()
    peak_tflops, peak_gbs = next(
        (v for key, v in CEILINGS.items() if key in device_name), (float("nan"),) * 2
    )
    rows: list[dict[str, object]] = []
    for m in tokens:
        p = make_problem(m, torch.bfloat16)
        run_bf16 = forward_call(fused, p, w13, w2)
        bf16_out = run_bf16()
        row, bf16_us = bf16_row(m, run_bf16, p["topk_ids"])
        for name, (q13, q2, scales) in quantized.items():
            run_fp8 = forward_call(fused, p, q13, q2, fp8=scales)
            out, ref = run_fp8(), forward_call(reference, p, q13, q2, fp8=scales)()
            moved = moved_bytes(p["topk_ids"], 1)
            row |= layout_row(name, m, run_fp8, moved, ("fp8", 2 * peak_tflops), peak_gbs, bf16_us)
            config, source = get_block_config(m, E, N, K, TOP_K, torch.float8_e4m3fn, device_name)
            row |= {
                f"{name}_rel_err_vs_reference": relative_error(out, ref),
                f"{name}_rel_err_vs_bf16": relative_error(out, bf16_out),
                f"{name}_block_config": f"{config.to_json()} ({source})",
            }
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("block_config")}), flush=True)
        rows.append(row)
    return rows


def tune(tokens: list[int]) -> dict[str, object]:
    """Best block config per token count for the block-wise fp8 GEMMs (graph-replayed time)."""
    w13, w2 = make_weights(torch.bfloat16)
    q13, q2, scales = quantize_experts(w13, w2, LAYOUTS["fp8_block128"])
    # the fp8 fallback's largest tile beside moe.py's sweep
    largest = BlockConfig(64, 128, 128, group_m=8, num_warps=8)
    table = sweep(tokens, lambda kernel, p: forward_call(kernel, p, q13, q2, fp8=scales), (largest,))
    return {
        "device_name": torch.cuda.get_device_name(),
        "tuned_with": "benchmarks/moe_fp8.py --tune",
        "shapes": {shape_key(E, N, K, torch.float8_e4m3fn): table},
    }


def results(tokens: list[int]) -> dict[str, object]:
    return environment("fused_moe_fp8") | {
        "fp8_peak": "pct_peak_fp8_tflops is against twice the dense bf16 datasheet rate (fp8 tensor cores)",
        "results": benchmark(tokens),
    }


if __name__ == "__main__":
    main(__doc__, "fp8", TOKENS, results, tune)
