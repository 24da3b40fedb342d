"""KV-cache layout the runner reports to the engine, and the allocation the engine hands back.

All layers draw from one pool of `num_blocks` blocks of `block_size` tokens. Layers with the same attention
kind (full, or sliding window of one size) form a KV-cache group; a request holds a block table per group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVCacheGroupSpec:
    layer_indices: tuple[int, ...]  # decoder layers in this group
    sliding_window: int | None  # tokens visible to a query (None = full attention)


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    num_blocks: int  # blocks in the shared pool (block 0 is the null block, never handed out)
    block_size: int  # tokens per block
    groups: tuple[KVCacheGroupSpec, ...]  # one entry per attention kind
    bytes_per_block: int  # bytes one block costs across every layer of every group

    @property
    def num_tokens(self) -> int:
        """Token capacity of the cache for one sequence in every group."""
        return (self.num_blocks - 1) * self.block_size // max(1, len(self.groups))
