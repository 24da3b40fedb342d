"""The ``torch`` attention backend: the reference every other backend is tested against.

Runs on any device with plain torch ops, attending in float32 over the paged cache. Requests are cut, in order,
into groups (``plan_groups``); each group is one padded attention call:

* gather every request's context through its block table into ``[n, Lmax, nkv, d]`` (slots at or past a
  request's ``seq_len`` are never read: their index is clamped to slot 0 and the gathered rows are zeroed, so
  NaN or stale values in unwritten cache slots cannot leak in — ``0 * NaN`` would);
* place the queries in ``[n, Qmax, nh, d]`` (query ``j`` of a request sits at position ``seq_len - q_len + j``);
* fold the GQA group into the query axis (``[n, nkv, G * Qmax, d]``: query head ``h`` reads kv head ``h // G``)
  and run one ``scaled_dot_product_attention`` with the boolean mask ``key < seq_len``, causal
  (``key <= query position``) and the sliding window (``key > query position - W``); with a soft-cap or
  attention sinks the logits are materialised instead (SDPA has neither): the sink logit of each query head is
  one more softmax column that weighs no value (``_softmax_with_sinks``). Padded query rows always see at least
  one key, and are dropped.

A group grows while its padded work ``n * Qmax * Lmax`` stays within twice the real work and its gathered
context within ``_MAX_GROUP_TOKENS``; so a decode batch or a batch of equal prompts is one call per layer, and
a long prompt is attended alone, in query chunks of ``_QUERY_CHUNK`` tokens that bound the logits.

On CPU the gathered pages go to a per-thread scratch buffer reused by every layer and step: a fresh
multi-megabyte tensor each call would cost more in page faults than the copy itself.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from treadle_kernels.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    write_kv_cache,
)
from treadle_kernels.attention.metadata import AttentionMetadata

_QUERY_CHUNK = 1024  # query tokens attended at once for a request attended alone (bounds its logits)
_MAX_GROUP_TOKENS = 1 << 15  # padded context tokens gathered at once per group (n * Lmax)
_MAX_WASTE = 2  # a group's padded work n * Qmax * Lmax may be at most this times its real work
_scratch = threading.local()  # .buffers: (dtype, "k" | "v") -> flat CPU tensor reused for gathered pages


def _scratch_pages(kv_part: torch.Tensor, num_pages: int, name: str) -> torch.Tensor:
    """A ``[num_pages, block_size, nkv, d]`` CPU buffer for pages of ``kv_part``, reused across calls."""
    buffers: dict[tuple[torch.dtype, str], torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    page_shape = kv_part.shape[1:]
    need = num_pages * page_shape.numel()
    buf = buffers.get((kv_part.dtype, name))
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=kv_part.dtype)
        buffers[(kv_part.dtype, name)] = buf
    return buf[:need].view(num_pages, *page_shape)


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


def plan_groups(query_lens: list[int], seq_lens: list[int]) -> list[tuple[int, int]]:
    """Cut requests ``[0, n)`` in order into ``[start, end)`` groups attended by one padded call each.

    Requests with no query token this step are skipped (they start no group and end none)."""
    groups: list[tuple[int, int]] = []
    start, q_max, l_max, work = -1, 0, 0, 0
    for i, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if q == 0:
            continue
        if start >= 0:
            n, qm, lm = i - start + 1, max(q_max, q), max(l_max, s)
            if n * lm <= _MAX_GROUP_TOKENS and n * qm * lm <= _MAX_WASTE * (work + q * s):
                q_max, l_max, work = qm, lm, work + q * s
                continue
            groups.append((start, i))
        start, q_max, l_max, work = i, q, s, q * s
    if start >= 0:
        groups.append((start, len(query_lens)))
    return groups


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
        query_lens = [starts[i + 1] - starts[i] for i in range(len(seq_lens))]
        for g_start, g_end in plan_groups(query_lens, seq_lens):
            if g_end - g_start == 1 or query_lens[g_start] > _QUERY_CHUNK:
                for i in range(g_start, g_end):
                    self._forward_one(query, kv_cache, md, i, starts[i], starts[i + 1], seq_lens[i], output)
            else:
                self._forward_group(query, kv_cache, md, starts, query_lens, seq_lens, g_start, g_end, output)
        return output

    def _forward_one(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        i: int,
        q_start: int,
        q_end: int,
        seq_len: int,
        output: torch.Tensor,
    ) -> None:
        """Request ``i`` alone, its queries in chunks of ``_QUERY_CHUNK``."""
        if q_end == q_start:
            return
        k = gather_context(kv_cache[0], md.block_table[i], seq_len).transpose(0, 1).float()  # [nkv, seq, d]
        v = gather_context(kv_cache[1], md.block_table[i], seq_len).transpose(0, 1).float()
        context_len = seq_len - (q_end - q_start)
        for c_start in range(q_start, q_end, _QUERY_CHUNK):
            c_end = min(c_start + _QUERY_CHUNK, q_end)
            q = query[c_start:c_end].transpose(0, 1).float()  # [nh, chunk, d]
            q_pos = torch.arange(c_start - q_start, c_end - q_start, device=q.device) + context_len
            mask = attention_mask(q_pos, seq_len, md.causal, self.sliding_window)
            out = self._attend(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask)  # [1, nh, chunk, d]
            output[c_start:c_end] = out[0].transpose(0, 1).to(output.dtype)

    def _forward_group(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        starts: list[int],
        query_lens: list[int],
        seq_lens: list[int],
        g_start: int,
        g_end: int,
        output: torch.Tensor,
    ) -> None:
        """Requests ``[g_start, g_end)`` padded to ``[n, Qmax | Lmax, ...]``, one attention call."""
        device = query.device
        n = g_end - g_start
        q_max, l_max = max(query_lens[g_start:g_end]), max(seq_lens[g_start:g_end])
        nh, d = query.shape[1], query.shape[2]
        seq = torch.tensor(seq_lens[g_start:g_end], device=device)  # [n]
        q_len = torch.tensor(query_lens[g_start:g_end], device=device)  # [n]
        k_pos = torch.arange(l_max, device=device)
        k_valid = k_pos[None, :] < seq[:, None]  # [n, Lmax]
        block_size = kv_cache.shape[2]
        num_blocks = -(-l_max // block_size)
        blocks = md.block_table[g_start:g_end, :num_blocks]  # [n, num_blocks]
        blocks = torch.where(torch.arange(num_blocks, device=device) * block_size < seq[:, None], blocks, 0)
        first_pad = min(seq_lens[g_start:g_end])  # positions before it are valid in every request
        k = self._gather(kv_cache[0], blocks, l_max, k_valid, first_pad, "k")  # [n, nkv, Lmax, d]
        v = self._gather(kv_cache[1], blocks, l_max, k_valid, first_pad, "v")

        t0, t1 = starts[g_start], starts[g_end]
        if q_max == 1 and t1 - t0 == n:  # decode: one query per request, already in order
            q = query[t0:t1].float().view(n, 1, nh, d)
            token_rows = None
        else:  # token t of request b goes to row b * Qmax + j
            req = torch.repeat_interleave(torch.arange(n, device=device), q_len)
            offsets = torch.tensor(starts[g_start:g_end], device=device)
            j = torch.arange(t0, t1, device=device) - offsets[req]
            token_rows = req * q_max + j
            q = query.new_zeros(n * q_max, nh, d, dtype=torch.float32)
            q[token_rows] = query[t0:t1].float()
            q = q.view(n, q_max, nh, d)
        q_pos = (seq - q_len)[:, None] + torch.arange(q_max, device=device)[None, :]  # [n, Qmax]
        mask = k_valid[:, None, :]  # [n, Qmax, Lmax]
        if md.causal:
            mask = mask & (k_pos[None, None, :] <= q_pos[:, :, None])
        if self.sliding_window is not None:
            mask = mask & (k_pos[None, None, :] > q_pos[:, :, None] - self.sliding_window)
        mask = mask.expand(n, q_max, l_max)

        nkv, group = self.num_kv_heads, self.num_queries_per_kv
        qg = q.view(n, q_max, nkv, group, d).permute(0, 2, 3, 1, 4).reshape(n, nkv, group * q_max, d)
        mg = mask[:, None, None].expand(n, 1, group, q_max, l_max).reshape(n, 1, group * q_max, l_max)
        out = self._attend_folded(qg, k, v, mg)  # [n, nkv, G * Qmax, d]
        out = out.view(n, nkv, group, q_max, d).permute(0, 3, 1, 2, 4).reshape(n * q_max, nh, d)
        if token_rows is not None:
            out = out[token_rows]
        output[t0:t1] = out.to(output.dtype)

    @staticmethod
    def _gather(
        kv_part: torch.Tensor,
        blocks: torch.Tensor,
        l_max: int,
        valid: torch.Tensor,
        first_pad: int,
        name: str,
    ) -> torch.Tensor:
        """Pages ``blocks [n, nb]`` of ``[num_blocks, block_size, nkv, d]`` -> float32 ``[n, nkv, Lmax, d]``.

        Whole pages are copied (block 0 where a request has no page); rows at or past a request's seq_len are
        then zeroed (only positions >= ``first_pad`` can be such rows)."""
        n = blocks.shape[0]
        index = blocks.reshape(-1)
        if kv_part.device.type == "cpu":
            pages = torch.index_select(kv_part, 0, index, out=_scratch_pages(kv_part, index.numel(), name))
        else:
            pages = kv_part.index_select(0, index)  # [n * nb, block_size, nkv, d]
        rows = pages.view(n, -1, kv_part.shape[2], kv_part.shape[3])[:, :l_max].float()  # [n, Lmax, nkv, d]
        if first_pad < l_max:
            rows[:, first_pad:].masked_fill_(~valid[:, first_pad:, None, None], 0.0)
        return rows.transpose(1, 2)

    def _attend_folded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q ``[n, nkv, M, d]`` (M = G * Qmax rows per kv head, row ``g * Qmax + j`` is head ``kv * G + g``),
        k/v ``[n, nkv, L, d]``, mask ``[n, 1, M, L]``."""
        if self.logits_soft_cap is None and self.sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        logits = self._logits(q, k).masked_fill(~mask, float("-inf"))  # [n, nkv, M, L]
        sinks = None
        if self.sinks is not None:  # [nh] -> [nkv, M]: each head's sink on its Qmax rows
            group = self.num_queries_per_kv
            sinks = self.sinks.float().view(self.num_kv_heads, group, 1)
            sinks = sinks.expand(self.num_kv_heads, group, q.shape[2] // group).reshape(self.num_kv_heads, -1)
        return torch.matmul(_softmax_with_sinks(logits, sinks), v)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q ``[1, nh, chunk, d]``, k/v ``[1, nkv, seq_len, d]``, mask ``[chunk, seq_len]`` or None."""
        if self.logits_soft_cap is None and self.sinks is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_queries_per_kv > 1
            )
        group = self.num_queries_per_kv
        qg = q.unflatten(1, (self.num_kv_heads, group))  # [1, nkv, G, chunk, d]
        logits = self._logits(qg, k[:, :, None])  # [1, nkv, G, chunk, seq_len]
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        sinks = None if self.sinks is None else self.sinks.float().view(self.num_kv_heads, group, 1)
        probs = _softmax_with_sinks(logits, sinks)
        return torch.matmul(probs, v[:, :, None]).flatten(1, 2)  # [1, nh, chunk, d]

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``scale * q.k`` over the last two axes (``[..., M, d] x [..., L, d] -> [..., M, L]``), soft-capped."""
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if self.logits_soft_cap is not None:
            cap = self.logits_soft_cap
            logits = torch.tanh(logits / cap) * cap
        return logits


def _softmax_with_sinks(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of ``logits [..., M, L]`` (``-inf`` where masked), with ``sinks`` (float32,
    broadcastable to ``[..., M]``) as one more logit per row that takes probability but weighs no value:
    ``p_j = exp(l_j - m) / (sum_i exp(l_i - m) + exp(sink - m))``, ``m`` the row's max over keys and sink. A row
    whose keys are all masked gives all zeros (the sink takes everything)."""
    if sinks is None:
        return torch.softmax(logits, dim=-1)
    sink_col = sinks.expand(logits.shape[:-1]).unsqueeze(-1)  # [..., M, 1]
    return torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_fp8_kv_cache = True
    supports_sinks = True
    # reads kv_cache[0] / [1] as views, whatever their storage
    supports_shared_kv = True
    builder_cls = AttentionMetadataBuilder
    impl_cls = TorchAttentionImpl
