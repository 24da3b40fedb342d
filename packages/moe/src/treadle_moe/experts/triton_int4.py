"""The W4A16 path of Triton fused MoE: block configs and the 4-bit grouped GEMM launches.

For 4-bit expert weights (experts/int4.py) the two GEMMs of triton_fused.py become grouped GEMMs whose B operand is
unpacked from int32 words in registers (triton_int4_kernels.py); the activations stay in the model dtype, so there is
no quantization launch: hidden [rows, K] -> act(gate) * up [slots, N] -> (* routing weight) [slots, K].

Block config (`int4_config`): the model-dtype config tuned for the problem (configs/), with BLOCK_K capped at the
group size when that is a power of two of at least 16, so a K step lies inside one group and the exact integers go
to the tensor cores with the scale applied to the partial sum (the kernel's PER_ROW 0 path); act order, and group
sizes a step cannot divide, gather each row's scale instead (PER_ROW 1). The tiles are a starting point:
benchmarks/moe_w4a16.py times them against bf16 fused MoE on a GPU.
Requirements (`int4_support_reason`): 16-bit or fp32 activations (the dtype's of the base class); any group size.

Small batches (`use_gemv`) take the GEMV kernel of triton_int4_gemv.py instead: no tensor cores, BLOCK_M of 1..4
slots, each nibble unpacked by a mask-and-or and a float subtract. Default: up to E / top_k rows of A (tokens in
the standard format: 16 at Qwen3-30B-A3B's 128 experts, top-8; the batched format's E * max_tokens slab rows, top_k
1), i.e. at most one slot an expert on average. There the GEMV streams each touched expert's weight about once and
spends some two ALU operations a weight plus one FMA a weight and slot, while the dot kernel's BLOCK_M >= 16 tiles
are mostly padding. Measured on an H200 at Qwen3-30B-A3B's shapes (benchmarks/moe_w4a16.py, session 34 call 4),
GEMV against dot: 1 token 26.7 / 41.8 us (symmetric; zero points 26.9 / 52.5, act order 36.5 / 57.6), 16 tokens
207 / 221, but 32 tokens 334 / 265 (act order 436 / 414): above one slot an expert the FMA work grows with the slots
while the bytes do not, and the tensor cores win. TREADLE_MOE_INT4_GEMV_MAX_TOKENS (envs.py) overrides it; 0 never
runs the GEMV kernel.
"""

from __future__ import annotations

import dataclasses

import torch

from treadle_ir.ops.int4 import INT4_PACK
from treadle_moe import envs
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.align import BlockAlignment
from treadle_moe.experts.int4 import Int4ExpertScales, Int4Layout

__all__ = ["int4_config", "invoke_moe_w4a16_gemm", "run_int4_gemms", "use_gemv"]


def int4_config(config: BlockConfig, layout: Int4Layout, k: int, n: int) -> BlockConfig:
    """`config` with BLOCK_K inside one group of both GEMMs (inputs k and n) where the group size allows it."""
    sizes = {layout.group_size_of(k), layout.group_size_of(n)}
    block_k = config.block_k
    for size in sizes:
        if size < k and size >= 16 and size & (size - 1) == 0:
            block_k = min(block_k, size)
    return dataclasses.replace(config, block_k=max(16, block_k))


def use_gemv(num_tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether `num_tokens` rows of A (each routed to top_k of num_experts experts; the batched format passes its slab
    rows and 1) take the GEMV kernel: up to TREADLE_MOE_INT4_GEMV_MAX_TOKENS, else E / top_k (module docstring)."""
    limit = envs.moe_int4_gemv_max_tokens()
    if limit is None:
        limit = max(1, num_experts // max(top_k, 1))
    return 0 < num_tokens <= limit


def _per_row(layout: Int4Layout, group_size: int, k: int, block_k: int) -> bool:
    return layout.act_order or not (group_size >= k or group_size % block_k == 0)


def invoke_moe_w4a16_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    c: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: BlockConfig,
    layout: Int4Layout,
    *,
    a_rows_per_token: int,
    gated: bool,
    activation: str = "silu",
) -> None:
    """c[slot] = (gated: act_and_mul)(a[slot // a_rows_per_token] @ dequant(b[expert])) (* topk_weights[slot]),
    b packed int32 [E, K / 8, COLS] with its scales [E, groups, COLS] (zeros likewise, g_idx [E, K])."""
    from treadle_moe.experts import triton_int4_kernels as tk
    from treadle_moe.experts.triton_kernels import ACTIVATION_CODES
    from treadle_moe.experts.triton_launch import launch_fitted

    assert config.block_m == alignment.block_m, "block alignment built for another BLOCK_M"
    assert a.stride(1) == 1 and c.stride(1) == 1, "rows of a and c must be contiguous"
    assert b.is_contiguous() and scale.is_contiguous(), "packed weights and scales are contiguous"
    cols = b.shape[2]
    n_out = cols // 2 if gated else cols
    k = b.shape[1] * INT4_PACK
    group_size = layout.group_size_of(k)
    weights = topk_weights if topk_weights is not None else scale  # unused pointer when not multiplying

    def launch(config: BlockConfig) -> None:
        grid = (alignment.num_blocks * -(-n_out // config.block_n),)
        tk.fused_moe_w4a16_gemm_kernel[grid](
            a, b, scale, zero if zero is not None else b, g_idx if g_idx is not None else b, c, weights,
            alignment.sorted_token_ids, alignment.expert_ids, alignment.num_tokens_post_padded, n_out, k,
            alignment.num_slots, group_size, a.stride(0), b.stride(0), scale.stride(0),
            g_idx.stride(0) if g_idx is not None else 0, c.stride(0),
            A_ROWS_PER_TOKEN=a_rows_per_token, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
            MUL_ROUTED_WEIGHT=topk_weights is not None, HAS_ZEROS=zero is not None,
            PER_ROW=_per_row(layout, group_size, k, config.block_k), G_IDX=g_idx is not None,
            UPCAST=a.device.type == "cpu" or a.dtype == torch.float32, EXPAND=1, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip

    launch_fitted((config, torch.int32, gated), config, launch)


def run_int4_gemms(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    int4: Int4ExpertScales,
    intermediate: torch.Tensor,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: BlockConfig,
    rows_per_token: int,
    activation: str,
) -> None:
    """hidden [rows, K] -> intermediate [slots, N] (act(gate) * up) -> out [slots, K] (* topk_weights[slot]);
    small batches by the GEMV kernel (`use_gemv`), the others by the grouped GEMM."""
    layout = int4.layout
    if use_gemv(hidden.shape[0], w13.shape[0], rows_per_token):
        from treadle_moe.experts.triton_int4_gemv import gemv_config, invoke_moe_w4a16_gemv

        gemv = gemv_config(alignment.num_slots, w13.shape[0], hidden.shape[1])
        invoke_moe_w4a16_gemv(hidden, w13, int4.w13_scale, int4.w13_zero, int4.w13_g_idx, intermediate, None,
                              alignment, gemv, layout, a_rows_per_token=rows_per_token, gated=True,
                              activation=activation)  # fmt: skip
        gemv = gemv_config(alignment.num_slots, w13.shape[0], intermediate.shape[1])
        invoke_moe_w4a16_gemv(intermediate, w2, int4.w2_scale, int4.w2_zero, int4.w2_g_idx, out, topk_weights,
                              alignment, gemv, layout, a_rows_per_token=1, gated=False)  # fmt: skip
        return
    invoke_moe_w4a16_gemm(hidden, w13, int4.w13_scale, int4.w13_zero, int4.w13_g_idx, intermediate, None, alignment,
                          config, layout, a_rows_per_token=rows_per_token, gated=True,
                          activation=activation)  # fmt: skip
    invoke_moe_w4a16_gemm(intermediate, w2, int4.w2_scale, int4.w2_zero, int4.w2_g_idx, out, topk_weights,
                          alignment, config, layout, a_rows_per_token=1, gated=False)  # fmt: skip
