"""Block pool and block hashing: LRU order, null block, eviction, ref counts — checked against a plain model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treadle_engine_core.block_hash import ROOT_HASH, hash_block, update_block_hashes
from treadle_engine_core.block_pool import BlockPool
from treadle_engine_core.request import Request
from treadle_model_runner import SamplingParams


def test_null_block_is_never_handed_out() -> None:
    pool = BlockPool(5)
    got = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in got) == [1, 2, 3, 4]
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    with pytest.raises(ValueError, match="cannot allocate 1 blocks: only 0 are free"):
        pool.get_new_blocks(1)
    pool.free_blocks([pool.null_block, *got])
    assert pool.num_free_blocks == 4 and pool.usage == 0.0


def test_lru_eviction_order_and_touch() -> None:
    pool = BlockPool(6)
    a = pool.get_new_blocks(5)
    for i, b in enumerate(a):
        pool.cache_block(b, 0, bytes([i]) * 32)
    pool.free_blocks(a[::-1])  # freed tail first: block 5 is evicted first
    assert pool.free_queue.block_ids() == [5, 4, 3, 2, 1]
    hit = pool.get_cached_block(0, bytes([1]) * 32)
    assert hit is not None and hit.block_id == 2
    pool.touch([hit])  # a prefix hit leaves the free queue without losing its hash
    assert pool.free_queue.block_ids() == [5, 4, 3, 1]
    new = pool.get_new_blocks(2)
    assert [b.block_id for b in new] == [5, 4]
    assert pool.get_cached_block(0, bytes([4]) * 32) is None, "evicted block must leave the prefix cache"
    assert pool.num_evictions == 2
    pool.free_blocks([hit])
    assert pool.free_queue.block_ids() == [3, 1, 2]


def test_hash_chain_depends_on_prefix_and_salt() -> None:
    h1 = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert h1 == hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert h1 != hash_block(ROOT_HASH, [1, 2, 3, 5])
    assert h1 != hash_block(ROOT_HASH, [1, 2, 3, 4], b"salt")
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(ROOT_HASH, [5, 6, 7, 8])
    r = Request("r", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(), 0.0, cache_salt="t")
    hashes = update_block_hashes(r, 4)
    assert len(hashes) == 2  # the partial third block is never hashed
    assert hashes[0] == hash_block(ROOT_HASH, [1, 2, 3, 4], b"t")
    assert hashes[1] == hash_block(hashes[0], [5, 6, 7, 8])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["alloc", "free", "cache", "touch"]), st.integers(0, 50)), max_size=60)
)
def test_pool_matches_a_plain_model(ops: list[tuple[str, int]]) -> None:
    n = 9
    pool = BlockPool(n)
    refs = {i: 0 for i in range(1, n)}
    order = list(range(1, n))  # model of the free queue, front first
    cached: dict[int, bytes] = {}  # block id -> hash
    held: list[int] = []
    for op, x in ops:
        if op == "alloc":
            k = x % 4
            if k > len(order):
                with pytest.raises(ValueError):
                    pool.get_new_blocks(k)
                continue
            got = [b.block_id for b in pool.get_new_blocks(k)]
            assert got == order[:k]
            del order[:k]
            for b in got:
                refs[b] = 1
                cached.pop(b, None)
            held.extend(got)
        elif op == "free" and held:
            b = held.pop(x % len(held))
            pool.free_blocks([pool.blocks[b]])
            refs[b] -= 1
            if refs[b] == 0:
                order.append(b)
        elif op == "cache" and held:
            b = held[x % len(held)]
            h = bytes([x]) * 32
            if b not in cached and h not in cached.values():
                cached[b] = h
            pool.cache_block(pool.blocks[b], 0, h)
        elif op == "touch" and cached:
            b = sorted(cached)[x % len(cached)]
            blk = pool.get_cached_block(0, cached[b])
            assert blk is not None and blk.block_id == b
            pool.touch([blk])
            if refs[b] == 0:
                order.remove(b)
            refs[b] += 1
            held.append(b)
        assert pool.free_queue.block_ids() == order
        assert all(pool.blocks[b].ref_cnt == r for b, r in refs.items())
        assert {b.block_id: h for h, b in pool.cached[0].items()} == cached
