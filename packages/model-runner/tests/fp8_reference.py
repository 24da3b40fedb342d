"""Test helpers (no tests here): an HF model turned into the fp8 reference by patching its nn.Linear forwards.

Independent of treadle's fp8 code: each projection's weight is quantized here per output channel (scale = row
amax / 448, values rounded by torch's float8_e4m3fn cast), and each forward quantizes its input per token the same
way, multiplies the e4m3 values in fp32 and applies both scales, then adds the bias: what online fp8 (per-channel
weights, per-token activations) computes. The lm_head (and the embedding, not a Linear) keep their weights.
`k_chunks` > 1 on a projection quantizes its input per token in that many equal column blocks, each with its own
scale: a tensor-parallel row-parallel layer's ranks see only their block.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

E4M3_MAX = 448.0


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values as fp32, fp32 scales [..., 1]) of t's rows."""
    amax = t.float().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return q, scale


def _fp8_forward(module: nn.Linear, k_chunks: int, x: torch.Tensor) -> torch.Tensor:
    wq, w_scale = module.fp8_weight  # type: ignore[attr-defined]
    y = torch.zeros(*x.shape[:-1], wq.shape[0], dtype=torch.float32)
    for xc, wc in zip(x.chunk(k_chunks, dim=-1), wq.chunk(k_chunks, dim=-1), strict=True):
        xq, x_scale = quantize_rows(xc)
        y = y + (xq @ wc.t()) * x_scale * w_scale.view(-1)
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype)


def fp8_reference(hf_model: Any, row_parallel_chunks: int = 1) -> Any:
    """A copy of `hf_model` whose decoder projections compute online fp8; `row_parallel_chunks`: quantize the
    inputs of o_proj and down_proj per token in that many column blocks (tensor parallelism's ranks)."""
    model = copy.deepcopy(hf_model).eval()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        module.fp8_weight = quantize_rows(module.weight.detach())  # type: ignore[assignment]
        row_parallel = name.endswith(("o_proj", "down_proj"))
        chunks = row_parallel_chunks if row_parallel else 1
        module.forward = lambda x, m=module, c=chunks: _fp8_forward(m, c, x)  # type: ignore[method-assign]
    return model
