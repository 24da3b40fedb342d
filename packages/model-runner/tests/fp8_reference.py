"""Test helpers (no tests here): an HF model turned into the fp8 reference by patching its nn.Linear forwards.

Independent of treadle's fp8 code: each projection's weight is quantized here per output channel (scale = row
amax / 448, values rounded by torch's float8_e4m3fn cast), and each forward quantizes its input per token the same
way, multiplies the e4m3 values in fp32 and applies both scales, then adds the bias: what online fp8 (per-channel
weights, per-token activations) computes. The lm_head (and the embedding, not a Linear) keep their weights.
`k_chunks` > 1 on a projection quantizes its input per token in that many equal column blocks, each with its own
scale: a tensor-parallel row-parallel layer's ranks see only their block.

`fp8_checkpoint_reference` is the same patching with an fp8 checkpoint's tensors (read from its files by the test):
each projection that has a `weight_scale` there takes the file's e4m3 weight and scale (one per tensor: the same
for every row) and, with `input_scale`s (static activations), quantizes its input with one scale: the largest of
the scales of the projections reading that same input (q/k/v, gate/up), as an engine that fuses them must.
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
    q = (t.float() * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return q, scale


def quantize_static(t: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values as fp32, the scale) of t quantized with one given scale, saturating at +-448."""
    return (t.float() * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(
        torch.float8_e4m3fn
    ).float(), scale


def _fp8_forward(module: nn.Linear, k_chunks: int, x: torch.Tensor) -> torch.Tensor:
    wq, w_scale = module.fp8_weight  # type: ignore[attr-defined]
    input_scale = getattr(module, "fp8_input_scale", None)
    y = torch.zeros(*x.shape[:-1], wq.shape[0], dtype=torch.float32, device=x.device)
    for xc, wc in zip(x.chunk(k_chunks, dim=-1), wq.chunk(k_chunks, dim=-1), strict=True):
        xq, x_scale = quantize_rows(xc) if input_scale is None else quantize_static(xc, input_scale)
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


_SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


def _input_group(name: str) -> str:
    """Projections reading the same input share a group name (q/k/v of one layer; gate/up of one layer)."""
    prefix, _, leaf = name.rpartition(".")
    return f"{prefix}.{_SHARED_INPUT.get(leaf, leaf)}"


def fp8_checkpoint_reference(
    hf_model: Any, tensors: dict[str, torch.Tensor], row_parallel_chunks: int = 1
) -> Any:
    """A copy of `hf_model` whose projections compute what the fp8 checkpoint `tensors` (every tensor of its files,
    by HF name) holds; projections without a `weight_scale` there (ignored ones, the lm_head) keep their weights.
    `row_parallel_chunks`: dynamic inputs of o_proj and down_proj quantized per token in that many column blocks."""
    model = copy.deepcopy(hf_model).eval()
    group_scale: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".input_scale"):
            group = _input_group(name.removesuffix(".input_scale"))
            group_scale[group] = torch.maximum(
                group_scale.get(group, t.float().reshape(())), t.float().reshape(())
            )
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or f"{name}.weight_scale" not in tensors:
            continue
        wq = tensors[f"{name}.weight"].float()
        scale = tensors[f"{name}.weight_scale"].float().reshape(-1)
        module.fp8_weight = (wq, scale.expand(wq.shape[0]))  # type: ignore[assignment]
        if f"{name}.input_scale" in tensors:
            module.fp8_input_scale = group_scale[_input_group(name)]  # type: ignore[assignment]
        row_parallel = name.endswith(("o_proj", "down_proj"))
        chunks = row_parallel_chunks if row_parallel else 1
        module.forward = lambda x, m=module, c=chunks: _fp8_forward(m, c, x)  # type: ignore[method-assign]
    return model
