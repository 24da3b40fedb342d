"""LoRA on a projection: every adapter of the step applied to its own rows, in two matmuls of static shape.

A projection with n output shards (qkv: q, k, v; gate_up: gate, up; o and down, and a stacked projection adapted
whole: one, see the end) holds, for S = max_loras slots of rank up to R:
    lora_a  [n * S * R, in]         rows (shard i, slot s) = that adapter's A for shard i, zero-padded to R rows
    lora_b  [out, n * S * R]        block-diagonal: shard i's output rows read only shard i's columns (B * scaling)
With the step's token mask M [T, S] (M[t, s] = 1 when token t's request uses the adapter in slot s, all zero for
base-model rows), the delta is
    y += ((x lora_a^T).view(T, n, S, R) * M[:, None, :, None]).view(T, n S R) lora_b^T
so each row gets exactly its own adapter's  scaling * (x A^T) B^T  on each shard's rows, and nothing else (the
zeros of other slots and of the padding add exact zeros). No shape depends on which adapters a step uses: the
slots are filled in place (`set_slot`) and the mask is a persistent buffer the runner rewrites each step
(manager.py), so CUDA graphs captured once replay with any adapters.

A step where no row runs an adapter (`TokenMask.has_adapters` false) skips all of it: the layer returns `y`, and the
norm + projection and activation + down_proj fusions, which step aside for LoRA, run again. Eager and piecewise
steps read the flag in Python; CUDA graphs are captured once per value and the replay picks the variant
(runner/lora_graphs.py).

Tensor parallelism changes no arithmetic above: each rank's slots hold its part of every adapter, cut as the
projection's weight is (`LoRATarget.rank_part`, by `Linear.rank_rows` / `rank_columns`), and with one rank that part
is all of it.
- Column-parallel (qkv_proj, gate_up_proj: the rank's rows of each shard; key/value heads shared by several ranks
  when fewer than them): A whole, B the rank's rows of each shard, so the rank's delta is its rows of the one-rank
  delta, as its base output is.
- Row-parallel (o_proj, down_proj: the rank's input columns x_r): A the rank's columns A_r, B whole. x A^T is the sum
  over ranks of x_r A_r^T, and the mask and B are linear, so the ranks' partial deltas ((x_r A_r^T) * M) B^T sum to
  the one-rank delta: the projection's own all-reduce, which sums the ranks' partial outputs, sums them along (its
  bias is rank 0's alone, as before). No collective of its own, so CUDA graphs capture nothing new; exact up to
  summation order. The ranks need not even agree on slots: each rank's mask and slots go together.

`attach_lora` gives each LoRA-capable projection of a model its slots (`Linear.lora`, read by layers/linear.py and
the fused norm / MLP paths) and returns the HF module names they answer to, which are the checkpoint's:
- a stacked projection whose checkpoint splits it (the model's `stacked_params`: Llama's q_proj, k_proj, v_proj)
  answers to each part, e.g. "model.layers.0.self_attn.q_proj" is shard 0 of that layer's qkv_proj (n shards);
- one whose checkpoint holds it whole (Phi-3's qkv_proj and gate_up_proj, no `stacked_params` entry) answers to
  its own name only, as the HF model has no other module there and PEFT trains an adapter on it whole: one A
  [r, in] and one B [q + k + v rows, r], a single delta over all the output rows. Its slots have one shard (n = 1:
  one A product per slot, not one per part). Under tensor parallelism the rank's rows of that B are cut part by part,
  as the stacked weight's are (its rows of q, then of k, then of v: `LoRATarget.rows`), never as one block, and A is
  whole (column-parallel). Parts of it ("q_proj" of a Phi-3 model) answer to nothing, as in vLLM, whose Phi-3
  packs qkv_proj from qkv_proj alone: adapter.py refuses such an adapter by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from treadle_ir import ops
from treadle_model_runner.layers.linear import Linear, StackedLinear
from treadle_model_runner.lora.adapter import STACKED_TARGETS, SUPPORTED_TARGETS, LoRAWeights


class TokenMask:
    """The step's token -> slot one-hot, shared by every LoRA layer; the runner rewrites `buffer` in place, and
    `has_adapters` before each step."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer  # [max_num_tokens, max_loras] in the model dtype
        # some row of the step runs an adapter; when not, every LoRA layer adds nothing and launches nothing, and
        # fused norm / activation paths run again. True until the first step (the profiling pass: the worst case)
        self.has_adapters = True

    @contextlib.contextmanager
    def forcing(self, has_adapters: bool) -> Iterator[None]:
        """`has_adapters` fixed while CUDA graphs of one variant are captured (runner/lora_graphs.py)."""
        before, self.has_adapters = self.has_adapters, has_adapters
        try:
            yield
        finally:
            self.has_adapters = before

    def rows(self, num_tokens: int) -> torch.Tensor:
        return self.buffer[:num_tokens]


class LoRASlots(nn.Module):
    lora_a: torch.Tensor  # [shards * slots * max_rank, in] (buffers: loaded by set_slot, never trained)
    lora_b: torch.Tensor  # [out, shards * slots * max_rank]

    def __init__(
        self, in_features: int, shard_sizes: list[int], max_loras: int, max_rank: int, mask: TokenMask
    ) -> None:
        super().__init__()
        self.num_shards, self.max_loras, self.max_rank = len(shard_sizes), max_loras, max_rank
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes
        width = self.num_shards * max_loras * max_rank
        dtype, device = mask.buffer.dtype, mask.buffer.device
        self.register_buffer("lora_a", torch.zeros(width, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(sum(shard_sizes), width, dtype=dtype, device=device))
        self.mask = mask

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (this projection's output for `x` [T, in]) plus each row's adapter delta (`y` itself in a step where
        no row runs an adapter)."""
        if not self.mask.has_adapters:
            return y
        num_tokens = x.shape[0]
        mask = self.mask.rows(num_tokens)[:, None, :, None]  # [T, 1, S, 1]
        xa = ops.linear(x, self.lora_a, None).view(num_tokens, self.num_shards, self.max_loras, self.max_rank)
        return y + ops.linear((xa * mask).view(num_tokens, -1), self.lora_b, None)

    def set_slot(self, slot: int, shard: int, weights: LoRAWeights | None) -> None:
        """Put one adapter's weights for `shard` into `slot` (None: that adapter leaves this shard alone)."""
        first = (shard * self.max_loras + slot) * self.max_rank
        cols = slice(first, first + self.max_rank)
        rows = slice(self.shard_offsets[shard], self.shard_offsets[shard] + self.shard_sizes[shard])
        self.lora_a[cols].zero_()
        self.lora_b[rows, cols].zero_()
        if weights is not None:
            rank = weights.lora_a.shape[0]
            # page-locked host tensors on CUDA (host_cache.py): asynchronous, ordered before the step's kernels
            self.lora_a[first : first + rank].copy_(weights.lora_a, non_blocking=True)
            self.lora_b[rows, first : first + rank].copy_(weights.lora_b, non_blocking=True)


@dataclass(frozen=True)
class LoRATarget:
    """Where one HF module's adapter goes: a shard of a projection's slots, and the part of it this rank keeps."""

    slots: LoRASlots
    shard: int  # index of the shard in the projection's output (q, k, v = 0, 1, 2)
    in_features: int  # of the checkpoint's module: an adapter's A is [rank, in_features]
    out_features: int  # of the checkpoint's module: an adapter's B is [out_features, rank]
    # this rank's rows of B (the module's output rows it computes), in the order the layer holds them: one slice,
    # or one per part of a stacked module the checkpoint holds whole
    rows: tuple[slice, ...]
    columns: slice  # this rank's columns of A (the module's input columns it is given)

    def rank_part(self, weights: LoRAWeights) -> LoRAWeights:
        """This rank's part of one module's adapter (the whole adapter with one rank), in contiguous tensors."""
        a, b = weights.lora_a[:, self.columns], torch.cat([weights.lora_b[rows] for rows in self.rows])
        return LoRAWeights(a.contiguous(), b.contiguous())


def attach_lora(model: nn.Module, max_loras: int, max_rank: int, mask: TokenMask) -> dict[str, LoRATarget]:
    """Give every LoRA-capable projection of `model` its adapter slots; returns HF module name -> target."""
    # stacked name -> shard -> HF name ("qkv_proj" -> "q" -> "q_proj"); absent: the checkpoint holds it whole
    stacked_parts: dict[str, dict[str, str]] = {}
    for stacked, hf_part, shard in getattr(model, "stacked_params", ()):
        stacked_parts.setdefault(stacked, {})[shard] = hf_part
    targets: dict[str, LoRATarget] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        prefix, _, leaf = name.rpartition(".")
        if isinstance(module, StackedLinear) and leaf not in stacked_parts:
            if leaf not in STACKED_TARGETS:
                continue
            slots = LoRASlots(module.in_features, [module.out_features], max_loras, max_rank, mask)
            targets[name] = LoRATarget(slots, 0, module.checkpoint_columns(), module.checkpoint_rows(None),
                                       _whole_rows(module), module.rank_columns())  # fmt: skip
        elif isinstance(module, StackedLinear):
            parts = stacked_parts[leaf]
            if set(parts) != set(module.shard_sizes) or not set(parts.values()) <= set(SUPPORTED_TARGETS):
                continue
            sizes = list(module.shard_sizes.values())
            slots = LoRASlots(module.in_features, sizes, max_loras, max_rank, mask)
            for i, shard in enumerate(module.shard_sizes):
                targets[f"{prefix}.{parts[shard]}"] = LoRATarget(
                    slots, i, module.checkpoint_columns(), module.checkpoint_rows(shard),
                    (module.rank_rows(shard),), module.rank_columns(),
                )  # fmt: skip
        elif leaf in SUPPORTED_TARGETS:
            slots = LoRASlots(module.in_features, [module.out_features], max_loras, max_rank, mask)
            targets[name] = LoRATarget(slots, 0, module.checkpoint_columns(), module.checkpoint_rows(None),
                                       (module.rank_rows(None),), module.rank_columns())  # fmt: skip
        else:
            continue
        module.lora = slots
    return targets


def _whole_rows(module: StackedLinear) -> tuple[slice, ...]:
    """This rank's rows of the whole stacked tensor (q, k, v rows one after the other), part by part: each part's
    rows the layer keeps of it (`rank_rows`), moved to where that part starts in the whole."""
    return tuple(
        slice(module.full_offsets[shard] + rows.start, module.full_offsets[shard] + rows.stop)
        for shard in module.shard_sizes
        for rows in (module.rank_rows(shard),)
    )
