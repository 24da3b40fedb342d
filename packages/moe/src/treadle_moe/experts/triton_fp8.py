"""The fp8 path of Triton fused MoE: activation quantization and the fp8 grouped GEMM launches.

For fp8 expert weights (experts/fp8.py) the two GEMMs of triton_fused.py become:
  1. the layer input quantized once per token (`ops.quantize_fp8_rows`; block-wise `ops.quantize_fp8_groups` in
     groups of block_k; static activations: every row with the layer's w13 input scale), whatever expert each of
     its top_k slots goes to;
  2. the w13 GEMM on fp8 tensor cores (triton_fp8_kernels.py), scales in the epilogue (per channel) or per K block
     (block-wise), act(gate) * up fused, written in the activation dtype -> [M * top_k, N];
  3. that intermediate quantized per slot (per (slot, group) block-wise; static: with the w2 input scale): the
     spec quantizes the activation output per row, and a row is only complete once every N block of the w13 GEMM
     is done, hence a separate launch (static scales would allow fusing it into the w13 epilogue; not done);
  4. the w2 GEMM likewise, scaled by the routing weight.
The quantization launches are the IR ops, so each runs its platform provider (Triton on CUDA, the spec on CPU);
their outputs are fresh tensors (CUDA-graph safe: the caching allocator serves them from the graph's pool).
Importing treadle_kernels registers those providers here, as the engine's import does: without it a process that
runs treadle_moe from source paths (no installed entry point) quantized with the torch spec, 5-7 launches per
quantization, which cost an H200 more than the fp8 GEMMs save (35 of 69 us at 1 token; session 29's probe).

Requirements (`fp8_support_reason`): fp8 conversions on the device (compute capability >= 8.9) or the interpreter;
block-wise, a block_k that is a power of two from 16 (32 on a GPU: the fp8 MMA's K) to 256, so a K step of the
GEMM covers whole activation groups.
"""

from __future__ import annotations

import functools

import torch

import treadle_kernels  # noqa: F401
from treadle_ir import ops
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.align import BlockAlignment
from treadle_moe.experts.fp8 import Fp8ExpertScales, Fp8Layout

__all__ = ["fp8_support_reason", "invoke_moe_fp8_gemm", "quantize_activations", "run_fp8_gemms"]


@functools.cache
def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def fp8_support_reason(device_type: str, layout: Fp8Layout) -> str | None:
    """Why the fp8 GEMMs cannot run this layout on `device_type` (cuda, or cpu under the interpreter), or None."""
    if device_type == "cuda" and _capability() < (8, 9):
        return f"fp8 tensor cores need compute capability >= 8.9 (the device has {_capability()})"
    if layout.block is not None:
        block_k = layout.block[1]
        least = 32 if device_type == "cuda" else 16
        if block_k & (block_k - 1) or not least <= block_k <= 256:
            return f"fp8 block_k {block_k} must be a power of two from {least} to 256 for the Triton fp8 GEMM"
    return None


def quantize_activations(
    x: torch.Tensor, layout: Fp8Layout, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (float8_e4m3fn [rows, k], fp32 scales [rows, 1] per row or [rows, ceil(k / block_k)]); with
    the static `input_scale` [1] every row takes it."""
    if layout.block is None:
        return ops.quantize_fp8_rows(x, input_scale)
    return ops.quantize_fp8_groups(x, layout.block[1])


def invoke_moe_fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    c: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: BlockConfig,
    layout: Fp8Layout,
    *,
    a_rows_per_token: int,
    gated: bool,
    activation: str = "silu",
) -> None:
    """c[slot] = (gated: act_and_mul)(dequant(a[slot // a_rows_per_token]) @ dequant(b[expert]).T)
    (* topk_weights[slot]), with a / b float8_e4m3fn and their scales in `layout`."""
    from treadle_moe.experts import triton_fp8_kernels as tk
    from treadle_moe.experts.triton_kernels import ACTIVATION_CODES
    from treadle_moe.experts.triton_launch import launch_fitted

    assert config.block_m == alignment.block_m, "block alignment built for another BLOCK_M"
    assert a.stride(1) == 1 and b.stride(2) == 1 and c.stride(1) == 1, "rows of a, b and c must be contiguous"
    n_out = b.shape[1] // 2 if gated else b.shape[1]
    k = b.shape[2]
    group_n, group_k = layout.block if layout.block is not None else (1, k)
    # gate rows of the scales before the up ones: the gate's block rows (block-wise) or its N rows
    up_scale_rows = -(-n_out // group_n) if layout.block is not None else n_out
    weights = topk_weights if topk_weights is not None else a_scale  # unused pointer when not multiplying

    def launch(config: BlockConfig) -> None:
        block_k = min(config.block_k, group_k) if layout.block is not None else config.block_k
        grid = (alignment.num_blocks * -(-n_out // config.block_n),)
        tk.fused_moe_fp8_gemm_kernel[grid](
            a, a_scale, b, b_scale, c, weights, alignment.sorted_token_ids, alignment.expert_ids,
            alignment.num_tokens_post_padded, n_out, k, alignment.num_slots, group_n, group_k, up_scale_rows,
            a.stride(0), a_scale.stride(0), b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1),
            c.stride(0),
            A_ROWS_PER_TOKEN=a_rows_per_token, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
            MUL_ROUTED_WEIGHT=topk_weights is not None, BLOCK_SCALED=layout.block is not None,
            UPCAST=a.device.type == "cpu", EVEN_K=k % block_k == 0, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_K=block_k, GROUP_M=config.group_m, num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip

    launch_fitted((config, a.dtype, gated), config, launch)


def run_fp8_gemms(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    scales: Fp8ExpertScales,
    intermediate: torch.Tensor,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: BlockConfig,
    rows_per_token: int,
    activation: str,
) -> None:
    """Steps 1-4 of the module docstring: hidden [rows, K] -> intermediate [slots, N] -> out [slots, K]."""
    layout = scales.layout
    q, q_scale = quantize_activations(hidden, layout, scales.w13_input)
    invoke_moe_fp8_gemm(q, q_scale, w13, scales.w13, intermediate, None, alignment, config, layout,
                        a_rows_per_token=rows_per_token, gated=True, activation=activation)  # fmt: skip
    q, q_scale = quantize_activations(intermediate, layout, scales.w2_input)
    invoke_moe_fp8_gemm(q, q_scale, w2, scales.w2, out, topk_weights, alignment, config, layout,
                        a_rows_per_token=1, gated=False)  # fmt: skip
