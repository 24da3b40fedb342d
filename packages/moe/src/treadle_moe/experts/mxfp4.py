"""MXFP4 experts (gpt-oss's released format, OCP microscaling FP4): the stacked layout, its spec and a quantizer.

Each expert projection W [rows, cols] (rows the outputs, cols the inputs, as w13 / w2 are) is held as
- blocks uint8 [rows, cols / 32, 16]: 32 e2m1 values per block of a row, two per byte, the element of even index in
  the low nibble and the odd one in the high nibble (a row's bytes are contiguous: [rows, cols / 2] in memory);
- scales uint8 [rows, cols / 32]: one e8m0 exponent per block, the block's scale 2^(byte - 127).
An e2m1 nibble is a sign bit (8) over codes 0-7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6:
    W[r, 32 g + i] = e2m1(nibble i of blocks[r, g]) * 2^(scales[r, g] - 127)
Every such value has at most two significant bits, so it is exact in bfloat16 and float32 (and in float16 within
its exponent range), whatever the order of the product.
Stacked per expert (E: this rank's experts; N: this rank's intermediate width, a multiple of 32; K the hidden size):
- w13 uint8 [E, 2N, K / 32, 16] with scales [E, 2N, K / 32]: gate rows 0..N-1, then up rows N..2N-1 (as w13);
- w2 uint8 [E, K, N / 32, 16] with scales [E, K, N / 32].
The spec (`dequantize_expert`, what the torch reference runs and the Triton kernel matches): an expert's two matrices
dequantized exactly to the activations' dtype, then the model-dtype expert MLP with its epilogue (biases, swigluoai:
experts/epilogue.py), so MXFP4 experts differ from their dequantized bf16 twins only in the order of the sums.
`quantize_mxfp4` makes the layout from model-dtype weights: per block of 32 the smallest power-of-two scale that puts
the block's largest magnitude within 6, each value rounded to the nearest e2m1 (ties to the smaller magnitude);
values already of the form e2m1 * 2^e come back exactly (dummy weights, tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MXFP4_BLOCK",
    "Mxfp4ExpertScales",
    "Mxfp4Layout",
    "check_mxfp4_experts",
    "dequantize_mxfp4",
    "mxfp4_expert_sizes",
    "quantize_experts_mxfp4",
    "quantize_mxfp4",
]

MXFP4_BLOCK = 32  # values per scale (and per 16 bytes of blocks)
E8M0_BIAS = 127
# e2m1 code (a nibble's low three bits) -> magnitude; the nibble's bit 8 is the sign
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between consecutive magnitudes: rounding to nearest is a bucket search
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass(frozen=True, slots=True)
class Mxfp4Layout:
    """MXFP4 expert weights (one format, no options): the key of kernel choices and the oracle's reasons."""

    def describe(self) -> str:
        return "mxfp4 (e2m1 weights, an e8m0 scale per 32 inputs; 16-bit activations)"


@dataclass(frozen=True, slots=True)
class Mxfp4ExpertScales:
    """The e8m0 scales beside uint8 blocks w13 [E, 2N, K / 32, 16] / w2 [E, K, N / 32, 16] (module docstring)."""

    w13_scale: torch.Tensor  # uint8 [E, 2N, K / 32]
    w2_scale: torch.Tensor  # uint8 [E, K, N / 32]
    layout: Mxfp4Layout = Mxfp4Layout()


def mxfp4_expert_sizes(w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    """(E, N, K) of blocks w13 [E, 2N, K / 32, 16] / w2 [E, K, N / 32, 16]; ValueError when they disagree."""
    half = MXFP4_BLOCK // 2
    if (
        w13.dim() != 4
        or w2.dim() != 4
        or w13.dtype != torch.uint8
        or w2.dtype != torch.uint8
        or w13.shape[3] != half
    ):
        raise ValueError(
            f"MXFP4 experts are uint8 blocks [E, 2N, K / 32, 16] / [E, K, N / 32, 16], got {w13.dtype} "
            f"{tuple(w13.shape)} / {w2.dtype} {tuple(w2.shape)}"
        )
    e, two_n, k32, _ = w13.shape
    n, k = two_n // 2, k32 * MXFP4_BLOCK
    if two_n % 2 or n % MXFP4_BLOCK or tuple(w2.shape) != (e, k, n // MXFP4_BLOCK, half):
        raise ValueError(
            f"MXFP4 expert blocks disagree: w13 {tuple(w13.shape)} is [E, 2N, K / 32, 16] so w2 must be "
            f"{(e, k, n // MXFP4_BLOCK, half)} (N a multiple of 32), got {tuple(w2.shape)}"
        )
    return e, n, k


def check_mxfp4_experts(w13: torch.Tensor, w2: torch.Tensor, mxfp4: Mxfp4ExpertScales) -> None:
    """ValueError unless the blocks' scales are uint8 of their shapes."""
    mxfp4_expert_sizes(w13, w2)
    for name, blocks, scale in (("w13", w13, mxfp4.w13_scale), ("w2", w2, mxfp4.w2_scale)):
        if scale.dtype != torch.uint8 or tuple(scale.shape) != tuple(blocks.shape[:3]):
            raise ValueError(
                f"MXFP4 {name} scales are {scale.dtype} {tuple(scale.shape)}; its blocks {tuple(blocks.shape)} need "
                f"uint8 {tuple(blocks.shape[:3])} (one e8m0 exponent per 32 inputs)"
            )


def _e2m1_table(device: torch.device) -> torch.Tensor:
    """[16] float32: nibble -> value (nibbles 8-15 are 0-7 negated)."""
    positive = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([positive, -positive])


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] in `dtype` (exact; module docstring)."""
    table = _e2m1_table(blocks.device)
    packed = blocks.long()
    # [..., G, 16, 2] -> [..., G, 32]: byte j holds elements 2j (low nibble) and 2j + 1 (high nibble)
    values = torch.stack([table[packed & 0x0F], table[packed >> 4]], dim=-1).flatten(-2)
    scale = torch.exp2(scales.float() - E8M0_BIAS).unsqueeze(-1)
    return (values * scale).flatten(-2).to(dtype)


def dequantize_expert(
    w13: torch.Tensor, w2: torch.Tensor, mxfp4: Mxfp4ExpertScales, expert: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `expert`'s w13 [2N, K] and w2 [K, N] in `dtype`: the spec's weights."""
    return (
        dequantize_mxfp4(w13[expert], mxfp4.w13_scale[expert], dtype),
        dequantize_mxfp4(w2[expert], mxfp4.w2_scale[expert], dtype),
    )


@torch.no_grad()
def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., cols] (cols a multiple of 32) -> (blocks uint8 [..., cols / 32, 16], scales uint8 [..., cols / 32]) by
    round to nearest (module docstring)."""
    if w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 quantizes rows in blocks of {MXFP4_BLOCK}; the rows are {w.shape[-1]} wide")
    groups = w.float().unflatten(-1, (-1, MXFP4_BLOCK))  # [..., G, 32]
    amax = groups.abs().amax(dim=-1)  # [..., G]
    # the smallest 2^e with amax / 2^e <= 6 (an all-zero block takes 2^0)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax))
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    midpoints = torch.tensor(_MIDPOINTS, device=w.device)
    codes = torch.bucketize(scaled.abs().clamp(max=6.0), midpoints)  # [..., G, 32] in 0..7
    nibbles = (codes + 8 * (scaled < 0).long()).to(torch.uint8)
    nibbles = torch.where(codes == 0, torch.zeros_like(nibbles), nibbles)  # no negative zero
    pairs = nibbles.unflatten(-1, (MXFP4_BLOCK // 2, 2))  # [..., G, 16, 2]
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    scales = (exponent + E8M0_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


@torch.no_grad()
def quantize_experts_mxfp4(
    w13: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Mxfp4ExpertScales]:
    """Model-dtype w13 [E, 2N, K] / w2 [E, K, N] -> (blocks w13, blocks w2, their scales), one expert at a time."""
    parts13 = [quantize_mxfp4(w13[e]) for e in range(w13.shape[0])]
    parts2 = [quantize_mxfp4(w2[e]) for e in range(w2.shape[0])]
    b13, s13 = (torch.stack(t) for t in zip(*parts13, strict=True))
    b2, s2 = (torch.stack(t) for t in zip(*parts2, strict=True))
    return b13, b2, Mxfp4ExpertScales(s13, s2)
