"""Test helpers (no tests here): an HF mixture-of-experts model as a per-tensor / per-channel fp8 checkpoint one
matrix per expert, with static activation scales for the experts too (Mixtral-8x7B-Instruct-FP8 style), with torch's
own e4m3 cast (independent of treadle's code).

`moe_fp8_tensors(hf, fmt)` starts from fp8_checkpoints.fp8_tensors (the dense projections, with their calibrated
input scales when `fmt.static`), then writes each expert's gate, up and down matrix quantized per tensor or per
output row (fp8_block_checkpoints.expert_tensors), its weight scale spelled as the format does (quant_method fp8: a
0-d scalar; compressed-tensors: [1] per tensor, [n, 1] per channel), and when static one `input_scale` per expert
matrix, spelled likewise: calibrated on the experts module's inputs over the calibration prompts (every token, for
each expert: amax / 448 of the input, and of act(gate) * up for the down matrix), each expert's scales then raised
by 5 % per expert index, so they differ across experts (an engine takes their maximum per layer). `saturate` < 1
multiplies every expert input scale by it: activations beyond 448 * scale then saturate.
"""

from __future__ import annotations

from typing import Any

import torch
from fp8_block_checkpoints import EXPERT_NAMES, expert_tensors
from fp8_checkpoints import CALIBRATION, E4M3_MAX, Fp8Format, _quantize, fp8_tensors
from torch import nn


def _experts_inputs(hf: nn.Module) -> dict[str, torch.Tensor]:
    """Every experts module's input hidden states over the calibration prompts, by module name."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in hf.named_modules():
        if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
            record = lambda m, args, n=name: seen.setdefault(n, []).append(args[0].detach().float())  # noqa: E731
            handles.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        for prompt in CALIBRATION:
            hf(torch.tensor([prompt]))
    for h in handles:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for n, xs in seen.items()}


def moe_fp8_tensors(hf: Any, fmt: Fp8Format, saturate: float = 1.0) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by HF name (module docstring)."""
    inputs = _experts_inputs(hf) if fmt.static else {}
    tensors = fp8_tensors(hf, fmt)
    per_channel = fmt.weights == "channel"
    expert_tensors(hf, tensors, lambda w: _quantize(w, per_channel), "weight_scale")
    names, block_name = EXPERT_NAMES.get(type(hf).__name__, (("gate_proj", "up_proj", "down_proj"), "mlp"))

    def spelled(t: torch.Tensor) -> torch.Tensor:
        if fmt.method == "fp8":
            return t.float().reshape(()).clone()
        return t.float().reshape(1 if t.numel() == 1 else (-1, 1)).clone()

    for name, module in hf.named_modules():
        if not isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
            continue
        prefix = name.replace(".mlp.", f".{block_name}.")
        for e in range(module.gate_up_proj.shape[0]):
            for proj in names:
                scale_name = f"{prefix}.{e}.{proj}.weight_scale"
                tensors[scale_name] = spelled(tensors[scale_name])
            if not fmt.static:
                continue
            x = inputs[name]
            n = module.down_proj.shape[2]
            h = x @ module.gate_up_proj[e].detach().float().t()
            inter = module.act_fn(h[:, :n]) * h[:, n:]
            skew = (1 + 0.05 * e) * saturate
            for proj, amax in zip(names, (x.abs().amax(), x.abs().amax(), inter.abs().amax()), strict=True):
                tensors[f"{prefix}.{e}.{proj}.input_scale"] = spelled(amax / E4M3_MAX * skew)
    return tensors
