"""Linear layers that dispatch through the IR (`ops.linear`), and stacked ones: several HF projections fused
into one matmul at load time.

`Linear` is `nn.Linear` whose forward is `ops.linear`: on GPU a decode step's few rows take Triton's weight-streaming
kernel, more rows cuBLAS. Norms and activations before a projection can fuse into it (`RMSNorm.add_norm_linear`,
`GatedMLP`), which is why the projections hold plain weights, never a wrapped kernel.

`StackedLinear(in, {"q": nq, "k": nk, "v": nv})` holds one [nq + nk + nv, in] weight; loading the HF tensor of
shard "k" writes rows [nq, nq + nk). The forward is a single `ops.linear`; callers split the output by
`shard_sizes`. Invariant: every shard is loaded exactly once before use (the model's loader checks coverage).
"""

from __future__ import annotations

import torch
from torch import nn

from treadle_ir import ops


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class StackedLinear(Linear):
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
