"""Shared experts: a dense gated MLP every token goes through, added to the routed experts' output.

DeepSeek-V2/V3 and Qwen2-MoE have one (or several merged into one wider MLP); Qwen2-MoE also scales it by a
per-token gate `sigmoid(x @ shared_expert_gate)`. Weights are stored merged like the routed experts:
gate_up [2I, K] (gate rows first, then up rows) and down [K, I]. The modular kernel adds the result to the
routed output; running it on a side stream to overlap with the routed experts is left for later.
"""

from __future__ import annotations

import torch
from torch import nn

from treadle_moe.activation import act_and_mul, check_activation

_SHARDS = ("gate_proj", "up_proj", "down_proj", "gate")


class SharedExperts(nn.Module):
    """y = [sigmoid(x @ gate.T) *] down(act(gate_proj x) * up_proj x); x [T, K] -> [T, K]."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        use_gate: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.gate_up_proj = nn.Parameter(
            torch.empty(2 * intermediate_size, hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(hidden_size, intermediate_size, dtype=dtype, device=device), requires_grad=False
        )
        self.gate: nn.Parameter | None = None
        if use_gate:
            self.gate = nn.Parameter(
                torch.empty(1, hidden_size, dtype=dtype, device=device), requires_grad=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = act_and_mul(x @ self.gate_up_proj.t(), self.activation) @ self.down_proj.t()
        if self.gate is not None:
            y = y * torch.sigmoid(x @ self.gate.t())
        return y

    def load_weight(self, shard: str, weight: torch.Tensor) -> None:
        """Copy a checkpoint tensor: shard "gate_proj" / "up_proj" [I, K], "down_proj" [K, I], "gate" [1, K]."""
        inter = self.intermediate_size
        if shard == "gate_proj":
            target = self.gate_up_proj.data[:inter]
        elif shard == "up_proj":
            target = self.gate_up_proj.data[inter:]
        elif shard == "down_proj":
            target = self.down_proj.data
        elif shard == "gate" and self.gate is not None:
            target = self.gate.data
        else:
            raise ValueError(
                f"shard {shard!r} is unknown for this SharedExperts; valid: {', '.join(_SHARDS)}"
            )
        if tuple(weight.shape) != tuple(target.shape):
            raise ValueError(
                f"shared expert {shard} has shape {tuple(weight.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(weight)
