"""Test helpers (no tests here): HF mixture-of-experts models whose routed experts compute fp8, independent of
treadle's code (torch's own e4m3 cast), beside the dense projections' references of fp8_reference.py and
fp8_block_checkpoints.py.

transformers holds a layer's experts as one module (`experts.gate_up_proj` [E, 2N, K], `experts.down_proj`
[E, K, N]) whose forward(hidden, top_k_index, top_k_weights) loops over the experts; its forward is replaced by the
same loop where each of an expert's three matrices is an fp8 projection: the gate and up projections of its tokens,
act(gate) * up in the activation dtype, then the down projection, weighted by the routing weight and summed.
- `moe_block_reference(hf, tensors, block)`: the block-wise checkpoint `tensors` (fp8_block_checkpoints.block_tensors):
  each matrix dequantized from the files (value * its tile's scale), its input quantized per token in groups of
  block_k; the dense projections as `block_reference`;
- `moe_channel_reference(hf)`: online fp8: each matrix quantized per output row here, its input per token; the dense
  projections as `fp8_reference`. With `tensors` (a per-channel or per-tensor fp8 checkpoint with dynamic
  activations, fp8_checkpoints.fp8_tensors): each matrix is the files' fp8 values and scales (one per tensor: the
  same for every row), the dense projections as `fp8_checkpoint_reference`. With the experts' `input_scale`s there
  (static activations): every expert's gate and up input quantized with the largest of the layer's gate and up
  input scales, every down input with the largest of its down ones (one scale per layer and GEMM), saturating.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from fp8_block_checkpoints import EXPERT_NAMES, block_reference, dequantize_blocks, quantize_groups
from fp8_reference import fp8_checkpoint_reference, fp8_reference, quantize_rows, quantize_static
from torch import nn

Project = Callable[[int, int, torch.Tensor], torch.Tensor]  # (expert, 0 gate / 1 up / 2 down, x) -> x's dtype


def _experts_forward(module: nn.Module, project: Project, x: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    out = torch.zeros_like(x)
    for e in range(module.gate_up_proj.shape[0]):  # type: ignore[union-attr]
        token, pos = torch.where(ids == e)
        if token.numel() == 0:
            continue
        h = x[token]
        inter = (module.act_fn(project(e, 0, h)) * project(e, 1, h)).to(x.dtype)  # type: ignore[operator]
        y = project(e, 2, inter)
        out.index_add_(0, token, (y * weights[token, pos, None]).to(x.dtype))
    return out


def _patch(model: nn.Module, make_project: Callable[[str, nn.Module], Project]) -> nn.Module:
    for name, module in model.named_modules():
        if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
            project = make_project(name, module)
            module.forward = lambda x, ids, w, m=module, p=project: _experts_forward(m, p, x, ids, w)  # type: ignore[method-assign]
    return model


def moe_block_reference(hf: Any, tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> Any:
    """The block-wise checkpoint `tensors`' model (module docstring)."""
    names, block_name = EXPERT_NAMES.get(type(hf).__name__, (("gate_proj", "up_proj", "down_proj"), "mlp"))

    def make_project(name: str, module: nn.Module) -> Project:
        prefix = name.replace(".mlp.", f".{block_name}.")
        scale = next(
            s for s in ("weight_scale_inv", "weight_scale") if f"{prefix}.0.{names[0]}.{s}" in tensors
        )
        deq = {(e, i): dequantize_blocks(tensors[f"{prefix}.{e}.{p}.weight"], tensors[f"{prefix}.{e}.{p}.{scale}"],
                                         *block)
               for e in range(module.gate_up_proj.shape[0]) for i, p in enumerate(names)}  # fmt: skip
        return lambda e, i, x: F.linear(quantize_groups(x, block[1]), deq[e, i]).to(x.dtype)

    return _patch(block_reference(hf, tensors, block, True), make_project)


def moe_channel_reference(hf: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """Online fp8 of `hf`, experts included, or the per-channel / per-tensor checkpoint `tensors` (module docstring)."""
    names, block_name = EXPERT_NAMES.get(type(hf).__name__, (("gate_proj", "up_proj", "down_proj"), "mlp"))

    def make_project(name: str, module: nn.Module) -> Project:
        n = module.down_proj.shape[2]  # type: ignore[union-attr]
        files = f"{name.replace('.mlp.', f'.{block_name}.')}."
        static = {  # gate and up (0, 1) share one input scale, down (2) has its own
            i: max(float(t) for f, t in (tensors or {}).items()
                   if f.startswith(files) and f.endswith(tuple(f".{p}.input_scale" for p in projs)))
            for i, projs in ((0, names[:2]), (1, names[:2]), (2, names[2:]))
        } if tensors is not None and f"{files}0.{names[0]}.input_scale" in tensors else {}  # fmt: skip
        quantized = {}
        for e in range(module.gate_up_proj.shape[0]):  # type: ignore[union-attr]
            gate_up, down = module.gate_up_proj[e].detach(), module.down_proj[e].detach()  # type: ignore[index]
            for i, w in enumerate((gate_up[:n], gate_up[n:], down)):
                if tensors is None:
                    quantized[e, i] = quantize_rows(w)
                    continue
                file = f"{name.replace('.mlp.', f'.{block_name}.')}.{e}.{names[i]}"
                scale = tensors[f"{file}.weight_scale"].float().reshape(-1)
                quantized[e, i] = (tensors[f"{file}.weight"].float(), scale.expand(w.shape[0]).reshape(-1, 1))

        def project(e: int, i: int, x: torch.Tensor) -> torch.Tensor:
            wq, w_scale = quantized[e, i]
            given = static.get(i)
            xq, x_scale = quantize_rows(x) if given is None else quantize_static(x, torch.tensor([given]))
            return ((xq @ wq.t()) * x_scale * w_scale.view(-1)).to(x.dtype)

        return project

    dense = fp8_reference(hf) if tensors is None else fp8_checkpoint_reference(hf, tensors)
    return _patch(dense, make_project)
