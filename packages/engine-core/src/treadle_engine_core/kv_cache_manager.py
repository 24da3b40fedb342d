"""KV cache manager: per-request block tables over one shared block pool, with automatic prefix caching.

Theory. Every KV-cache group (full attention, or one sliding-window size) keeps its own block table per
request, all drawing from one `BlockPool`. Block j of a table holds the KV of tokens [j*B, (j+1)*B).
- `get_computed_blocks` looks a waiting request's full-block hashes up in each group's prefix cache and
  returns the longest prefix every group has, capped so at least one prompt token is still computed (the
  model must run at least one position to produce logits). A request that reads every prompt position (prompt
  logprobs, mean or first-token pooling: SamplingParams.needs_whole_prompt) gets no hit; its blocks are still
  published for later requests. Under EAGLE-3 (`drop_last_hit`) a hit gives its last block back, as vLLM's: the
  head's KV at a block's last position pairs it with the token after the block, which the cached block took from
  another request; computed again, it is this request's.
- `allocate_slots` grows the tables so `num_computed + num_new (+ lookahead)` tokens have slots, taking
  prefix-hit blocks first, or returns None if the pool is short (the scheduler then preempts). Blocks that
  become full with known token ids are published in the prefix cache right away: the KV they will hold is
  fully determined by their tokens, and the runner writes each layer's KV before any query reads it.
- A sliding-window group swaps blocks that fell out of the window for the null block and frees them.
- `free` returns a request's blocks tail-first so its least shareable blocks are evicted first.

Invariants: a block's `ref_cnt` equals the number of (request, group) tables holding it; a request's tables
cover at least `num_computed_tokens` tokens; only full blocks with known token ids are cached.
"""

from __future__ import annotations

import logging

from treadle_engine_core.block_hash import update_block_hashes
from treadle_engine_core.block_pool import BlockPool, KVCacheBlock
from treadle_engine_core.request import Request
from treadle_model_runner.kv_cache_spec import KVCacheConfig

logger = logging.getLogger(__name__)

NO_NEW_BLOCKS: tuple[list[int], ...] = ()  # allocate_slots' answer when the tables already had room


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, kv_cache_config: KVCacheConfig, enable_caching: bool = True, drop_last_hit: bool = False
    ) -> None:
        if not kv_cache_config.groups:
            raise ValueError("KVCacheConfig.groups is empty: the model reported no attention layers")
        self.config = kv_cache_config
        self.block_size = kv_cache_config.block_size
        self.num_groups = len(kv_cache_config.groups)
        self.windows = [g.sliding_window for g in kv_cache_config.groups]
        self.has_sliding_window = any(w is not None for w in self.windows)
        self.is_single_full_group = self.windows == [None]
        self.enable_caching = enable_caching
        self.drop_last_hit = drop_last_hit  # EAGLE-3: every prefix hit computes its last block again
        self.pool = BlockPool(kv_cache_config.num_blocks, self.num_groups, enable_caching)
        self.req_blocks: dict[str, list[list[KVCacheBlock]]] = {}  # request id -> per group block table
        self.num_cached_blocks: dict[str, int] = {}  # request id -> leading full blocks already published
        self.prefix_queries = 0  # tokens looked up in the prefix cache (cumulative)
        self.prefix_hits = 0  # tokens found (cumulative)

    # ---- capacity ---------------------------------------------------------------------------------
    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed_for(self, num_tokens: int, max_chunk: int) -> int:
        """Blocks one request of num_tokens needs at most across groups (chunks of up to max_chunk)."""
        n = 0
        for w in self.windows:
            full = cdiv(num_tokens, self.block_size)
            n += full if w is None else min(full, cdiv(w + max_chunk, self.block_size) + 1)
        return n

    # ---- prefix cache lookup ----------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[list[KVCacheBlock]], int]:
        """Longest cached prefix of `request` (full blocks, all groups), never its whole token list."""
        if not self.enable_caching or request.sampling_params.needs_whole_prompt:
            return [[] for _ in range(self.num_groups)], 0
        hashes = update_block_hashes(request, self.block_size)
        max_blocks = min(len(hashes), (request.num_tokens - 1) // self.block_size)
        num_hit = max_blocks
        per_group: list[list[KVCacheBlock]] = []
        for g in range(self.num_groups):
            table = self.pool.cached[g]
            hit: list[KVCacheBlock] = []
            for i in range(num_hit):
                b = table.get(hashes[i])
                if b is None:
                    break
                hit.append(b)
            num_hit = len(hit)
            per_group.append(hit)
        if self.drop_last_hit and num_hit:
            num_hit -= 1
        per_group = [blocks[:num_hit] for blocks in per_group]
        return per_group, num_hit * self.block_size

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one lookup whose result was used (the scheduler calls it once the request is admitted)."""
        if self.enable_caching:
            self.prefix_queries += num_queried_tokens
            self.prefix_hits += num_hit_tokens

    # ---- allocation -------------------------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: list[list[KVCacheBlock]] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> tuple[list[int], ...] | None:
        """Give `request` slots for num_new_tokens more tokens.

        Returns the new block ids per group (NO_NEW_BLOCKS if none were needed), or None if the pool cannot
        supply them (nothing is changed then). `new_computed_blocks` are prefix hits from
        get_computed_blocks, covering `num_new_computed_tokens` tokens after request.num_computed_tokens.
        """
        bs = self.block_size
        rid = request.request_id
        tables = self.req_blocks.get(rid)
        num_after = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        # Fast path (every decode step but one in block_size): one full-attention group, no hits, the table
        # already has room, no block became full.
        if (
            tables is not None
            and self.is_single_full_group
            and not new_computed_blocks
            and num_after + num_lookahead_tokens <= len(tables[0]) * bs
            and (
                not self.enable_caching
                or min(num_after, len(request.all_token_ids)) // bs <= self.num_cached_blocks[rid]
            )
        ):
            return NO_NEW_BLOCKS
        num_computed = num_after - num_new_tokens
        num_total = num_after + num_lookahead_tokens
        num_known = min(num_after, request.num_tokens)  # tokens whose ids are known (no placeholders)
        if tables is None:
            tables = [[] for _ in range(self.num_groups)]
        if self.has_sliding_window:
            self._free_out_of_window(tables, num_computed)
        hits = new_computed_blocks or [[] for _ in range(self.num_groups)]
        need = [max(0, cdiv(num_total, bs) - len(tables[g]) - len(hits[g])) for g in range(self.num_groups)]
        num_evictable_hits = sum(1 for blocks in hits for b in blocks if b.ref_cnt == 0)
        if sum(need) + num_evictable_hits > self.pool.num_free_blocks:
            return None
        self.req_blocks[rid] = tables
        self.num_cached_blocks.setdefault(rid, 0)
        for g in range(self.num_groups):  # take every hit before allocating: a hit may sit in the free queue
            if hits[g]:
                self.pool.touch(hits[g])
                tables[g].extend(hits[g])
        new_ids: list[list[int]] = []
        for g in range(self.num_groups):
            new = self.pool.get_new_blocks(need[g]) if need[g] else []
            tables[g].extend(new)
            new_ids.append([b.block_id for b in new])
        if self.enable_caching:
            self._cache_full_blocks(request, tables, num_known // bs)
        return tuple(new_ids) if any(new_ids) else NO_NEW_BLOCKS

    def _cache_full_blocks(self, request: Request, tables: list[list[KVCacheBlock]], num_full: int) -> None:
        rid = request.request_id
        start = self.num_cached_blocks[rid]
        if num_full <= start:
            return
        hashes = update_block_hashes(request, self.block_size)
        for g in range(self.num_groups):
            table = tables[g]
            for i in range(start, num_full):
                self.pool.cache_block(table[i], g, hashes[i])
        self.num_cached_blocks[rid] = num_full

    def _free_out_of_window(self, tables: list[list[KVCacheBlock]], num_computed: int) -> None:
        """Swap blocks no future query can see (all positions < num_computed - window + 1) for the null block."""
        null = self.pool.null_block
        for g, w in enumerate(self.windows):
            if w is None:
                continue
            table = tables[g]
            num_skip = min(len(table), max(0, num_computed - w + 1) // self.block_size)
            freed = []
            for i in range(num_skip - 1, -1, -1):
                if table[i] is null:
                    break
                freed.append(table[i])
                table[i] = null
            if freed:
                self.pool.free_blocks(freed)

    # ---- release ----------------------------------------------------------------------------------
    def free(self, request: Request) -> None:
        """Return every block `request` holds (tail first, so its last blocks are evicted first)."""
        tables = self.req_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if tables is None:
            return
        for table in tables:
            self.pool.free_blocks(table[::-1])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix. Blocks published before stay unpublished; later full blocks are
        published again (num_cached_blocks keeps counting from where each request was)."""
        self.pool.reset_prefix_cache()
        return True

    # ---- views ------------------------------------------------------------------------------------
    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        tables = self.req_blocks.get(request_id)
        if tables is None:
            return tuple([] for _ in range(self.num_groups))
        return tuple([b.block_id for b in table] for table in tables)
