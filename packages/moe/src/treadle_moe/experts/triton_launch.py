"""Launching the bf16 / fp16 / fp32 fused-MoE GEMM (triton_kernels.py), and fitting any fused-MoE GEMM's block
config to the GPU's shared memory (`launch_fitted`, used by the fp8 and 4-bit launchers too).

A config whose tiles do not fit the GPU's shared memory (float32 inputs with tiles tuned for 16-bit ones) is shrunk
at its first launch: fewer stages, then smaller BLOCK_K, then smaller BLOCK_N (BLOCK_M is fixed by the slot
alignment); the fitted config is remembered per (config, operand dtype, GEMM). Float32 inputs and the CPU
interpreter use IEEE dot products (no TF32), so fp32 results match the torch reference closely.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from treadle_moe.activation import SWIGLU_ALPHA, SWIGLU_LIMIT
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.align import BlockAlignment

logger = logging.getLogger(__name__)


def invoke_moe_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
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
    """c[slot] = (gated: act_and_mul)(a[slot // a_rows_per_token] @ b[expert].T + bias[expert]) (* topk_weights[slot]);
    `bias` [E, 2N] (gated: gate's then up's) or [E, K]; `swiglu`: swigluoai's (alpha, limit)."""
    assert config.block_m == alignment.block_m, "block alignment built for another BLOCK_M"
    assert a.stride(1) == 1 and c.stride(1) == 1, "rows of a and c must be contiguous"
    assert gated or activation == "silu", "the activation belongs to the gated (w13) GEMM"
    bias = bias.contiguous() if bias is not None else None

    def launch(fitted: BlockConfig) -> None:
        _launch(a, b, c, topk_weights, alignment, fitted, a_rows_per_token, gated, activation, bias, swiglu)

    launch_fitted((config, a.dtype, gated), config, launch)


def launch_fitted(
    key: tuple[BlockConfig, torch.dtype, bool], config: BlockConfig, launch: Callable[[BlockConfig], None]
) -> None:
    """`launch(config)`, or with the config remembered for `key` (the same config, operand dtype and GEMM) after a
    launch ran out of shared memory: each such failure shrinks the config (`_smaller`) and retries."""
    from triton.runtime.errors import OutOfResources

    config = _FITTED.get(key, config)
    while True:
        try:
            return launch(config)
        except OutOfResources as exc:  # e.g. float32 tiles of a config tuned for 16-bit inputs
            smaller = _smaller(config)
            if smaller is None:
                raise
            # the message, not the exception: its traceback holds the launching frames (the runner, its KV
            # cache), which a handler that keeps records would keep alive
            logger.warning("fused MoE blocks %s do not fit this GPU for %s inputs (%s); trying %s", config,
                           key[1], str(exc), smaller)  # fmt: skip
            config = _FITTED[key] = smaller


_FITTED: dict[tuple[BlockConfig, torch.dtype, bool], BlockConfig] = {}  # a config -> the one that fit the GPU


def _smaller(config: BlockConfig) -> BlockConfig | None:
    """The next config to try when `config` needs more shared memory than the GPU has: fewer pipeline stages,
    then a shorter reduction step, then narrower output blocks (BLOCK_M is fixed by the slot alignment)."""
    if config.num_stages > 1:
        return dataclasses.replace(config, num_stages=config.num_stages - 1)
    if config.block_k > 16:
        return dataclasses.replace(config, block_k=config.block_k // 2)
    if config.block_n > 16:
        return dataclasses.replace(config, block_n=config.block_n // 2)
    return None


def _launch(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: BlockConfig,
    a_rows_per_token: int,
    gated: bool,
    activation: str,
    bias: torch.Tensor | None,
    swiglu: tuple[float, float],
) -> None:
    from treadle_moe.experts import triton_kernels as tk

    n_out = b.shape[1] // 2 if gated else b.shape[1]
    k = b.shape[2]
    grid = (alignment.num_blocks * -(-n_out // config.block_n),)
    weights = topk_weights if topk_weights is not None else c  # unused pointer when not multiplying
    tk.fused_moe_gemm_kernel[grid](
        a,
        b,
        c,
        weights,
        bias if bias is not None else c,  # unused pointer without a bias
        alignment.sorted_token_ids,
        alignment.expert_ids,
        alignment.num_tokens_post_padded,
        n_out,
        k,
        alignment.num_slots,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        c.stride(1),
        bias.stride(0) if bias is not None else 0,
        swiglu[0],
        swiglu[1],
        A_ROWS_PER_TOKEN=a_rows_per_token,
        GATED=gated,
        ACTIVATION=tk.ACTIVATION_CODES[activation],
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        HAS_BIAS=bias is not None,
        IEEE=a.dtype == torch.float32 or a.device.type == "cpu",
        EVEN_K=k % config.block_k == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
