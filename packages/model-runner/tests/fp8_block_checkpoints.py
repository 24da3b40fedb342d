"""Test helpers (no tests here): block-wise fp8 checkpoints written from an HF model, and the references they are
compared with, all with torch's own e4m3 cast (independent of treadle's code).

`write_block_checkpoint(hf, path, fmt)` quantizes every decoder projection (not `fmt.ignore`d) block-wise: each
[block_n, block_k] tile of the weight (the last ones ragged when the block does not divide the shape) gets scale
tile amax / 448 and values cast(tile / scale). Spellings (fp8_checkpoints.write_checkpoint writes the files):
- "fp8" (DeepSeek-V3 / Qwen3-FP8 / transformers' FineGrainedFP8): quant_method "fp8", fmt "e4m3", activation_scheme
  "dynamic", weight_block_size [block_n, block_k], modules_to_not_convert; scales `<proj>.weight_scale_inv`;
- "compressed-tensors" (llm-compressor's FP8_BLOCK): one config group targeting "Linear", weights strategy "block"
  with block_structure, input_activations dynamic strategy "group" with group_size block_k, ignore; scales
  `<proj>.weight_scale`.

Mixture-of-experts models (transformers holds their experts fused, `experts.gate_up_proj` [E, 2N, K] and
`experts.down_proj` [E, K, N]) are written as their FP8 checkpoints are, one matrix per expert: each expert's gate,
up and down matrix quantized block-wise on its own (`mlp.experts.{e}.gate_proj.weight` + scale, Mixtral
`block_sparse_moe.experts.{e}.w1.weight`); the router (`mlp.gate`, not a projection) stays unquantized.

`block_reference(hf, tensors, block_k, quantize_activations)`: a copy of `hf` whose projections that have scales in
the checkpoint `tensors` compute with the dequantized weights (value * its tile's scale, in fp32); with
`quantize_activations` each input row is also quantized in groups of block_k (scale group amax / 448, as the
checkpoints' own GEMM does) before the matmul, else the input is used as it is (plain HF on dequantized weights).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fp8_checkpoints import E4M3_MAX, PROJECTIONS, write_checkpoint
from torch import nn


@dataclass(frozen=True)
class BlockFormat:
    method: str  # "fp8" or "compressed-tensors"
    block: tuple[int, int]  # (block_n, block_k)
    ignore: tuple[str, ...] = ()  # projections left unquantized, as config.json names them
    num_shards: int = 1  # safetensors files

    @property
    def scale_name(self) -> str:
        return "weight_scale_inv" if self.method == "fp8" else "weight_scale"


def _is_ignored(name: str, fmt: BlockFormat) -> bool:
    if fmt.method == "fp8":  # transformers' modules_to_not_convert: dotted components anywhere in the name
        return any(re.search(rf"(^|\.){re.escape(p)}($|\.)", name) for p in fmt.ignore)
    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in fmt.ignore)


def quantize_blocks(weight: torch.Tensor, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [n, k], fp32 scales [ceil(n / block_n), ceil(k / block_k)]), one tile at a time."""
    w = weight.detach().float()
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    scales = torch.empty(-(-n // block_n), -(-k // block_k))
    for i, r in enumerate(range(0, n, block_n)):
        for j, c in enumerate(range(0, k, block_k)):
            tile = w[r : r + block_n, c : c + block_k]
            amax = float(tile.abs().max())
            scales[i, j] = amax / E4M3_MAX if amax > 0 else 1.0
            q[r : r + block_n, c : c + block_k] = (tile / scales[i, j]).clamp(-E4M3_MAX, E4M3_MAX).to(q.dtype)
    return q, scales


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    n, k = q.shape
    full = scales.repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return q.float() * full


def quantization_config(fmt: BlockFormat) -> dict[str, Any]:
    block_n, block_k = fmt.block
    if fmt.method == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [block_n, block_k], "modules_to_not_convert": ["lm_head", *fmt.ignore]}  # fmt: skip
    args = {"num_bits": 8, "type": "float", "symmetric": True, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}  # fmt: skip
    weights = {
        **args,
        "strategy": "block",
        "dynamic": False,
        "group_size": None,
        "block_structure": [block_n, block_k],
    }
    acts = {**args, "strategy": "group", "dynamic": True, "group_size": block_k, "block_structure": None}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head", *fmt.ignore], "kv_cache_scheme": None,
            "sparsity_config": {}}  # fmt: skip


# architecture -> (expert projection names gate, up, down; the MoE block's name in its checkpoints)
EXPERT_NAMES = {"MixtralForCausalLM": (("w1", "w3", "w2"), "block_sparse_moe")}


def expert_tensors(
    hf: nn.Module,
    tensors: dict[str, torch.Tensor],
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    scale_name: str,
) -> None:
    """Replace every fused expert stack in `tensors` by per-expert matrices quantized by `quantize` (weight ->
    (fp8, scale)), the scales named `scale_name` (module docstring)."""
    names, block_name = EXPERT_NAMES.get(type(hf).__name__, (("gate_proj", "up_proj", "down_proj"), "mlp"))
    for fused in [n for n in tensors if n.endswith(".experts.gate_up_proj")]:
        prefix = fused.removesuffix(".gate_up_proj")
        gate_up, down = tensors.pop(fused).float(), tensors.pop(f"{prefix}.down_proj").float()
        n = down.shape[2]
        out = prefix.replace(".mlp.", f".{block_name}.")
        for e in range(gate_up.shape[0]):
            for proj, w in zip(names, (gate_up[e, :n], gate_up[e, n:], down[e]), strict=True):
                q, scales = quantize(w)
                tensors[f"{out}.{e}.{proj}.weight"] = q
                tensors[f"{out}.{e}.{proj}.{scale_name}"] = scales
    for name in [
        n for n in tensors if n.endswith(".mlp.gate.weight")
    ]:  # the router, in the checkpoint's block
        tensors[name.replace(".mlp.", f".{block_name}.")] = tensors.pop(name)


def block_tensors(hf: nn.Module, fmt: BlockFormat) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by HF name."""
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    tensors = {n: t.detach().clone().contiguous() for n, t in hf.state_dict().items()
               if not (tied and n == "lm_head.weight")}  # fmt: skip
    for name, module in hf.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(PROJECTIONS) and not _is_ignored(name, fmt):
            q, scales = quantize_blocks(module.weight, *fmt.block)
            tensors[f"{name}.weight"] = q
            tensors[f"{name}.{fmt.scale_name}"] = scales
    expert_tensors(hf, tensors, lambda w: quantize_blocks(w, *fmt.block), fmt.scale_name)
    return tensors


def write_block_checkpoint(hf: nn.Module, path: Path, fmt: BlockFormat) -> dict[str, torch.Tensor]:
    tensors = block_tensors(hf, fmt)
    write_checkpoint(hf, path, tensors, quantization_config(fmt), fmt.num_shards)
    return tensors


def quantize_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., k] with each group of `group` consecutive values replaced by its e4m3 round trip (fp32)."""
    k = x.shape[-1]
    parts = []
    for start in range(0, k, group):
        part = x[..., start : start + group].float()
        amax = part.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        q = (part * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        parts.append(q.float() * scale)
    return torch.cat(parts, dim=-1)


def _forward(module: nn.Linear, block_k: int | None, x: torch.Tensor) -> torch.Tensor:
    inputs = quantize_groups(x, block_k) if block_k is not None else x.float()
    return F.linear(inputs, module.dequantized, None if module.bias is None else module.bias.float()).to(
        x.dtype
    )  # type: ignore[arg-type]


def block_reference(
    hf: Any, tensors: dict[str, torch.Tensor], block: tuple[int, int], quantize_activations: bool
) -> Any:
    """The reference model (module docstring) of the block-wise checkpoint `tensors` with blocks `block`."""
    model = copy.deepcopy(hf).eval()
    for name, module in model.named_modules():
        scale = tensors.get(f"{name}.weight_scale_inv", tensors.get(f"{name}.weight_scale"))
        if not isinstance(module, nn.Linear) or scale is None:
            continue
        module.dequantized = dequantize_blocks(tensors[f"{name}.weight"], scale, *block)  # type: ignore[assignment]
        group = block[1] if quantize_activations else None
        module.forward = lambda x, m=module, g=group: _forward(m, g, x)  # type: ignore[method-assign]
    return model
