"""Stacked linear layers: several HF projections fused into one matmul at load time.

`StackedLinear(in, {"q": nq, "k": nk, "v": nv})` holds one [nq + nk + nv, in] weight; loading the HF tensor of
shard "k" writes rows [nq, nq + nk). The forward is a single `F.linear`; callers split the output by
`shard_sizes`. Invariant: every shard is loaded exactly once before use (the model's loader checks coverage).
"""

from __future__ import annotations

import torch
from torch import nn


class StackedLinear(nn.Linear):
    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    def load_shard(self, param: nn.Parameter, shard: str, loaded: torch.Tensor) -> None:
        """Copy one HF projection's weight or bias into its rows of the stacked parameter."""
        size = self.shard_sizes[shard]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shard {shard!r} has shape {tuple(loaded.shape)}, expected ({size}, ...{tuple(param.shape[1:])}): "
                "the checkpoint does not match the model config"
            )
        start = self.shard_offsets[shard]
        with torch.no_grad():
            param.data[start : start + size].copy_(loaded)
