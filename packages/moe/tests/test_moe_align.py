"""Block alignment invariants: every slot once, one expert per block, padding only at block ends."""

from __future__ import annotations

import pytest
import torch

from treadle_moe.experts.align import align_batched, align_block_size


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"),
    [(1, 8, 1, 16), (7, 8, 2, 16), (100, 64, 8, 32), (33, 128, 4, 64)],
)
def test_align_block_size_invariants(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.rand(tokens, experts, generator=gen).topk(top_k, -1).indices.to(torch.int32)
    al = align_block_size(ids, block_m, experts)
    num_slots = tokens * top_k
    total = int(al.num_tokens_post_padded.item())
    assert total % block_m == 0
    sorted_ids = al.sorted_token_ids[:total]
    valid = sorted_ids[sorted_ids < num_slots]
    assert sorted(valid.tolist()) == list(range(num_slots)), "every slot exactly once"
    assert (al.sorted_token_ids[total:] == num_slots).all(), "only padding past the end"
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=experts)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    for block in range(total // block_m):
        rows = sorted_ids[block * block_m : (block + 1) * block_m]
        rows = rows[rows < num_slots].long()
        assert rows.numel() > 0, "no all-padding block inside the used range"
        assert (flat[rows] == al.expert_ids[block]).all(), "a block holds one expert's slots"
        assert (rows[1:] > rows[:-1]).all(), "token order kept inside an expert"
    assert set(al.expert_ids[: total // block_m].tolist()) == set(flat.tolist()), (
        "experts with no token have no block"
    )


def test_align_batched() -> None:
    counts = torch.tensor([0, 3, 17, 1], dtype=torch.int32)
    al = align_batched(counts, max_tokens=20, block_m=16)
    assert al.num_slots == 80 and al.num_blocks == 8
    slab = al.sorted_token_ids.view(4, 32)
    for e, c in enumerate(counts.tolist()):
        assert slab[e, :c].tolist() == [e * 20 + r for r in range(c)]
        assert (slab[e, c:] == 80).all()
    assert al.expert_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"),
    # one launch up to 64 slots (decode), three beyond
    [(1, 8, 2, 16), (1, 128, 8, 16), (8, 128, 8, 64), (5, 16, 4, 16), (70, 128, 8, 16), (300, 16, 4, 64)],
)
def test_triton_align_equals_torch_align(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(tokens + experts)
    ids = torch.rand(tokens, experts, generator=gen).topk(top_k, -1).indices.to(torch.int32)
    _check_triton_equals_torch(ids, block_m, experts)


def _ids_with_skipped(tokens: int, experts: int, top_k: int, seed: int) -> torch.Tensor:
    """Routed ids [tokens, top_k] where about half the slots are -1 (another rank's expert)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=gen).topk(top_k, -1).indices.to(torch.int32)
    skipped = torch.rand(tokens, top_k, generator=gen) < 0.5
    return torch.where(skipped, torch.full_like(ids, -1), ids)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"), [(1, 8, 2, 16), (9, 8, 4, 16), (100, 64, 8, 32)]
)
def test_align_places_skipped_slots_nowhere(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    ids = _ids_with_skipped(tokens, experts, top_k, tokens)
    ids[0, 0] = -1  # at least one skipped slot
    al = align_block_size(ids, block_m, experts, use_triton=False)
    num_slots = tokens * top_k
    flat = ids.reshape(-1).long()
    kept = (flat >= 0).nonzero().flatten().tolist()
    counts = torch.bincount(flat[flat >= 0], minlength=experts)
    total = int(al.num_tokens_post_padded.item())
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert al.sorted_token_ids.numel() == al.num_blocks * block_m
    sorted_ids = al.sorted_token_ids[:total]
    assert sorted(sorted_ids[sorted_ids < num_slots].tolist()) == kept, "every kept slot once, no skipped one"
    assert (al.sorted_token_ids[total:] == num_slots).all(), "only padding past the end"
    for block in range(total // block_m):
        rows = sorted_ids[block * block_m : (block + 1) * block_m]
        rows = rows[rows < num_slots].long()
        assert (flat[rows] == al.expert_ids[block]).all(), "a block holds one expert's slots"


def _check_triton_equals_torch(ids: torch.Tensor, block_m: int, experts: int) -> None:
    """The Triton alignment of `ids` (on CUDA when there is one, else the interpreter) equals the torch one."""
    if torch.cuda.is_available():
        ids = ids.cuda()
    ref = align_block_size(ids, block_m, experts, use_triton=False)
    got = align_block_size(ids, block_m, experts, use_triton=True)
    assert torch.equal(got.num_tokens_post_padded, ref.num_tokens_post_padded)
    assert torch.equal(got.sorted_token_ids, ref.sorted_token_ids)
    assert torch.equal(got.expert_ids, ref.expert_ids)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"), [(1, 8, 2, 16), (5, 16, 4, 16), (70, 128, 8, 16)]
)
def test_triton_align_skips_like_torch_align(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    pytest.importorskip("triton")
    ids = _ids_with_skipped(tokens, experts, top_k, tokens + 1)
    ids[0, 0] = -1
    _check_triton_equals_torch(ids, block_m, experts)
