"""Linear layers that dispatch through the IR (`ops.linear`), and stacked ones: several HF projections fused
into one matmul at load time.

`Linear` is `nn.Linear` whose forward is `ops.linear`: on GPU a decode step's few rows take Triton's weight-streaming
kernel, more rows cuBLAS. Norms and activations before a projection can fuse into it (`RMSNorm.add_norm_linear`,
`GatedMLP`), which is why the projections hold plain weights, never a wrapped kernel.

`StackedLinear(in, {"q": nq, "k": nk, "v": nv})` holds one [nq + nk + nv, in] weight; loading the HF tensor of
shard "k" writes rows [nq, nq + nk). The forward is a single `ops.linear`; callers split the output by
`shard_sizes`. Invariant: every shard is loaded exactly once before use (the model's loader checks coverage).

Tensor parallelism (see treadle_model_runner.parallel): a `parallel` StackedLinear keeps this rank's rows of each
shard (column-parallel), `RowParallelLinear` this rank's input columns and sums the partial outputs (vocab.py holds
the vocabulary-parallel embedding and lm_head). Each holds its local slice; the loaders hand it the checkpoint's full
tensor (`full_shape`) and it keeps its part (`take_shard`: the rows `rank_rows` and columns `rank_columns` name, which
also cut a LoRA adapter's B and A for it), so with one rank nothing changes and with several every rank's slices join
to the one-rank model exactly (dummy weights included).

fp8 weights (per channel, per tensor from a checkpoint, or block-wise) and how they are quantized, allocated and
loaded: layers/fp8_weights.py. A quantized projection's forward is `ops.fp8_linear` (`weight_scale` [out]) or
`ops.fp8_block_linear` (`weight_block` set, `weight_scale` its tile grid).

4-bit checkpoints (AWQ, GPTQ, compressed-tensors W4A16; quantization/int4_checkpoint.py): `allocate_int4`
(layers/linear_int4.py) replaces the weight by `packed_weight`, `group_scale`, `group_zero` and `group_index` in the
layout of treadle_ir.ops.int4, and the forward is `ops.w4a16_linear`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from treadle_ir import ops
from treadle_model_runner.layers.fp8_weights import WeightBlocks
from treadle_model_runner.layers.linear_int4 import INT4_TENSORS, Int4Layout
from treadle_model_runner.parallel import TensorParallel, all_reduce, get_tp, max_over_ranks_

if TYPE_CHECKING:
    from treadle_model_runner.lora.layer import LoRASlots


_on_meta = False  # inside `projections_on_meta`: projections are built without storage


@contextmanager
def projections_on_meta(enabled: bool = True) -> Iterator[None]:
    """Within the block (when `enabled`), `Linear` layers (and the routed experts, models/sparse_moe.py) are built on
    the meta device: no memory until `allocate` gives them storage in the dtypes a checkpoint holds (an fp8 model
    never holds its model-dtype size)."""
    global _on_meta
    previous, _on_meta = _on_meta, enabled
    try:
        yield
    finally:
        _on_meta = previous


def building_on_meta() -> bool:
    """Whether layers built now go on the meta device (inside `projections_on_meta`)."""
    return _on_meta


class Linear(nn.Linear):
    weight_scale: torch.Tensor | None  # [out] fp32 once quantized to fp8 (`weight` is then float8_e4m3fn)
    # [1] fp32: the static activation scale of an fp8 checkpoint; None = activations quantized per token
    input_scale: torch.Tensor | None
    # block-wise fp8 (`weight_scale` is then [ceil(out / block_n), ceil(in / block_k)]); None: per channel or plain
    weight_block: WeightBlocks | None
    # a 4-bit checkpoint's projection (layers/linear_int4.py): `weight` is None, these hold the packed weight
    packed_weight: torch.Tensor | None  # int32 [in / 8, out]
    group_scale: torch.Tensor | None  # [groups, out] model dtype
    group_zero: torch.Tensor | None  # uint8 [groups, out]; None: every zero point is 8
    group_index: (
        torch.Tensor | None
    )  # int32 [in]: each input row's group (act order); None: row // group_size
    group_size: int = 0  # input rows per group on this rank
    int4_layout: Int4Layout | None = None
    group_index_shard: str | None = None  # the stacked shard whose g_idx group_index holds

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _on_meta:
            kwargs["device"] = "meta"
        super().__init__(*args, **kwargs)
        # with LoRA enabled: the adapters' slots (lora/layer.py), added to the output in steps that run an adapter;
        # fused paths before the projection step aside in those steps (`runs_lora`)
        self.lora: LoRASlots | None = None
        self.register_buffer("weight_scale", None)
        self.register_buffer("input_scale", None)
        for name in INT4_TENSORS:
            self.register_parameter(name, None)
        self.weight_block = None

    @property
    def fusable(self) -> bool:
        """Whether fused ops (norm + projection, activation + projection) may read the plain weight: not in a step
        that runs a LoRA adapter (it needs the projection's input rows; `runs_lora`) nor once quantized."""
        return not runs_lora(self) and self.weight_scale is None and self.packed_weight is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            y = ops.w4a16_linear(x, self.packed_weight, self.group_scale, self.group_zero, self.group_index,
                                 self.bias, self.group_size)  # fmt: skip
        elif self.weight_block is not None:
            assert self.weight_scale is not None, "a block-wise projection has its scale grid"
            block_n, block_k = self.weight_block.block_n, self.weight_block.block_k
            y = ops.fp8_block_linear(x, self.weight, self.weight_scale, self.bias, block_n, block_k)
        elif self.weight_scale is not None:
            y = ops.fp8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale)
        else:
            y = ops.linear(x, self.weight, self.bias)
        return y if self.lora is None else self.lora(x, y)

    def row_amax(self, local: torch.Tensor) -> torch.Tensor:
        """The largest magnitude of each whole weight row, from this rank's part of it."""
        return local

    def checkpoint_rows(self, shard: str | None) -> int:
        """Rows of the checkpoint's projection (`shard` of a stacked layer)."""
        return self.out_features

    def checkpoint_columns(self) -> int:
        """Columns (input features) of the checkpoint's projection."""
        return self.in_features

    def rank_rows(self, shard: str | None) -> slice:
        """The rows of the checkpoint's projection (`shard` of a stacked layer) this rank holds: all of them,
        unless column-parallel. A LoRA adapter's B for it is cut the same way (lora/layer.py)."""
        return slice(0, self.out_features)

    def rank_columns(self) -> slice:
        """The columns of the checkpoint's projection this rank holds: all of them, unless row-parallel. A LoRA
        adapter's A for it is cut the same way."""
        return slice(0, self.in_features)

    def rank_row_offset(self, shard: str | None) -> int:
        """Where this rank's rows of the checkpoint's projection (`shard`) start in the layer's own weight."""
        return 0


def runs_lora(linear: nn.Module) -> bool:
    """Whether this step adds adapter deltas to `linear`'s output: LoRA is enabled and some row of the step runs an
    adapter. Then the projection needs its input rows themselves, so a norm or activation fused into it runs apart."""
    lora = getattr(linear, "lora", None)
    return lora is not None and lora.mask.has_adapters


def checkpoint_shape(module: nn.Module, name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The shape a checkpoint holds for `module.<name>`: a tensor-parallel layer's one-rank shape, else the param's."""
    full_shape = getattr(module, "full_shape", None)
    return tuple(full_shape(name)) if full_shape is not None else tuple(param.shape)


def rank_part(module: nn.Module, name: str, full: torch.Tensor) -> torch.Tensor:
    """What this rank keeps of the checkpoint-shaped tensor `full` for `module.<name>` (all of it, unless sharded)."""
    take_shard = getattr(module, "take_shard", None)
    return take_shard(name, full) if take_shard is not None else full


class StackedLinear(Linear):
    def __init__(
        self,
        in_features: int,
        shard_sizes: dict[str, int],
        bias: bool = False,
        parallel: bool = False,
        replicas: dict[str, int] | None = None,
    ) -> None:
        """`shard_sizes`: each shard's rows in the checkpoint; `parallel`: keep this rank's share of each;
        `replicas[shard]`: how many consecutive ranks share one slice of it (key/value heads fewer than ranks)."""
        tp = get_tp() if parallel else TensorParallel()
        self.replicas = {name: (replicas or {}).get(name, 1) for name in shard_sizes}
        local = {
            name: tp.shard(size * self.replicas[name], f"the {name} projection's {size} rows")
            for name, size in shard_sizes.items()
        }
        super().__init__(in_features, sum(local.values()), bias=bias)
        self.shard_sizes = local
        self.full_sizes = dict(shard_sizes)
        self.rank = tp.rank
        self.shard_offsets: dict[str, int] = {}
        self.full_offsets: dict[str, int] = {}
        offset = full_offset = 0
        for name, size in local.items():
            self.shard_offsets[name], self.full_offsets[name] = offset, full_offset
            offset += size
            full_offset += self.full_sizes[name]

    def load_shard(self, param: torch.Tensor, shard: str, loaded: torch.Tensor) -> None:
        """Copy one HF projection's weight or bias (this rank's rows of it) into its rows of the stacked parameter."""
        size, full = self.shard_sizes[shard], self.full_sizes[shard]
        if loaded.shape[0] != full or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shard {shard!r} has shape {tuple(loaded.shape)}, expected ({full}, ...{tuple(param.shape[1:])}): "
                "the checkpoint does not match the model config"
            )
        start = self.shard_offsets[shard]
        with torch.no_grad():
            param.data[start : start + size].copy_(loaded[self.rank_rows(shard)])

    def _first_row(self, shard: str) -> int:
        """Where this rank's rows of `shard` start in the checkpoint's tensor."""
        return self.rank // self.replicas[shard] * self.shard_sizes[shard]

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (sum(self.full_sizes.values()), *getattr(self, name).shape[1:])

    def checkpoint_rows(self, shard: str | None) -> int:
        """Rows of one shard, or (None) of the whole stacked tensor a checkpoint may hold (Phi-3's qkv_proj)."""
        return self.full_sizes[shard] if shard is not None else sum(self.full_sizes.values())

    def _shard(self, shard: str | None) -> str:
        """`shard`, or (None: the checkpoint names the layer itself) its only one: a column-parallel projection
        built as one stacked shard (MLA's q_b_proj)."""
        if shard is None:
            assert len(self.shard_sizes) == 1, "a stacked layer's rows are cut and placed shard by shard"
            return next(iter(self.shard_sizes))
        return shard

    def rank_rows(self, shard: str | None) -> slice:
        shard = self._shard(shard)
        first = self._first_row(shard)
        return slice(first, first + self.shard_sizes[shard])

    def rank_row_offset(self, shard: str | None) -> int:
        return self.shard_offsets[self._shard(shard)]

    def take_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of every shard of the stacked checkpoint-sized tensor `full`."""
        parts = [full[self.full_offsets[n] :][self.rank_rows(n)] for n in self.shard_sizes]
        return torch.cat(parts)


class RowParallelLinear(Linear):
    """A projection whose input is split across ranks (o_proj, down_proj): this rank holds columns
    [rank * in / size, (rank + 1) * in / size) of the weight; the forward sums the ranks' partial products
    (the bias is added once, by rank 0)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        tp = get_tp()
        super().__init__(tp.shard(in_features, f"the {in_features} input columns of a projection"),
                         out_features, bias=bias)  # fmt: skip
        self.rank, self.full_in = tp.rank, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial product (its columns; the bias on rank 0), before the sum over the ranks."""
        return super().forward(x)

    def row_amax(self, local: torch.Tensor) -> torch.Tensor:
        return max_over_ranks_(local)  # each rank holds a slice of every row's columns

    def checkpoint_columns(self) -> int:
        return self.full_in

    def rank_columns(self) -> slice:
        return slice(self.rank * self.in_features, (self.rank + 1) * self.in_features)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.out_features, self.full_in) if name == "weight" else (self.out_features,)

    def take_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        if name == "weight":
            return full[:, self.rank_columns()]
        return full if self.rank == 0 else torch.zeros_like(full)
