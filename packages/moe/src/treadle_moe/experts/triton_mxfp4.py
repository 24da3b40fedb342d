"""The MXFP4 path of Triton fused MoE: block config and the grouped GEMM launches.

For MXFP4 expert weights (experts/mxfp4.py, gpt-oss) the two GEMMs of triton_fused.py become grouped GEMMs whose B
operand is decoded from e2m1 nibbles and e8m0 scales in registers (triton_mxfp4_kernels.py); the activations stay
in the model dtype, so there is no quantization launch: hidden [rows, K] -> act(gate + b) * (up + b') [slots, N] ->
(+ b2, * routing weight) [slots, K]. The experts' biases and swigluoai run in the epilogues as in the bf16 kernel.
Two kernels: while an expert's expected rows (tokens x top_k / experts, rounded up) are at most
TREADLE_MOE_MXFP4_GEMV_MAX_ROWS (default 8), the GEMV of triton_mxfp4_gemv.py (no tl.dot; decode sizes), else the
grouped GEMM of triton_mxfp4_kernels.py. The block config says which (`mxfp4_config`): BLOCK_M below 16 is the GEMV
(BLOCK_M the rows' power of two, BLOCK_K / 32 scale blocks per step); else the tables' config for the problem,
weight-only 4-bit tables first (configs/), with BLOCK_K at least 32 (the GEMM's steps hold whole scale blocks; a given
config is raised too). The GEMM computes C^T = W A^T instead (SWAP_AB: the decoded weight tile is the dot's left
operand as it comes, no transpose; the rows the right one's 16-wide side) for BLOCK_M up to
TREADLE_MOE_MXFP4_SWAP_AB_MAX_M. The GEMM's tiles are a starting point, not tuned for it (benchmarks/moe_mxfp4.py
times both kernels against bf16).
"""

from __future__ import annotations

import dataclasses

import torch

from treadle_moe import envs
from treadle_moe.activation import SWIGLU_ALPHA, SWIGLU_LIMIT
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.align import BlockAlignment
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.mxfp4 import MXFP4_BLOCK, Mxfp4ExpertScales

__all__ = ["invoke_moe_mxfp4_gemm", "mxfp4_config", "run_mxfp4_gemms"]


# the GEMV's tile: 32 weight rows a program, 4 scale blocks (128 inputs) a step
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS = 32, 128, 4
GEMV_MAX_BLOCK_M = 8  # more rows take more blocks


def mxfp4_config(
    config: BlockConfig, num_tokens: int, top_k: int, num_experts: int, *, given: bool = False
) -> BlockConfig:
    """The GEMV config when an expert's expected rows are few (module docstring), else `config` with BLOCK_K at
    least one scale block (32; block sizes are powers of two). A `given` config keeps its kernel."""
    rows = -(-num_tokens * top_k // max(num_experts, 1))
    if not given and rows <= envs.moe_mxfp4_gemv_max_rows():
        block_m = min(1 << max(rows - 1, 0).bit_length(), GEMV_MAX_BLOCK_M)
        return BlockConfig(block_m, GEMV_BLOCK_N, GEMV_BLOCK_K, group_m=1, num_warps=GEMV_WARPS, num_stages=2)
    return dataclasses.replace(config, block_k=max(MXFP4_BLOCK, config.block_k))


def invoke_moe_mxfp4_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    c: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: BlockConfig,
    *,
    a_rows_per_token: int,
    gated: bool,
    activation: str = "silu",
    bias: torch.Tensor | None = None,
    swiglu: tuple[float, float] = (SWIGLU_ALPHA, SWIGLU_LIMIT),
) -> None:
    """c[slot] = (gated: act_and_mul)(a[slot // a_rows_per_token] @ dequant(b[expert]).T + bias[expert])
    (* topk_weights[slot]); b uint8 blocks [E, ROWS, K / 32, 16] with scales [E, ROWS, K / 32]."""
    from treadle_moe.experts import triton_mxfp4_gemv as tg
    from treadle_moe.experts import triton_mxfp4_kernels as tk
    from treadle_moe.experts.triton_kernels import ACTIVATION_CODES
    from treadle_moe.experts.triton_launch import launch_fitted

    assert config.block_m == alignment.block_m, "block alignment built for another BLOCK_M"
    assert a.stride(1) == 1 and c.stride(1) == 1, "rows of a and c must be contiguous"
    assert b.is_contiguous() and scale.is_contiguous(), "MXFP4 blocks and scales are contiguous"
    assert gated or activation == "silu", "the activation belongs to the gated (w13) GEMM"
    assert config.block_k % MXFP4_BLOCK == 0, "MXFP4 K steps hold whole scale blocks (mxfp4_config)"
    rows = b.shape[1]
    n_out = rows // 2 if gated else rows
    k = b.shape[2] * MXFP4_BLOCK
    bias = bias.contiguous() if bias is not None else None
    weights = topk_weights if topk_weights is not None else scale  # unused pointer when not multiplying

    if config.block_m < 16:
        words = b.view(torch.int32)  # [E, ROWS, K / 32, 4]: a scale block's 16 bytes are 4 words
        grid = (alignment.num_blocks * -(-n_out // config.block_n),)
        tg.fused_moe_mxfp4_gemv_kernel[grid](
            a, words, scale, c, weights, bias if bias is not None else scale,
            alignment.sorted_token_ids, alignment.expert_ids, alignment.num_tokens_post_padded, n_out, k,
            alignment.num_slots, a.stride(0), words.stride(0), words.stride(1), scale.stride(0), scale.stride(1),
            c.stride(0), bias.stride(0) if bias is not None else 0, float(swiglu[0]), float(swiglu[1]),
            A_ROWS_PER_TOKEN=a_rows_per_token, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
            MUL_ROUTED_WEIGHT=topk_weights is not None, HAS_BIAS=bias is not None, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, GROUPS=config.block_k // MXFP4_BLOCK, GROUP_M=config.group_m,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        return

    swap_ab = config.block_m <= envs.moe_mxfp4_swap_ab_max_m()

    def launch(config: BlockConfig) -> None:
        grid = (alignment.num_blocks * -(-n_out // config.block_n),)
        tk.fused_moe_mxfp4_gemm_kernel[grid](
            a, b, scale, c, weights, bias if bias is not None else scale,
            alignment.sorted_token_ids, alignment.expert_ids, alignment.num_tokens_post_padded, n_out, k,
            alignment.num_slots, a.stride(0), b.stride(0), b.stride(1), scale.stride(0), scale.stride(1), c.stride(0),
            bias.stride(0) if bias is not None else 0, float(swiglu[0]), float(swiglu[1]),
            A_ROWS_PER_TOKEN=a_rows_per_token, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
            MUL_ROUTED_WEIGHT=topk_weights is not None, HAS_BIAS=bias is not None,
            UPCAST=a.device.type == "cpu" or a.dtype == torch.float32, SWAP_AB=swap_ab, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip

    launch_fitted((config, torch.uint8, gated), config, launch)


def run_mxfp4_gemms(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    mxfp4: Mxfp4ExpertScales,
    intermediate: torch.Tensor,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: BlockConfig,
    rows_per_token: int,
    activation: str,
    epilogue: ExpertEpilogue | None,
) -> None:
    """hidden [rows, K] -> intermediate [slots, N] (act(gate + b13) * (up + b13')) -> out [slots, K]
    (+ b2, * topk_weights[slot])."""
    e = epilogue or ExpertEpilogue()
    invoke_moe_mxfp4_gemm(hidden, w13, mxfp4.w13_scale, intermediate, None, alignment, config,
                          a_rows_per_token=rows_per_token, gated=True, activation=activation, bias=e.w13_bias,
                          swiglu=(e.swiglu_alpha, e.swiglu_limit))  # fmt: skip
    invoke_moe_mxfp4_gemm(intermediate, w2, mxfp4.w2_scale, out, topk_weights, alignment, config,
                          a_rows_per_token=1, gated=False, bias=e.w2_bias)  # fmt: skip
