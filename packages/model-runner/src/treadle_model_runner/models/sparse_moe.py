"""Sparse mixture-of-experts decoders (Qwen3-MoE, Mixtral, Qwen2-MoE): Llama attention, and a routed MLP on MoE layers.

One decoder layer, pre-norm, like Llama except for the MLP:
    h   = x + o_proj(attn(rope(q), rope(k), v))
    out = h + moe(norm_post(h))         moe(y) = sum_{e in topk(softmax(gate(y)))} w_e * expert_e(y)
The routed part is `treadle_moe.FusedMoE` (router, expert kernel chosen by its oracle); the gate
`nn.Linear(hidden, num_experts)` stays here. Layers the config keeps dense (Qwen3-MoE `mlp_only_layers`,
`decoder_sparse_step`) use the plain `GatedMLP`.

Loading expert weights. Two HF layouts reach `load_weights`:
- per expert (what `save_pretrained` writes): `...experts.{e}.{gate|up|down}.weight`, with the projection
  names of the architecture (`gate_proj/up_proj/down_proj`, Mixtral `w1/w3/w2`), each copied into its
  expert's slice of `w13_weight` [E, 2N, K] (gate rows, then up rows) or `w2_weight` [E, K, N];
- fused (transformers' in-memory layout): `...experts.gate_up_proj` [E, 2N, K] and `...experts.down_proj`
  [E, K, N], copied whole.
Checkpoint module prefixes the architecture renames (Mixtral's `block_sparse_moe.` -> `mlp.`) are rewritten
first. Invariant: every expert's gate, up and down matrix is written before the model runs; otherwise
ValueError names the missing ones (e.g. `model.layers.3.mlp.experts.w13_weight[expert 5, up]`).

Tensor parallelism: each rank holds its slice of every expert's intermediate columns (`ParallelFusedMoE`: gate
and up rows, down columns; the router is replicated) and the ranks' outputs are summed, as in the dense MLP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from treadle_model_runner.layers.linear import checkpoint_shape, rank_part
from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.models.llama import LlamaModel
from treadle_model_runner.parallel import all_reduce, get_tp
from treadle_moe import FusedMoE

_SHARD_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}
_PER_EXPERT = re.compile(r"^(?P<moe>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")
_FUSED = re.compile(r"^(?P<moe>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")


class SparseMoeBlock(nn.Module):
    """gate: hidden -> router logits [T, E]; experts: FusedMoE over the top_k experts of each token."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = ParallelFusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.experts(x, self.gate(x)))


class ParallelFusedMoE(FusedMoE):
    """FusedMoE with this tensor-parallel rank's columns [rank * N / size, ...) of every expert's intermediate
    width N: rows of gate and of up in w13 [E, 2N/size, K], columns of w2 [E, K, N/size]. `full_shape` and
    `take_shard` let the loaders hand it one-rank tensors (as layers/linear.py's parallel layers)."""

    def __init__(
        self, num_experts: int, top_k: int, hidden: int, intermediate: int, renormalize: bool
    ) -> None:
        tp = get_tp()
        local = tp.shard(intermediate, "the experts' intermediate size")
        super().__init__(num_experts, top_k, hidden, local, renormalize=renormalize)
        self.rank, self.tp_size, self.full_intermediate = tp.rank, tp.size, intermediate

    def full_shape(self, name: str) -> tuple[int, ...]:
        e, k, n = self.num_experts, self.hidden_size, self.full_intermediate
        return (e, 2 * n, k) if name == "w13_weight" else (e, k, n)

    def take_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        n, start = self.intermediate_size, self.rank * self.intermediate_size
        if name == "w13_weight":
            gate, up = full.narrow(1, start, n), full.narrow(1, self.full_intermediate + start, n)
            return torch.cat([gate, up], dim=1)
        return full.narrow(2, start, n)

    def take_expert_shard(self, shard: str, tensor: torch.Tensor, hf_name: str) -> torch.Tensor:
        """This rank's part of one expert's checkpoint matrix (gate / up [N, K], down [K, N])."""
        if self.tp_size == 1:
            return tensor  # FusedMoE.weight_loader checks the shape
        k, n = self.hidden_size, self.full_intermediate
        full = (k, n) if shard == "w2" else (n, k)
        if tuple(tensor.shape) != full:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model expects {full}: "
                "the checkpoint does not match config.json"
            )
        dim = 1 if shard == "w2" else 0
        return tensor.narrow(dim, self.rank * self.intermediate_size, self.intermediate_size)


class MoeModel(LlamaModel):
    """The Llama decoder stack with `make_mlp(layer_idx)` giving each layer's MLP (routed or dense); `qkv_bias`
    None: config.attention_bias decides."""

    def __init__(
        self,
        config: Any,
        max_position: int,
        qk_norm: bool,
        make_mlp: Callable[[int], nn.Module],
        qkv_bias: bool | None = None,
    ) -> None:
        if qkv_bias is None:
            qkv_bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, max_position, qkv_bias, qk_norm, make_mlp)


class MoeCausalLM(CausalLM):
    """A CausalLM whose loader also understands expert tensors (both layouts, see the module docstring)."""

    supports_fp8: ClassVar[bool] = False  # the fused experts have no fp8 path

    # checkpoint projection name -> FusedMoE shard ("w1" gate, "w3" up, "w2" down)
    expert_proj_names: ClassVar[dict[str, str]] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    # (checkpoint fragment, model fragment) rewritten in every tensor name before matching
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    model: MoeModel

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], source: str = "the checkpoint"
    ) -> set[str]:
        """Expert tensors go to their FusedMoE; everything else through CausalLM.load_weights."""
        self._experts_loaded: set[tuple[str, int, str]] = set()  # (FusedMoE module name, expert, shard)
        loaded = super().load_weights(self._load_experts(weights), source)
        return loaded | {f"{name}[{expert}:{shard}]" for name, expert, shard in self._experts_loaded}

    def _load_experts(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Consume expert tensors (copying them into the FusedMoE layers), yield every other tensor."""
        modules = dict(self.named_modules())
        for hf_name, tensor in weights:
            name = hf_name
            for old, new in self.checkpoint_renames:
                name = name.replace(old, new)
            per_expert, fused = _PER_EXPERT.match(name), _FUSED.match(name)
            match = per_expert or fused
            moe = modules.get(match["moe"]) if match else None
            if not isinstance(moe, FusedMoE):
                yield name, tensor
                continue
            assert match is not None
            if per_expert is not None:
                shard = self.expert_proj_names.get(per_expert["proj"])
                if shard is None:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r}: expert projection {per_expert['proj']!r} is unknown to "
                        f"{type(self).__name__}; expected one of {', '.join(self.expert_proj_names)}"
                    )
                expert = int(per_expert["expert"])
                if isinstance(moe, ParallelFusedMoE):
                    tensor = moe.take_expert_shard(shard, tensor, hf_name)
                moe.weight_loader(
                    _param_of(moe, shard), tensor.to(moe.w13_weight.dtype), hf_name, shard, expert
                )
                self._experts_loaded.add((match["moe"], expert, shard))
            else:
                weight = tensor.to(moe.w13_weight.dtype)
                name = "w13_weight" if match["proj"] == "gate_up_proj" else "w2_weight"
                param = getattr(moe, name)
                full = checkpoint_shape(moe, name, param)
                if tuple(weight.shape) != full:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r} has shape {tuple(weight.shape)}, the model expects "
                        f"{full} ([experts, 2 * moe_intermediate, hidden] for gate_up_proj, "
                        "[experts, hidden, moe_intermediate] for down_proj): the checkpoint does not match "
                        "config.json"
                    )
                param.data.copy_(rank_part(moe, name, weight))
                shards = ("w1", "w3") if match["proj"] == "gate_up_proj" else ("w2",)
                self._experts_loaded.update(
                    (match["moe"], e, s) for e in range(moe.num_experts) for s in shards
                )

    def checkpoint_name(self, name: str) -> str:
        name = super().checkpoint_name(name)
        for old, new in self.checkpoint_renames:  # back to the checkpoint's spelling
            name = name.replace(new, old)
        return name

    def _check_complete(self, loaded: set[str], source: str = "the checkpoint") -> None:
        """Every expert matrix of every FusedMoE must be loaded; then the dense parameters (CausalLM's check)."""
        missing: list[str] = []
        for module_name, module in self.named_modules():
            if not isinstance(module, FusedMoE):
                continue
            for shard in ("w1", "w3", "w2"):
                absent = [
                    e
                    for e in range(module.num_experts)
                    if (module_name, e, shard) not in self._experts_loaded
                ]
                param = "w2_weight" if shard == "w2" else "w13_weight"
                missing += [f"{module_name}.{param}[expert {e}, {_SHARD_NAMES[shard]}]" for e in absent]
            loaded = loaded | {f"{module_name}.w13_weight", f"{module_name}.w2_weight"}
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(
                f"{source} is missing {len(missing)} expert matrices for {type(self).__name__}: {shown}"
            )
        super()._check_complete(loaded, source)


def _param_of(moe: FusedMoE, shard: str) -> nn.Parameter:
    return moe.w2_weight if shard == "w2" else moe.w13_weight
