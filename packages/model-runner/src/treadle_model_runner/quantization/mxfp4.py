"""MXFP4 (OCP microscaling FP4), the format of gpt-oss's released expert weights, dequantized at load.

A checkpoint (quantization_config.quant_method "mxfp4", as transformers' integrations/mxfp4.py reads it) stores each
expert matrix W [E, rows, cols] as two uint8 tensors:
- `<proj>_blocks` [E, rows, cols / 32, 16]: 32 FP4 values per block of a row, two per byte, the element of even index
  in the low nibble and the odd one in the high nibble;
- `<proj>_scales` [E, rows, cols / 32]: one e8m0 exponent per block, the block's scale being 2^(byte - 127).
Each nibble is an FP4 e2m1 number: a sign bit, then codes 0-7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6.
    W[e, r, 32 g + i] = e2m1(nibble i of blocks[e, r, g]) * 2^(scales[e, r, g] - 127)
Every such value is exact in bfloat16 and float32 (at most two significant bits, an exponent within bf16's range
for the scales real checkpoints hold), so dequantizing is exact in those dtypes.

On CUDA the experts stay MXFP4 (quantization/mxfp4_experts.py, treadle_moe's MXFP4 layout and Triton kernel); on the
CPU, or with TREADLE_MXFP4_DEQUANTIZE=1, they are dequantized here to the model dtype as they load (4.25 bits become
16 per weight in bf16), which the load's log line reports.
"""

from __future__ import annotations

import torch

__all__ = ["MXFP4_BLOCK", "MXFP4_METHOD", "dequantize_mxfp4", "is_mxfp4_config"]

MXFP4_METHOD = "mxfp4"
MXFP4_BLOCK = 32  # values per scale
# e2m1 code (the nibble's low three bits) -> value; the nibble's high bit is the sign
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E8M0_BIAS = 127


def is_mxfp4_config(raw: dict[str, object]) -> bool:
    """Whether a config.json quantization_config describes MXFP4 experts (gpt-oss's released checkpoints)."""
    method = raw.get("quant_method")
    return isinstance(method, str) and method.lower() == MXFP4_METHOD


def _fp4_table(device: torch.device) -> torch.Tensor:
    """[16] float32: nibble -> value (codes 8-15 are 0-7 negated)."""
    positive = torch.tensor(_E2M1, dtype=torch.float32, device=device)
    return torch.cat([positive, -positive])


@torch.no_grad()
def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] in `dtype` on `device` (blocks' device when
    None). Computed one leading slice (expert) at a time in float32, so the transient memory is one expert's."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(
            f"MXFP4 blocks and scales are uint8; got {blocks.dtype} and {scales.dtype}: the files are not the "
            "MXFP4 layout config.json's quantization_config names"
        )
    if (
        blocks.dim() < 2
        or blocks.shape[-1] != MXFP4_BLOCK // 2
        or tuple(blocks.shape[:-1]) != tuple(scales.shape)
    ):
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair: blocks are "
            f"[..., G, {MXFP4_BLOCK // 2}] (two values per byte) and scales [..., G]"
        )
    device = blocks.device if device is None else device
    table = _fp4_table(device)
    *lead, groups, _ = blocks.shape
    out = torch.empty(*lead, groups * MXFP4_BLOCK, dtype=dtype, device=device)
    # one expert (the leading index) at a time; a 2-D pair is one slice
    slices = range(blocks.shape[0]) if blocks.dim() > 2 else [...]
    for i in slices:
        packed = blocks[i].to(device=device, dtype=torch.int64)  # [..., G, 16]
        # [..., G, 16, 2]: element 2j of a block is byte j's low nibble, element 2j + 1 its high nibble
        values = torch.stack([table[packed & 0x0F], table[packed >> 4]], dim=-1).flatten(-3)  # [..., G * 32]
        exponent = scales[i].to(device=device, dtype=torch.float32) - _E8M0_BIAS  # [..., G]
        values = values.unflatten(-1, (groups, MXFP4_BLOCK)) * torch.exp2(exponent).unsqueeze(-1)
        out[i] = values.flatten(-2).to(dtype)
    return out
