"""Block pool: every physical KV block, its reference count, an O(1) LRU free queue and the prefix cache.

Theory. The pool owns `num_blocks` blocks. Block 0 is the null block: never handed out, it stands in block
tables for positions a sliding-window group no longer needs. A block with `ref_cnt == 0` is free and sits in
the free queue, a doubly linked list ordered least-recently-freed first. A free block may still hold a valid
cached prefix (`block_hash` set): it is reused for free on a prefix hit (`touch`), and only loses its hash
when allocation pops it from the front of the queue (eviction). So allocation evicts in LRU order, and
freeing a request's blocks tail-first makes its last (least shareable) blocks go first.

Invariants:
- a block is in the free queue iff `ref_cnt == 0` (the null block is never in it);
- `cached[g][h] is b` implies `b.block_hash == h` and `b.group_id == g`; at most one block per (group, hash);
- `num_free_blocks == len(free queue)`; all operations are O(1) per block.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class KVCacheBlock:
    __slots__ = ("block_hash", "block_id", "group_id", "next_free", "prev_free", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0  # number of block tables holding this block
        self.block_hash: bytes | None = None  # set while the block is in the prefix cache
        self.group_id = -1  # KV-cache group whose cache holds this block's hash
        self.prev_free: KVCacheBlock | None = None  # free-queue links (None when not queued)
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinels: popleft, append and remove are O(1)."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        self.head.next_free = self.tail
        self.tail.prev_free = self.head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> KVCacheBlock:
        first = self.head.next_free
        assert first is not None and first is not self.tail, "popleft from an empty free queue"
        self.remove(first)
        return first

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free queue"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self.tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self.tail
        self.tail.prev_free = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Free block ids, front (next to evict) first. O(n); for tests and debugging."""
        out = []
        b = self.head.next_free
        while b is not None and b is not self.tail:
            out.append(b.block_id)
            b = b.next_free
        return out


class BlockPool:
    def __init__(self, num_blocks: int, num_groups: int = 1, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks ({num_blocks}) must be >= 2: block 0 is the null block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # pinned forever
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        # per group: block hash -> the block holding that prefix
        self.cached: list[dict[bytes, KVCacheBlock]] = [{} for _ in range(num_groups)]
        self.num_evictions = 0  # cached blocks reused for new content (cumulative)

    # ---- queries ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocation may take (free, including evictable cached ones)."""
        return self.free_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Share of usable blocks (all but the null block) held by requests, in [0, 1]."""
        return 1.0 - self.free_queue.num_free_blocks / (self.num_blocks - 1)

    def get_cached_block(self, group_id: int, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached[group_id].get(block_hash)

    # ---- allocation -------------------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Pop n blocks from the LRU front, evicting their cached hashes; each gets ref_cnt 1."""
        if n > self.free_queue.num_free_blocks:
            raise ValueError(f"cannot allocate {n} blocks: only {self.free_queue.num_free_blocks} are free")
        out = []
        queue = self.free_queue
        for _ in range(n):
            b = queue.popleft()
            if b.block_hash is not None:
                self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take one more reference on prefix-hit blocks, pulling free ones out of the queue."""
        queue = self.free_queue
        for b in blocks:
            if b.ref_cnt == 0:
                queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference on each block, in the given order (pass the eviction order wanted)."""
        queue = self.free_queue
        for b in blocks:
            if b is self.null_block:
                continue
            assert b.ref_cnt > 0, f"double free of {b}"
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                queue.append(b)

    # ---- prefix cache -----------------------------------------------------------------------------
    def cache_block(self, block: KVCacheBlock, group_id: int, block_hash: bytes) -> None:
        """Publish a full block under its hash (no-op if this group already caches that prefix)."""
        if block.block_hash is not None or block is self.null_block:
            return
        table = self.cached[group_id]
        if block_hash in table:
            return
        block.block_hash = block_hash
        block.group_id = group_id
        table[block_hash] = block

    def _evict(self, block: KVCacheBlock) -> None:
        assert block.block_hash is not None
        table = self.cached[block.group_id]
        if table.get(block.block_hash) is block:
            del table[block.block_hash]
        self.num_evictions += 1
        block.block_hash = None
        block.group_id = -1

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (blocks in use keep their data but are no longer shareable)."""
        n = 0
        for table in self.cached:
            for b in table.values():
                b.block_hash = None
                b.group_id = -1
            n += len(table)
            table.clear()
        logger.info("prefix cache reset: %d cached blocks dropped", n)
        return n
