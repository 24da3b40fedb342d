"""Block alignment: lay the (token, k) slots out grouped by expert, each group padded to BLOCK_M.

The fused MoE GEMM walks `sorted_token_ids` in blocks of BLOCK_M rows; every block belongs to one expert
(`expert_ids[block]`), so a program loads one expert's weight tile and multiplies it by up to BLOCK_M rows.

For the standard format a slot is `token * top_k + k`; slots of expert e occupy
`[padded_start[e], padded_start[e] + count[e])`, in token order, and the rest of its padded range holds the
sentinel `num_slots` (masked off by the kernel). Experts with no token occupy no block. A slot whose expert id is -1
(expert parallelism: another rank holds it, treadle_moe/placement.py) is in no block: the GEMMs never touch it.
Only the first `num_tokens_post_padded` entries are meaningful; buffers are sized for the worst case
`num_slots + min(E, num_slots) * (BLOCK_M - 1)` so building them needs no host synchronization (CUDA-graph safe). Everything here is vectorized torch (a scatter-add count, an argsort, cumsums and a searchsorted).

For the batched format, slab e row r is slot `e * max_tokens + r`; every slab gets `cdiv(max_tokens, BLOCK_M)`
blocks, and blocks past `expert_num_tokens[e]` start with the sentinel, so the kernel skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class BlockAlignment:
    sorted_token_ids: (
        torch.Tensor
    )  # [num_blocks * block_m] int32 slot ids grouped by expert; sentinel = num_slots
    expert_ids: torch.Tensor  # [num_blocks] int32 expert owning each block
    num_tokens_post_padded: torch.Tensor  # [1] int32 meaningful prefix of sorted_token_ids
    num_slots: int  # valid slot ids are < num_slots
    block_m: int  # rows per block

    @property
    def num_blocks(self) -> int:
        return self.expert_ids.numel()


def count_per_expert(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[num_slots] int64 expert ids -> [E] int64 slot counts (a scatter-add: unlike torch.bincount it never
    synchronizes with the host, so it can be captured in a CUDA graph)."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))


def align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int, use_triton: bool | None = None
) -> BlockAlignment:
    """Standard format: topk_ids [M, top_k] -> slots grouped by expert and padded to block_m.

    use_triton: three Triton launches (align_triton.py) instead of a dozen torch ops; None = on CUDA.
    """
    device = topk_ids.device
    num_slots = topk_ids.numel()
    max_padded = num_slots + min(num_experts, num_slots) * (block_m - 1)
    num_blocks = -(-max_padded // block_m)
    if use_triton is None:
        use_triton = topk_ids.is_cuda
    if use_triton and num_slots > 0:
        from treadle_moe.experts.align_triton import align_block_size_triton

        flat32 = topk_ids.reshape(-1).to(torch.int32)
        sorted_ids, expert_ids, num_post = align_block_size_triton(flat32, block_m, num_experts, num_blocks)
        return BlockAlignment(sorted_ids, expert_ids, num_post, num_slots, block_m)
    flat = topk_ids.reshape(-1).long()  # [num_slots] expert of each slot
    # a skipped slot (-1: another rank's expert) counts in an extra bin E, whose slots land past the blocks
    flat = torch.where(flat < 0, num_experts, flat)
    counts_all = count_per_expert(flat, num_experts + 1)  # [E + 1]
    counts = counts_all[:num_experts]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E] rows reserved per expert
    padded_end = torch.cumsum(padded, 0)  # [E] inclusive
    padded_start = torch.cat([padded_end - padded, padded.new_full((1,), num_blocks * block_m)])  # [E + 1]
    order = torch.argsort(flat, stable=True)  # slots by expert, token order kept
    sorted_expert = flat[order]
    rank = torch.arange(num_slots, device=device) - (torch.cumsum(counts_all, 0) - counts_all)[sorted_expert]
    # [num_blocks * block_m + num_slots]: the tail holds the skipped slots and is cut off
    sorted_token_ids = torch.full(
        (num_blocks * block_m + num_slots,), num_slots, dtype=torch.int32, device=device
    )
    sorted_token_ids[padded_start[sorted_expert] + rank] = order.to(torch.int32)
    sorted_token_ids = sorted_token_ids[: num_blocks * block_m]
    block_starts = torch.arange(num_blocks, device=device) * block_m
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return BlockAlignment(
        sorted_token_ids=sorted_token_ids,
        expert_ids=expert_ids.to(torch.int32),
        num_tokens_post_padded=padded_end[-1:].to(torch.int32),
        num_slots=num_slots,
        block_m=block_m,
    )


def align_batched(expert_num_tokens: torch.Tensor, max_tokens: int, block_m: int) -> BlockAlignment:
    """Batched format: slabs [E, max_tokens] with expert_num_tokens valid rows -> fixed per-slab blocks."""
    device = expert_num_tokens.device
    num_experts = expert_num_tokens.numel()
    blocks_per_expert = -(-max_tokens // block_m)
    rows = torch.arange(blocks_per_expert * block_m, device=device)  # [nb * block_m]
    slot = torch.arange(num_experts, device=device)[:, None] * max_tokens + rows[None, :]  # [E, nb * block_m]
    valid = rows[None, :] < expert_num_tokens.long()[:, None]
    num_slots = num_experts * max_tokens
    sorted_token_ids = torch.where(valid, slot, num_slots).to(torch.int32).reshape(-1)
    expert_ids = torch.arange(num_experts, device=device, dtype=torch.int32).repeat_interleave(
        blocks_per_expert
    )
    total = torch.full((1,), sorted_token_ids.numel(), dtype=torch.int32, device=device)
    return BlockAlignment(sorted_token_ids, expert_ids, total, num_slots, block_m)
