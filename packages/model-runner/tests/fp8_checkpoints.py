"""Test helpers (no tests here): write an HF model as a pre-quantized fp8 checkpoint, the way the tools users download
from do, with torch's own e4m3 cast (independent of treadle's code).

`write_fp8_checkpoint(hf, path, fmt)` quantizes every decoder projection (not `fmt.ignore`d; never the lm_head):
weights per output channel or per tensor (scale = amax / 448, values = the cast of weight / scale), and for static
activations calibrates one input scale per projection (amax of its input over `CALIBRATION` tokens / 448; k_proj's
and up_proj's are then raised by a quarter, so the scales of projections sharing an input differ). It writes
config.json (the HF config plus the format's `quantization_config`) and safetensors files (`fmt.num_shards` of
them, with an index when more than one). Spellings:
- compressed-tensors: quant_method "compressed-tensors", format "float-quantized", one config group targeting
  "Linear", ignore ["lm_head", ...]; `weight_scale` [n, 1] (channel) or [1] (tensor), `input_scale` [1];
- fp8: quant_method "fp8", activation_scheme, ignored_layers; `weight_scale` and `input_scale` scalars ([]).
With `fmt.kv_cache_scales`, each attention layer also carries `self_attn.k_scale` / `v_scale` and config.json a
kv_cache_scheme.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

E4M3_MAX = 448.0
CALIBRATION = [[3, 17, 40, 99, 12, 7, 120, 61, 5, 33, 28, 110], [90, 4, 4, 72, 13, 101, 8]]  # ids < 129
# qkv_proj, gate_up_proj: Phi-3's projections, stacked in its checkpoints
PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
    # DeepSeek's multi-head latent attention
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
)


@dataclass(frozen=True)
class Fp8Format:
    method: str  # "compressed-tensors" or "fp8"
    weights: str  # "channel" or "tensor"
    static: bool  # static per-tensor input scales (else dynamic per token)
    num_shards: int = 1  # safetensors files
    ignore: tuple[
        str, ...
    ] = ()  # projections left unquantized (names or "re:" patterns, as config.json spells)
    kv_cache_scales: bool = False  # k_scale / v_scale tensors and a kv_cache_scheme


FORMATS = {
    "ct-channel-dynamic": Fp8Format("compressed-tensors", "channel", static=False, num_shards=2),
    "ct-channel-static": Fp8Format("compressed-tensors", "channel", static=True),
    "ct-tensor-static": Fp8Format(
        "compressed-tensors",
        "tensor",
        static=True,
        kv_cache_scales=True,
        ignore=(r"re:.*layers\.1\.mlp\.down_proj$",),
    ),
    "fp8-dynamic": Fp8Format("fp8", "tensor", static=False),
    "fp8-static": Fp8Format("fp8", "tensor", static=True, num_shards=2),
}


def _is_ignored(name: str, fmt: Fp8Format) -> bool:
    import re

    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in fmt.ignore)


def _quantize(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _calibrate(hf: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """amax / 448 of each named projection's input over the calibration prompts (k_proj, up_proj: x 1.25)."""
    amax: dict[str, torch.Tensor] = {}
    modules = dict(hf.named_modules())

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen = args[0].detach().float().abs().amax()
            amax[name] = torch.maximum(amax.get(name, seen), seen)

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for prompt in CALIBRATION:
            hf(torch.tensor([prompt]))
    for h in handles:
        h.remove()
    skew = {n: 1.25 if n.endswith(("k_proj", "up_proj")) else 1.0 for n in names}
    return {n: (amax[n] / E4M3_MAX * skew[n]).reshape(1) for n in names}


def quantization_config(fmt: Fp8Format) -> dict[str, Any]:
    if fmt.method == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "static" if fmt.static else "dynamic",
                "ignored_layers": ["lm_head", *fmt.ignore]}  # fmt: skip
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
            "actorder": None, "observer": "minmax", "observer_kwargs": {}}  # fmt: skip
    activations = {**args, "strategy": "tensor" if fmt.static else "token", "dynamic": not fmt.static}
    group = {"targets": ["Linear"], "weights": {**args, "strategy": fmt.weights, "dynamic": False},
             "input_activations": activations, "output_activations": None}  # fmt: skip
    kv = {**args, "strategy": "tensor", "dynamic": False} if fmt.kv_cache_scales else None
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head", *fmt.ignore], "kv_cache_scheme": kv,
            "global_compression_ratio": None, "sparsity_config": {}}  # fmt: skip


def fp8_tensors(hf: nn.Module, fmt: Fp8Format) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by HF name."""
    names = [n for n, m in hf.named_modules()
             if isinstance(m, nn.Linear) and n.endswith(PROJECTIONS) and not _is_ignored(n, fmt)]  # fmt: skip
    input_scales = _calibrate(hf, names) if fmt.static else {}
    scalar = fmt.method == "fp8"  # AutoFP8 / vLLM's fp8 format stores its scales as 0-d tensors
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    for name, t in hf.state_dict().items():
        if not (tied and name == "lm_head.weight"):
            tensors[name] = t.detach().clone().contiguous()
    modules = dict(hf.named_modules())
    for name in names:
        q, scale = _quantize(modules[name].weight, per_channel=fmt.weights == "channel")
        tensors[f"{name}.weight"] = q
        shape = () if scalar else (-1, 1) if fmt.weights == "channel" else (1,)
        tensors[f"{name}.weight_scale"] = scale.reshape(shape).clone()
        if fmt.static:
            s = input_scales[name]
            tensors[f"{name}.input_scale"] = s.reshape(()) if scalar else s.clone()
    if fmt.kv_cache_scales:
        for i in range(hf.config.num_hidden_layers):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.05)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.04)
    return tensors


def write_checkpoint(
    hf: nn.Module, path: Path, tensors: dict[str, torch.Tensor], quant: dict[str, Any], num_shards: int = 1
) -> None:
    """config.json (hf's config plus `quant`) and `tensors` in `num_shards` safetensors files (+ index)."""
    path.mkdir(parents=True, exist_ok=True)
    hf.config.architectures = [type(hf).__name__]
    hf.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=1))
    names = sorted(tensors)
    if num_shards == 1:
        save_file({n: tensors[n] for n in names}, str(path / "model.safetensors"))
        return
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[i::num_shards]
        save_file({n: tensors[n] for n in part}, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}  # fmt: skip
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def write_fp8_checkpoint(hf: nn.Module, path: Path, fmt: Fp8Format) -> dict[str, torch.Tensor]:
    tensors = fp8_tensors(hf, fmt)
    write_checkpoint(hf, path, tensors, quantization_config(fmt), fmt.num_shards)
    return tensors


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `path`, by name."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors
