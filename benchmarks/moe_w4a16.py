"""W4A16 fused-MoE micro-benchmark at Qwen3-30B-A3B shapes: Triton fused MoE with bf16 weights against 4-bit weights
(treadle's packed layout, groups of 128 as Qwen3-30B-A3B-GPTQ-Int4), in the same process on the same inputs.

Shapes: hidden K=2048, moe_intermediate N=768, E=128 experts, top-8, bf16 activations, softmax routing with
renormalization on random logits, tokens 1, 16, 64, 256, 1024, 4096 (`--tokens`). All run the same modular kernel
(no-EP standard prepare/finalize, `TritonExperts`) and differ only in the weights: bf16 (the baseline) and 4-bit in
three layouts, round-to-nearest from the bf16 weights (treadle_moe.experts.int4.quantize_experts_int4): symmetric
(GPTQ sym=true), asymmetric (zero points: AWQ, GPTQ sym=false) and symmetric with act order (GPTQ desc_act: each
row's scale gathered through g_idx). Each is timed replayed from a CUDA graph (as the model runner runs decode steps)
and eagerly; reported per token count: microseconds, TFLOP/s (6·M·top_k·K·N flops), GB/s over the minimum bytes
(the weights of the experts hit, at 2 bytes or half a byte plus scales a value, plus activations in and out), the
speed ratio to bf16 (bf16 time / 4-bit time, > 1 is faster), the block config used, and the 4-bit output's relative
error against the torch reference on the same 4-bit weights (the dense w4a16_linear reference per expert) and
against the bf16 output (what 4 bits cost). Small batches take the 4-bit GEMV kernel by default
(experts/triton_int4_gemv.py, `use_gemv`): each layout's row also names the kernel the default ran (`_kernel`), the
tl.dot grouped GEMM's time forced with TREADLE_MOE_INT4_GEMV_MAX_TOKENS=0 (`_dot_us`, graph-replayed), the default's
speed-up over it (`_speedup_vs_dot`) and their outputs' relative difference (`_rel_err_vs_dot`).

    python benchmarks/moe_w4a16.py results.json                 # about a minute on one H200
    python benchmarks/moe_w4a16.py results.json --tokens 1,64    # a subset
    python benchmarks/moe_w4a16.py gemv.json --tokens 1,4,16,32,64   # around the GEMV threshold (32 tokens)
    python benchmarks/moe_w4a16.py tuned.json --tune             # sweep 4-bit block configs (symmetric g128)
The --tune file holds the `dtype=bfloat16,weights=int4` shape key (every 4-bit layout uses it; BLOCK_K is capped at
the group size): merge its entry into packages/moe/src/treadle_moe/configs/<device>.json.

The 4-bit GEMMs take the device's 4-bit table for the shape, else the bf16 one (configs/), BLOCK_K capped at the
group size (experts/triton_int4.py); each row names the config and its source. Needs a CUDA GPU and
PYTHONPATH holding packages/moe/src, packages/ir/src and packages/kernels/src (and benchmarks/ for moe.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from moe import CEILINGS, TOP_K, E, K, N, make_problem, make_weights, sweep, time_graph
from moe_quant import bf16_row, environment, forward_call, layout_row, main, moved_bytes, relative_error

from treadle_moe import (
    Int4Layout,
    ModularKernel,
    NoEPStandardPrepareFinalize,
    TorchExperts,
    TritonExperts,
)
from treadle_moe.configs import shape_key
from treadle_moe.experts.int4 import quantize_experts_int4
from treadle_moe.experts.triton_int4 import use_gemv

TOKENS = [1, 16, 64, 256, 1024, 4096]
LAYOUTS = {
    "w4_g128_sym": Int4Layout(128, has_zeros=False, act_order=False),
    "w4_g128_asym": Int4Layout(128, has_zeros=True, act_order=False),
    "w4_g128_sym_act_order": Int4Layout(128, has_zeros=False, act_order=True),
}


def benchmark(tokens: list[int]) -> list[dict[str, object]]:
    w13, w2 = make_weights(torch.bfloat16)
    quantized = {name: quantize_experts_int4(w13, w2, layout) for name, layout in LAYOUTS.items()}
    fused = TritonExperts()
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), fused)
    reference = ModularKernel(NoEPStandardPrepareFinalize(), TorchExperts())
    device_name = torch.cuda.get_device_name()
    peak_tflops, peak_gbs = next(
        (v for key, v in CEILINGS.items() if key in device_name), (float("nan"),) * 2
    )
    # half a byte a value, plus a 2-byte scale (and 1-byte zero point) per 128 values
    int4_bytes = {name: 0.5 + (3 if layout.has_zeros else 2) / 128 for name, layout in LAYOUTS.items()}
    rows: list[dict[str, object]] = []
    for m in tokens:
        p = make_problem(m, torch.bfloat16)
        run_bf16 = forward_call(kernel, p, w13, w2)
        bf16_out = run_bf16()
        row, bf16_us = bf16_row(m, run_bf16, p["topk_ids"])
        for name, (q13, q2, scales) in quantized.items():
            run = forward_call(kernel, p, q13, q2, int4=scales)
            out, ref = run(), forward_call(reference, p, q13, q2, int4=scales)()
            moved = moved_bytes(p["topk_ids"], int4_bytes[name])
            timings = layout_row(name, m, run, moved, ("bf16", peak_tflops), peak_gbs, bf16_us)
            row |= timings
            with dot_kernel_forced():
                dot_us, dot_out = 1000 * time_graph(run), run()
            default_us = timings[f"{name}_us"]
            assert isinstance(default_us, float), "layout_row's times are floats"
            row |= {
                f"{name}_kernel": "gemv" if use_gemv(m, E, TOP_K) else "dot",
                f"{name}_dot_us": round(dot_us, 2),
                f"{name}_speedup_vs_dot": round(dot_us / default_us, 3),
                f"{name}_rel_err_vs_dot": relative_error(out, dot_out),
            }
            config, source = fused.config_for(m, q13, TOP_K, scales)
            row |= {
                f"{name}_rel_err_vs_reference": relative_error(out, ref),
                f"{name}_rel_err_vs_bf16": relative_error(out, bf16_out),
                f"{name}_block_config": f"{config.to_json()} ({source})",
            }
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("block_config")}), flush=True)
        rows.append(row)
    return rows


@contextlib.contextmanager
def dot_kernel_forced() -> Iterator[None]:
    """The 4-bit GEMMs run the tl.dot grouped GEMM at every batch size (TREADLE_MOE_INT4_GEMV_MAX_TOKENS=0)."""
    name = "TREADLE_MOE_INT4_GEMV_MAX_TOKENS"
    before = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def tune(tokens: list[int]) -> dict[str, object]:
    """Best block config per token count for the 4-bit GEMMs (symmetric, groups of 128; graph-replayed time)."""
    w13, w2 = make_weights(torch.bfloat16)
    q13, q2, scales = quantize_experts_int4(w13, w2, LAYOUTS["w4_g128_sym"])
    # the sweep times the grouped GEMM's block configs, which the GEMV kernel would ignore at small batches
    with dot_kernel_forced():
        table = sweep(tokens, lambda kernel, p: forward_call(kernel, p, q13, q2, int4=scales))
    return {
        "device_name": torch.cuda.get_device_name(),
        "tuned_with": "benchmarks/moe_w4a16.py --tune",
        "shapes": {shape_key(E, N, K, torch.bfloat16, int4=True): table},
    }


def results(tokens: list[int]) -> dict[str, object]:
    return environment("fused_moe_w4a16", group_size=128) | {"results": benchmark(tokens)}


if __name__ == "__main__":
    main(__doc__, "4-bit", TOKENS, results, tune)
