"""Block alignment in three Triton launches (imported lazily: this module imports triton).

Same result as `align.align_block_size` bit for bit (slots of an expert keep token order), without its dozen
torch ops, whose launch cost dominated small batches. The slots are cut into chunks of CHUNK:

1. count:   program c histograms chunk c into chunk_counts[c, :] and fills its share of sorted_token_ids with
            the sentinel.
2. offsets: one program scans chunk_counts down the chunks (exclusive prefix per expert -> chunk_offsets),
            pads each expert's total to BLOCK_M, prefix-sums the padded totals (padded_start,
            num_tokens_post_padded) and writes the expert of every block.
3. scatter: program c places slot s of expert e at padded_start[e] + chunk_offsets[c, e] + (slots of e before
            s inside the chunk).
Experts are padded to E_P2 (a power of two > E) columns; the extra columns count nothing. A slot of expert -1
(expert parallelism: another rank's expert) matches no column and is placed nowhere.

Up to CHUNK slots (decode: top-8 of at most 8 tokens) all three steps run in one program, `_single_kernel`: one
launch instead of three where launches are most of the cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64


@triton.jit
def _fill(ptr, start, end, value, FILL_BLOCK: tl.constexpr):
    """ptr[start:end] = value (int32)."""
    for i in range(start, end, FILL_BLOCK):
        offs = i + tl.arange(0, FILL_BLOCK)
        tl.store(ptr + offs, tl.zeros((FILL_BLOCK,), tl.int32) + value, mask=offs < end)


@triton.jit
def _pad_to_blocks(counts, num_post_ptr, BLOCK_M: tl.constexpr):
    """Each expert's slot count rounded up to BLOCK_M, and their running end; stores the padded total."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    tl.store(num_post_ptr, tl.sum(padded, axis=0))
    return padded, tl.cumsum(padded, axis=0)


@triton.jit
def _store_block_experts(
    expert_ids_ptr, padded_end, num_experts, num_blocks, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr
):
    """expert_ids[b] = the expert whose padded range holds block b (clamped for blocks past the total)."""
    for b0 in range(0, num_blocks, BLOCKS):
        blocks = b0 + tl.arange(0, BLOCKS)
        expert = tl.sum((padded_end[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.minimum(expert, num_experts - 1), mask=blocks < num_blocks)


@triton.jit
def _rank_among_earlier(ids, local):
    """For each slot of a chunk: how many earlier slots of the chunk went to the same expert."""
    earlier = local[None, :] < local[:, None]
    return tl.sum(((ids[:, None] == ids[None, :]) & earlier).to(tl.int32), axis=1)


@triton.jit
def _count_kernel(
    ids_ptr, chunk_counts_ptr, sorted_ids_ptr, num_slots, fill_len, fill_per_program,
    CHUNK: tl.constexpr, E_P2: tl.constexpr, FILL_BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
    bins = tl.arange(0, E_P2)
    counts = tl.sum((ids[:, None] == bins[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + pid * E_P2 + bins, counts)
    start = pid * fill_per_program
    _fill(sorted_ids_ptr, start, tl.minimum(start + fill_per_program, fill_len), num_slots, FILL_BLOCK)


@triton.jit
def _offsets_kernel(
    chunk_counts_ptr, chunk_offsets_ptr, padded_start_ptr, expert_ids_ptr, num_post_ptr,
    num_chunks, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    bins = tl.arange(0, E_P2)
    running = tl.zeros((E_P2,), tl.int32)
    for c0 in range(0, num_chunks, ROWS):
        rows = c0 + tl.arange(0, ROWS)
        mask = rows[:, None] < num_chunks
        tile = tl.load(chunk_counts_ptr + rows[:, None] * E_P2 + bins[None, :], mask=mask, other=0)
        exclusive = tl.cumsum(tile, axis=0) - tile + running[None, :]
        tl.store(chunk_offsets_ptr + rows[:, None] * E_P2 + bins[None, :], exclusive, mask=mask)
        running += tl.sum(tile, axis=0)
    padded, padded_end = _pad_to_blocks(running, num_post_ptr, BLOCK_M)
    tl.store(padded_start_ptr + bins, padded_end - padded)
    _store_block_experts(expert_ids_ptr, padded_end, num_experts, num_blocks, BLOCK_M, BLOCKS)


@triton.jit
def _scatter_kernel(
    ids_ptr, chunk_offsets_ptr, padded_start_ptr, sorted_ids_ptr, num_slots,
    CHUNK: tl.constexpr, E_P2: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    offs = pid * CHUNK + local
    mask = offs < num_slots
    ids = tl.load(ids_ptr + offs, mask=mask, other=-1)
    mask &= ids >= 0  # -1: a skipped slot (another rank's expert), placed nowhere
    rank = _rank_among_earlier(ids, local)
    safe = tl.where(mask, ids, 0)
    base = tl.load(padded_start_ptr + safe, mask=mask, other=0)
    base += tl.load(chunk_offsets_ptr + pid * E_P2 + safe, mask=mask, other=0)
    tl.store(sorted_ids_ptr + base + rank, offs.to(tl.int32), mask=mask)


@triton.jit(do_not_specialize=["num_slots", "num_blocks", "fill_len"])
def _single_kernel(
    ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, num_slots, num_experts, num_blocks, fill_len,
    CHUNK: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, FILL_BLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
):  # fmt: skip
    local = tl.arange(0, CHUNK)
    mask = local < num_slots
    ids = tl.load(ids_ptr + local, mask=mask, other=-1)
    mask &= ids >= 0  # -1: a skipped slot (another rank's expert), placed nowhere
    bins = tl.arange(0, E_P2)
    hit = ids[:, None] == bins[None, :]  # [CHUNK, E_P2]
    padded, padded_end = _pad_to_blocks(tl.sum(hit.to(tl.int32), axis=0), num_post_ptr, BLOCK_M)
    _fill(sorted_ids_ptr, 0, fill_len, num_slots, FILL_BLOCK)
    tl.debug_barrier()  # the sentinel fill lands before the slots overwrite part of it (other threads' stores)
    rank = _rank_among_earlier(ids, local)
    # padded_start of each slot's expert, gathered through the one-hot
    base = tl.sum(tl.where(hit, (padded_end - padded)[None, :], 0), axis=1)
    tl.store(sorted_ids_ptr + base + rank, local.to(tl.int32), mask=mask)
    _store_block_experts(expert_ids_ptr, padded_end, num_experts, num_blocks, BLOCK_M, BLOCKS)


def align_block_size_triton(
    flat_ids: torch.Tensor, block_m: int, num_experts: int, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flat_ids [num_slots] int32 -> (sorted_token_ids [num_blocks * block_m], expert_ids [num_blocks],
    num_tokens_post_padded [1]), all int32."""
    num_slots = flat_ids.numel()
    e_p2 = triton.next_power_of_2(num_experts + 1)
    num_chunks = triton.cdiv(num_slots, CHUNK)
    fill_len = num_blocks * block_m
    if num_chunks == 1:
        buffer = torch.empty(fill_len + num_blocks + 1, dtype=torch.int32, device=flat_ids.device)
        sorted_ids, expert_ids, num_post = torch.split(buffer, [fill_len, num_blocks, 1])
        _single_kernel[(1,)](
            flat_ids, sorted_ids, expert_ids, num_post, num_slots, num_experts, num_blocks, fill_len,
            CHUNK=CHUNK, E_P2=e_p2, BLOCK_M=block_m, FILL_BLOCK=256, BLOCKS=max(1, min(64, 8192 // e_p2)),
        )  # fmt: skip
        return sorted_ids, expert_ids, num_post
    sizes = [num_chunks * e_p2, num_chunks * e_p2, e_p2, fill_len, num_blocks, 1]
    buffer = torch.empty(sum(sizes), dtype=torch.int32, device=flat_ids.device)
    chunk_counts, chunk_offsets, padded_start, sorted_ids, expert_ids, num_post = torch.split(buffer, sizes)
    fill_per_program = triton.cdiv(fill_len, num_chunks)
    _count_kernel[(num_chunks,)](
        flat_ids, chunk_counts, sorted_ids, num_slots, fill_len, fill_per_program,
        CHUNK=CHUNK, E_P2=e_p2, FILL_BLOCK=256,
    )  # fmt: skip
    _offsets_kernel[(1,)](
        chunk_counts, chunk_offsets, padded_start, expert_ids, num_post, num_chunks, num_experts, num_blocks,
        BLOCK_M=block_m, E_P2=e_p2, ROWS=max(1, min(64, 8192 // e_p2)), BLOCKS=max(1, min(64, 8192 // e_p2)),
    )  # fmt: skip
    _scatter_kernel[(num_chunks,)](
        flat_ids, chunk_offsets, padded_start, sorted_ids, num_slots, CHUNK=CHUNK, E_P2=e_p2
    )  # fmt: skip
    return sorted_ids, expert_ids, num_post
