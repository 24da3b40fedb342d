"""Gated MLP: down(act(gate(x)) * up(x)), with gate and up stacked into one matmul at load time.

The activation-and-multiply is one IR op on the stacked [.., 2 * intermediate] output: `ops.silu_and_mul`
(Llama, Qwen, Mistral) or `ops.gelu_tanh_and_mul` (Gemma's gelu_pytorch_tanh).
"""

from __future__ import annotations

import torch
from torch import nn

from treadle_ir import ops
from treadle_model_runner.layers.linear import StackedLinear

_ACTIVATIONS = {
    "silu": "silu_and_mul",
    "gelu_pytorch_tanh": "gelu_tanh_and_mul",
    "gelu_tanh": "gelu_tanh_and_mul",
}


class GatedMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"hidden activation {activation!r} is not supported; supported: {', '.join(_ACTIVATIONS)}"
            )
        self.gate_up_proj = StackedLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_and_mul = getattr(ops, _ACTIVATIONS[activation])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))
