"""Block-wise fp8 layouts on a model's projections: the `WeightBlocks` a block-wise checkpoint's scheme gives each
projection (`checked_blocks`), refused with a ValueError naming config.json's block field when the projection's
stacking or tensor-parallel cuts would split a block (layers/fp8_weights.py, `block_alignment_problem`). Used when
loading such a checkpoint (checkpoint.py) and when quantizing dummy weights for its config.json (online.py).
"""

from __future__ import annotations

from treadle_model_runner.layers import fp8_weights
from treadle_model_runner.layers.fp8_weights import WeightBlocks
from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.quantization.scheme import Fp8CheckpointScheme

__all__ = ["checked_blocks", "weight_blocks"]


def weight_blocks(scheme: Fp8CheckpointScheme) -> WeightBlocks | None:
    if scheme.weight_block is None:
        return None
    block_n, block_k = scheme.weight_block
    return WeightBlocks(block_n, block_k, f"{scheme.config_file}'s quantization_config.{scheme.block_field} "
                        f"[{block_n}, {block_k}]")  # fmt: skip


def checked_blocks(layer: Linear, name: str, scheme: Fp8CheckpointScheme) -> WeightBlocks | None:
    """The scheme's weight blocks for `layer` (at `name`), or the ValueError saying which cut splits a block."""
    blocks = weight_blocks(scheme)
    if blocks is not None and (problem := fp8_weights.block_alignment_problem(layer, blocks)) is not None:
        raise ValueError(
            f"{blocks.source}: {name} cannot hold block-wise scales: {problem}. Block scales are stacked (q/k/v, "
            "gate/up) and cut for tensor parallelism in whole blocks; use a tensor_parallel_size whose slices are "
            "multiples of the block, or the model's unquantized checkpoint"
        )
    return blocks
