"""Sparse mixture-of-experts decoders (Qwen3-MoE, Mixtral, Qwen2-MoE): Llama attention, and a routed MLP on MoE layers.

One decoder layer, pre-norm, like Llama except for the MLP:
    h   = x + o_proj(attn(rope(q), rope(k), v))
    out = h + moe(norm_post(h))         moe(y) = sum_{e in topk(softmax(gate(y)))} w_e * expert_e(y)
The routed part is `treadle_moe.FusedMoE` (router, expert kernel chosen by its oracle); the gate
`nn.Linear(hidden, num_experts)` stays here. Layers the config keeps dense (Qwen3-MoE `mlp_only_layers`,
`decoder_sparse_step`) use the plain `GatedMLP`.

Loading: expert tensors (per expert or fused, fp8 with their scales) go through models/expert_loader.py, everything
else through CausalLM.load_weights. fp8 experts (quantization/experts.py): `quantization="fp8"` quantizes them
online per channel; a block-wise fp8 checkpoint's load as they are (each expert's fp8 matrices and block grids).

Tensor parallelism: each rank holds its slice of every expert's intermediate columns (`ParallelFusedMoE`: gate
and up rows, down columns; the router is replicated) and the ranks' outputs are summed, as in the dense MLP. fp8
scales follow their rows: per channel, gate and up rows' scales are cut with them and the down rows' are whole
(the row maxima of online quantization taken over the ranks), and each rank quantizes the down projection's input
per token over its own columns, as the dense row-parallel projections do; block-wise, a rank keeps the block rows
(gate, up) or block columns (down) of its slice, so the slice must be a whole number of blocks
(quantization/experts.py) and the activation groups never straddle two ranks.
Expert parallelism (ModelConfig.enable_expert_parallel, vLLM's --enable-expert-parallel) instead gives each rank of
the group whole experts: rank r holds experts [r * E / tp, (r + 1) * E / tp) (E must divide by tp), computes their
contributions for every token (slots routed to other ranks' experts add nothing) and the same all-reduce sums the
ranks. The router stays replicated and routes over all E; shared experts (Qwen2-MoE) stay tensor-parallel. Whole
experts keep the GEMMs as wide as on one device, and block-wise fp8 experts whose width does not cut into whole blocks
per rank load. The loaders still see every expert's tensors and keep their rank's (treadle_moe's placement.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from treadle_ir.ops.fp8_block import num_blocks
from treadle_model_runner.layers.linear import building_on_meta
from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.models.expert_loader import ExpertLoader
from treadle_model_runner.models.llama import LlamaModel
from treadle_model_runner.parallel import all_reduce, get_tp, is_expert_parallel, max_over_ranks_
from treadle_moe import ExpertPlacement, FusedMoE


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
    width N: rows of gate and of up in w13 [E, 2N/size, K], columns of w2 [E, K, N/size]; or, under expert
    parallelism (parallel.building_expert_parallel), whole experts [rank * E / size, ...): w13 [E/size, 2N, K].
    `rank` / `tp_size` describe the cut of the intermediate width (0 / 1 for whole experts). `full_shape` and
    `take_shard` let the loaders hand it one-rank tensors (as layers/linear.py's parallel layers)."""

    def __init__(
        self, num_experts: int, top_k: int, hidden: int, intermediate: int, renormalize: bool, **routing: Any
    ) -> None:
        """`routing`: FusedMoE's other router arguments (scoring, grouped top-k, routed_scaling_factor,
        use_correction_bias); the router, and its correction bias [E], are the same on every rank."""
        tp = get_tp()
        device = "meta" if building_on_meta() else None  # an fp8 checkpoint's experts get storage later
        if is_expert_parallel():
            placement = ExpertPlacement.linear(num_experts, tp.rank, tp.size)
            super().__init__(num_experts, top_k, hidden, intermediate, renormalize=renormalize, device=device,
                             placement=placement, **routing)  # fmt: skip
            self.rank, self.tp_size = 0, 1
        else:
            local = tp.shard(intermediate, "the experts' intermediate size")
            super().__init__(
                num_experts, top_k, hidden, local, renormalize=renormalize, device=device, **routing
            )
            self.rank, self.tp_size = tp.rank, tp.size
        self.full_intermediate = intermediate
        if self.e_score_correction_bias is not None and device == "meta":
            # not a weight: the fp8 / 4-bit allocation gives storage to the experts' matrices only
            bias = torch.zeros(num_experts, dtype=torch.float32)
            self.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)

    def rank_columns(self) -> slice:
        """This rank's slice of each expert's intermediate width N."""
        return slice(self.rank * self.intermediate_size, (self.rank + 1) * self.intermediate_size)

    def w2_row_amax(self, local: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:  # whole rows (one rank, or whole experts)
            return local
        return max_over_ranks_(local)  # each rank holds a slice of every down row's columns

    def full_shape(self, name: str) -> tuple[int, ...]:
        e, k, n = self.num_experts, self.hidden_size, self.full_intermediate
        shapes = {"e_score_correction_bias": (e,), "w13_weight": (e, 2 * n, k), "w13_bias": (e, 2 * n),
                  "w2_bias": (e, k)}  # fmt: skip
        return shapes.get(name, (e, k, n))

    def take_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a one-rank tensor; the experts' biases (gpt-oss): w13_bias [E, 2N] is cut as w13's
        rows, w2_bias [E, K] is kept whole (`adds_w2_bias`)."""
        if name == "e_score_correction_bias":
            return full  # the router routes over every expert on every rank
        full = full.narrow(0, self.placement.first, self.placement.num_local)  # this rank's experts
        n, start = self.intermediate_size, self.rank * self.intermediate_size
        if name in ("w13_weight", "w13_bias"):
            gate, up = full.narrow(1, start, n), full.narrow(1, self.full_intermediate + start, n)
            return torch.cat([gate, up], dim=1)
        if name == "w2_bias":
            return full
        return full.narrow(2, start, n)

    def adds_w2_bias(self) -> bool:
        """The ranks' partial outputs are summed, so one rank adds the down bias: rank 0 of a cut of the
        intermediate width; every rank for whole experts (each token's expert lives on one rank)."""
        return self.rank == 0

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

    def take_expert_scale(self, shard: str, scale: torch.Tensor, hf_name: str) -> torch.Tensor:
        """This rank's part of one expert's checkpoint weight scale: block-wise, the block rows (gate / up) or block
        columns (down) of its slice of the [ceil(rows / block_n), ceil(columns / block_k)] grid; per channel,
        its gate / up rows' scales or every down row's; a per-tensor scale becomes its rows'."""
        assert self.fp8_layout is not None, "scales load into fp8 experts"
        k, n, cols = self.hidden_size, self.full_intermediate, self.rank_columns()
        if self.fp8_layout.block is not None:
            bn, bk = self.fp8_layout.block
            grid = (
                (num_blocks(k, bn), num_blocks(n, bk))
                if shard == "w2"
                else (num_blocks(n, bn), num_blocks(k, bk))
            )
            if tuple(scale.shape) != grid:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(scale.shape)}; with {bn} x {bk} blocks its "
                    f"expert matrix has {grid} block scales (the last ones ragged): the files and config.json "
                    "disagree"
                )
            if shard == "w2":
                return scale[:, cols.start // bk : num_blocks(cols.stop, bk)]
            return scale[cols.start // bn : num_blocks(cols.stop, bn)]
        rows = k if shard == "w2" else n
        if scale.numel() == 1:
            scale = scale.reshape(1).expand(rows)
        elif tuple(scale.shape) in ((rows,), (rows, 1)):
            scale = scale.reshape(rows)
        else:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} has shape {tuple(scale.shape)}; an expert matrix's weight scale is "
                f"one value (per tensor) or ({rows}, 1) (per output row)"
            )
        return scale if shard == "w2" else scale[cols]


class MoeModel(LlamaModel):
    """The Llama decoder stack with `make_mlp(layer_idx)` giving each layer's MLP (routed or dense); `qkv_bias`
    None: config.attention_bias decides; `o_bias`, `sinks`: LlamaSelfAttention's."""

    def __init__(
        self,
        config: Any,
        max_position: int,
        qk_norm: bool,
        make_mlp: Callable[[int], nn.Module],
        qkv_bias: bool | None = None,
        o_bias: bool | None = None,
        sinks: bool = False,
    ) -> None:
        if qkv_bias is None:
            qkv_bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, max_position, qkv_bias, qk_norm, make_mlp, o_bias=o_bias, sinks=sinks)


class MoeCausalLM(CausalLM):
    """A CausalLM whose loader also understands expert tensors (models/expert_loader.py)."""

    has_experts: ClassVar[bool] = True
    # the config.json field giving each expert's intermediate width (named in block-alignment errors)
    expert_width_field: ClassVar[str] = "moe_intermediate_size"
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
        self._experts = ExpertLoader(self)
        loaded = super().load_weights(self._experts.filter(weights), source)
        return loaded | self._experts.loaded_names()

    def checkpoint_name(self, name: str) -> str:
        name = super().checkpoint_name(name)
        for old, new in self.checkpoint_renames:  # back to the checkpoint's spelling
            name = name.replace(new, old)
        return name

    def _check_complete(self, loaded: set[str], source: str = "the checkpoint") -> None:
        """Every expert tensor of every FusedMoE must be loaded; then the dense parameters (CausalLM's check)."""
        super()._check_complete(loaded | self._experts.check_complete(source), source)
