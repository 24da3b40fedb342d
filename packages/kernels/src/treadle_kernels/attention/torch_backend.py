"""The ``torch`` attention backend: the reference every other backend is tested against.

Runs on any device with plain torch ops. For each request (a Python loop over requests, never over tokens) it
gathers the request's context from the paged cache through its block table (``[seq_len, nkv, d]``), builds the
mask of ``metadata.py`` (causal with the query offset ``seq_len - query_len``, optional sliding window) and attends
in float32. Without a soft-cap it uses ``scaled_dot_product_attention`` (fast on CPU); with one it materialises
the logits. Long queries are processed in chunks of ``_QUERY_CHUNK`` tokens so the logits stay bounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treadle_kernels.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    write_kv_cache,
)
from treadle_kernels.attention.metadata import AttentionMetadata

_QUERY_CHUNK = 1024  # query tokens attended at once per request (bounds the [nh, chunk, seq_len] logits)


def gather_context(kv_cache_part: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[num_blocks, block_size, nkv, d]`` paged cache + a request's block ids -> ``[seq_len, nkv, d]``."""
    block_size = kv_cache_part.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    pages = kv_cache_part.index_select(0, blocks[:num_blocks].long())  # [num_blocks, block_size, nkv, d]
    return pages.flatten(0, 1)[:seq_len]


def attention_mask(
    q_pos: torch.Tensor, seq_len: int, causal: bool, sliding_window: int | None
) -> torch.Tensor | None:
    """Boolean ``[num_queries, seq_len]`` mask (True = attend) for queries at absolute positions ``q_pos``."""
    if not causal and sliding_window is None:
        return None
    k_pos = torch.arange(seq_len, device=q_pos.device)
    mask = torch.ones(q_pos.shape[0], seq_len, dtype=torch.bool, device=q_pos.device)
    if causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


class TorchAttentionImpl(AttentionImpl):
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        md = attn_metadata
        write_kv_cache(key, value, kv_cache, md.slot_mapping)
        starts = md.query_start_loc_cpu.tolist()
        seq_lens = md.seq_lens_cpu.tolist()
        for i, seq_len in enumerate(seq_lens):
            q_start, q_end = starts[i], starts[i + 1]
            if q_end == q_start:
                continue
            k = gather_context(kv_cache[0], md.block_table[i], seq_len)  # [seq_len, nkv, d]
            v = gather_context(kv_cache[1], md.block_table[i], seq_len)
            k = k.transpose(0, 1).float()  # [nkv, seq_len, d]
            v = v.transpose(0, 1).float()
            context_len = seq_len - (q_end - q_start)
            for c_start in range(q_start, q_end, _QUERY_CHUNK):
                c_end = min(c_start + _QUERY_CHUNK, q_end)
                q = query[c_start:c_end].transpose(0, 1).float()  # [nh, chunk, d]
                q_pos = torch.arange(c_start - q_start, c_end - q_start, device=q.device) + context_len
                mask = attention_mask(q_pos, seq_len, md.causal, self.sliding_window)
                out = self._attend(q, k, v, mask)  # [nh, chunk, d]
                output[c_start:c_end] = out.transpose(0, 1).to(output.dtype)
        return output

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.logits_soft_cap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_queries_per_kv > 1
            )
        group = self.num_queries_per_kv
        qg = q.unflatten(0, (self.num_kv_heads, group))  # [nkv, G, chunk, d]
        logits = torch.matmul(qg, k[:, None].transpose(-1, -2)) * self.scale  # [nkv, G, chunk, seq_len]
        cap = self.logits_soft_cap
        logits = torch.tanh(logits / cap) * cap
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.matmul(probs, v[:, None]).flatten(0, 1)  # [nh, chunk, d]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    builder_cls = AttentionMetadataBuilder
    impl_cls = TorchAttentionImpl
