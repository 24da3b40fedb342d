"""Gated MLP: down(act(gate(x)) * up(x)), with gate and up stacked into one matmul at load time.

The activation-and-multiply runs fused into down_proj as one IR op on the stacked [.., 2 * intermediate] output:
`ops.silu_and_mul_linear` (Llama, Qwen, Mistral) or `ops.gelu_tanh_and_mul_linear` (Gemma's gelu_pytorch_tanh).
`forward_add_norm` also fuses the block's residual add and RMSNorm into gate_up_proj.
Under tensor parallelism each rank holds its slice of the intermediate columns (gate_up column-parallel,
down row-parallel): the ranks' down outputs are summed (`parallel.all_reduce`).
"""

from __future__ import annotations

import torch
from torch import nn

from treadle_ir import ops
from treadle_model_runner.layers.linear import RowParallelLinear, StackedLinear
from treadle_model_runner.layers.norm import RMSNorm
from treadle_model_runner.parallel import all_reduce

_ACTIVATIONS = {
    "silu": "silu_and_mul_linear",
    "gelu_pytorch_tanh": "gelu_tanh_and_mul_linear",
    "gelu_tanh": "gelu_tanh_and_mul_linear",
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
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias, parallel=True
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_and_mul_linear = getattr(ops, _ACTIVATIONS[activation])
        self.act_and_mul = getattr(ops, _ACTIVATIONS[activation].removesuffix("_linear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def forward_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp(norm(x + residual)), x + residual)``: the add and norm run fused into gate_up_proj."""
        gate_up, residual = norm.add_norm_linear(x, residual, self.gate_up_proj)
        return self.down(gate_up), residual

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.down_partial(gate_up))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``mlp(x)`` before the sum over the ranks (a caller adding it to another partial sum
        all-reduces once)."""
        return self.down_partial(self.gate_up_proj(x))

    def down_partial(self, gate_up: torch.Tensor) -> torch.Tensor:
        # an adapter in the step needs down_proj's input rows, and fp8 quantizes them: unfused then
        if not self.down_proj.fusable:
            return self.down_proj.partial(self.act_and_mul(gate_up))
        return self.act_and_mul_linear(gate_up, self.down_proj.weight, self.down_proj.bias)
