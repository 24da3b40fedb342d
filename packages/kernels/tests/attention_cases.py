"""Random paged-attention batches for the attention tests, and a dense float64 reference.

A case is a list of ``(context_len, query_len)`` requests: ``context_len`` tokens are already in the paged cache,
``query_len`` new tokens arrive this step (prefill: context 0; decode: query 1; chunked prefill: both > 0).
Physical blocks are a random permutation of the pool (non-contiguous, shuffled block tables); unused cache slots
hold NaN so a kernel that reads outside a request's context is caught.

``cache_dtype`` (fp8): the cache holds K/V in that dtype at unit scale. Every key and value of the case is then an
exact fp8 value (cast there and back), so writing it to the cache loses nothing and the dense reference still
holds; the CPU interpreter narrows to fp8 without round-to-nearest-even, so only exact values compare bit-for-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from treadle_kernels.attention import AttentionMetadata

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}  # the fp8 cache dtypes, by test id


@dataclass
class Case:
    query: torch.Tensor  # [T, nh, d] (T may include padding)
    key: torch.Tensor  # [T, nkv, d] new keys
    value: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, nkv, d], context already written
    metadata: AttentionMetadata
    full_keys: list[torch.Tensor]  # per request [seq_len, nkv, d]: context + new
    full_values: list[torch.Tensor]


def make_case(
    requests: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_padding: int = 0,
    causal: bool = True,
    cache_dtype: torch.dtype | None = None,
) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    def rand_kv(*shape: int) -> torch.Tensor:
        x = rand(*shape)
        return x if cache_dtype is None else x.to(cache_dtype).to(dtype)

    seq_lens = [c + q for c, q in requests]
    blocks_per_req = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_req) + 1
    block_table = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    cursor = 0
    for i, nb in enumerate(blocks_per_req):
        block_table[i, :nb] = perm[cursor : cursor + nb].to(torch.int32)
        cursor += nb
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    kv_cache = kv_cache.to(device=device, dtype=cache_dtype or dtype)
    store = kv_cache.view(torch.uint8) if cache_dtype is not None else kv_cache  # fp8 has no index_put on CPU
    flat_k = store[0].view(-1, num_kv_heads, head_dim)
    flat_v = store[1].view(-1, num_kv_heads, head_dim)

    def as_stored(x: torch.Tensor) -> torch.Tensor:
        return x if cache_dtype is None else x.to(cache_dtype).view(torch.uint8)

    full_keys, full_values, queries, new_k, new_v, slots = [], [], [], [], [], []
    for i, (ctx, qlen) in enumerate(requests):
        seq_len = ctx + qlen
        k, v = rand_kv(seq_len, num_kv_heads, head_dim), rand_kv(seq_len, num_kv_heads, head_dim)
        full_keys.append(k)
        full_values.append(v)
        pos = torch.arange(seq_len)
        slot = block_table[i, pos // block_size].long() * block_size + pos % block_size
        flat_k[slot[:ctx].to(device)] = as_stored(k[:ctx])
        flat_v[slot[:ctx].to(device)] = as_stored(v[:ctx])
        queries.append(rand(qlen, num_heads, head_dim))
        new_k.append(k[ctx:])
        new_v.append(v[ctx:])
        slots.append(slot[ctx:])
    queries.append(rand(num_padding, num_heads, head_dim))
    new_k.append(rand_kv(num_padding, num_kv_heads, head_dim))
    new_v.append(rand_kv(num_padding, num_kv_heads, head_dim))
    slots.append(torch.full((num_padding,), -1, dtype=torch.long))

    query_lens = torch.tensor([q for _, q in requests], dtype=torch.int32)
    query_start_loc = torch.zeros(len(requests) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(query_lens, 0)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    metadata = AttentionMetadata(
        num_actual_tokens=int(query_start_loc[-1]),
        max_query_len=int(query_lens.max()),
        max_seq_len=max(seq_lens),
        query_start_loc=query_start_loc.to(device),
        query_start_loc_cpu=query_start_loc,
        seq_lens=seq_lens_t.to(device),
        seq_lens_cpu=seq_lens_t,
        block_table=block_table.to(device),
        slot_mapping=torch.cat(slots).to(device),
        causal=causal,
    )
    # query, key and value are views of one fused [T, (nh + 2 nkv) d] buffer, as the models pass them (the
    # slices of the qkv projection, rows strided by the fused width): every backend must read strided rows
    q, k, v = torch.cat(queries), torch.cat(new_k), torch.cat(new_v)
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    q_view, k_view, v_view = qkv.split([q[0].numel(), k[0].numel(), v[0].numel()], dim=1)
    return Case(
        q_view.unflatten(1, q.shape[1:]), k_view.unflatten(1, k.shape[1:]), v_view.unflatten(1, v.shape[1:]),
        kv_cache, metadata, full_keys, full_values,
    )  # fmt: skip


def dense_reference(
    case: Case,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 attention straight from the per-request K/V (no cache), ``[num_actual_tokens, nh, d]``.

    ``sinks [nh]``: each head's sink logit joins the softmax as a column with no value (gpt-oss)."""
    md = case.metadata
    outs = []
    starts = md.query_start_loc_cpu.tolist()
    for i, (k, v) in enumerate(zip(case.full_keys, case.full_values, strict=True)):
        q = case.query[starts[i] : starts[i + 1]].double().cpu()  # [q_len, nh, d]
        k, v = k.double().cpu(), v.double().cpu()
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q, k) * scale
        if soft_cap is not None:
            logits = soft_cap * torch.tanh(logits / soft_cap)
        seq_len, q_len = k.shape[0], q.shape[0]
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        allowed = torch.ones(q_len, seq_len, dtype=torch.bool)
        if md.causal:
            allowed &= k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        logits = logits.masked_fill(~allowed, float("-inf"))
        if sinks is None:
            probs = torch.softmax(logits, -1)
        else:
            # p_j = exp(l_j - m) / (sum_i exp(l_i - m) + exp(sink - m)), m the max over the keys and the sink
            sink = sinks.double().cpu()[:, None, None]  # [nh, 1, 1]
            m = torch.cat([logits, sink.expand(-1, q_len, 1)], -1).amax(-1, keepdim=True)
            e = torch.exp(logits - m)
            probs = e / (e.sum(-1, keepdim=True) + torch.exp(sink - m))
        outs.append(torch.einsum("hqk,khd->qhd", probs, v))
    return torch.cat(outs)
