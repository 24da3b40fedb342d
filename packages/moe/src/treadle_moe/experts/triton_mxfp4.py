"""The MXFP4 path of Triton fused MoE: block config and the grouped GEMM launches.

For MXFP4 expert weights (experts/mxfp4.py, gpt-oss) the two GEMMs of triton_fused.py become grouped GEMMs whose B
operand is decoded from e2m1 nibbles and e8m0 scales in registers (triton_mxfp4_kernels.py); the activations stay
in the model dtype, so there is no quantization launch: hidden [rows, K] -> act(gate + b) * (up + b') [slots, N] ->
(+ b2, * routing weight) [slots, K]. The experts' biases and swigluoai run in the epilogues as in the bf16 kernel.
The weight decode (`decode_kind`): on a Hopper GPU with bf16 activations, packed bf16 pairs by inline PTX ("bf16", the
default: gpt-oss-20b's experts at 1 token 64.5 µs against 74.2 for "fp32" and 71.6 for bf16 experts, H200, session
35); else, and under TREADLE_MXFP4_DECODE=fp32, float32 bit placement in Triton ops ("fp32"). Both give the exact
weights, so the same tiles give the same output.
Block config (`mxfp4_config`), measured at gpt-oss's expert shapes on an H200 (benchmarks/moe_mxfp4.py --sweep,
sessions 34-35; an expert's expected rows = tokens x top_k / experts, rounded up):
- at most 1 row (decode of a few sequences): BLOCK_N 32, BLOCK_K 256 (0.83x bf16's time against the tables' tiles);
- 2-8 rows: BLOCK_N 64, BLOCK_K 128; with the fp32 decode C^T = W A^T (`swap_ab`: the decoded weight tile is the
  dot's left operand as it comes, no transpose; the rows fill the right operand's 16-wide side; 0.80-0.89x the
  tables' tiles), with the bf16 decode not swapped (16 / 64 tokens: 271 / 328 µs against 287 / 347 swapped);
- 9-127 rows: the tables' config (weight-only 4-bit tables first, configs/; 256 tokens, 32 rows, ran 5 % slower
  swapped);
- from 128 rows: BLOCK_M 128, BLOCK_N 64, BLOCK_K 64, 4 warps, swapped (session 35's sweep, `--sweep --wide`: 1,024
  and 4,096 tokens 0.84x the tables' fallback tile swapped, 128 x 128 x 64 on 8 warps).
BLOCK_K is at least 32 everywhere (the steps hold whole scale blocks; a given config is raised too, and keeps its
swap_ab); the CPU interpreter keeps its small config.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from treadle_moe import envs
from treadle_moe.activation import SWIGLU_ALPHA, SWIGLU_LIMIT
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.align import BlockAlignment
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.mxfp4 import MXFP4_BLOCK, Mxfp4ExpertScales

__all__ = ["decode_kind", "invoke_moe_mxfp4_gemm", "mxfp4_config", "run_mxfp4_gemms"]


# an expert's expected rows -> tiles for few rows, per weight decode; from PREFILL_ROWS the prefill tile
_FEW_ROWS = BlockConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=3)
DECODE_TILES = {
    decode: ((1, BlockConfig(16, 32, 256, group_m=1, num_warps=4, num_stages=3)),
             (8, dataclasses.replace(_FEW_ROWS, swap_ab=decode == "fp32")))
    for decode in ("bf16", "fp32")
}  # fmt: skip
PREFILL_ROWS = 128
PREFILL_TILE = BlockConfig(128, 64, 64, group_m=8, num_warps=4, num_stages=3, swap_ab=True)


def mxfp4_config(
    config: BlockConfig, num_tokens: int, top_k: int, num_experts: int, *, source: str, decode: str = "fp32"
) -> BlockConfig:
    """The block config for MXFP4 experts (module docstring): `config` is the tables' (`source` "given": as given;
    "interpreter": the CPU interpreter's, kept) with BLOCK_K raised to one scale block (32); `decode` the kernel's
    weight decode ("bf16" / "fp32")."""
    config = dataclasses.replace(config, block_k=max(MXFP4_BLOCK, config.block_k))
    if source in ("given", "interpreter"):
        return config
    rows = -(-num_tokens * top_k // max(num_experts, 1))
    for most, tiles in DECODE_TILES[decode]:
        if rows <= most:
            return tiles
    return PREFILL_TILE if rows >= PREFILL_ROWS else config


DECODE = "bf16"  # the default weight decode on a GPU with bf16 activations (envs.mxfp4_decode)


def decode_kind(dtype: torch.dtype, device: torch.device) -> str:
    """The weight decode for activations of `dtype` on `device` (module docstring): the bf16 decode needs compute
    capability 9.0 (its PTX multiplies bf16 pairs: mul.bf16x2), so older GPUs take the fp32 one."""
    if dtype != torch.bfloat16 or device.type != "cuda":
        return "fp32"
    chosen = envs.mxfp4_decode()
    capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if chosen == "bf16" and capability < (9, 0):
        raise ValueError(
            f"TREADLE_MXFP4_DECODE=bf16 needs a GPU of compute capability 9.0 or later (its PTX multiplies bf16 "
            f"pairs); this one is {capability[0]}.{capability[1]}: unset it, or set fp32"
        )
    return chosen or (DECODE if capability >= (9, 0) else "fp32")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return major, minor


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
    bf16_asm = decode_kind(a.dtype, a.device) == "bf16"

    def launch(config: BlockConfig) -> None:
        grid = (alignment.num_blocks * -(-n_out // config.block_n),)
        tk.fused_moe_mxfp4_gemm_kernel[grid](
            a, b, scale, c, weights, bias if bias is not None else scale,
            alignment.sorted_token_ids, alignment.expert_ids, alignment.num_tokens_post_padded, n_out, k,
            alignment.num_slots, a.stride(0), b.stride(0), b.stride(1), scale.stride(0), scale.stride(1), c.stride(0),
            bias.stride(0) if bias is not None else 0, float(swiglu[0]), float(swiglu[1]),
            A_ROWS_PER_TOKEN=a_rows_per_token, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
            MUL_ROUTED_WEIGHT=topk_weights is not None, HAS_BIAS=bias is not None,
            UPCAST=a.device.type == "cpu" or a.dtype == torch.float32, SWAP_AB=config.swap_ab, BF16_ASM=bf16_asm,
            BLOCK_M=config.block_m,
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
