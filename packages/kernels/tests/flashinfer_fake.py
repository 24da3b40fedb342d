"""A CPU stand-in for the flashinfer module (no tests here): checks the backend's glue without a GPU.

``FakeWrapper`` plays both paged wrappers. Like FlashInfer's (flashinfer/decode.py, 0.6.18.post1), in graph mode
(``use_cuda_graph=True``) it fixes the batch size to ``len(paged_kv_last_page_len_buffer)``, ``plan`` copies the
page table into the caller's buffers, and ``run`` reads those buffers, so a "replay" (``run`` without a new
``plan``) sees whatever the last ``plan`` wrote there, as a captured kernel would.
"""

from __future__ import annotations

import types
from typing import Any

import torch


class FakeWrapper:
    plans = 0  # plan() calls, all wrappers together

    def __init__(
        self,
        workspace: torch.Tensor,
        kv_layout: str,
        use_cuda_graph: bool = False,
        use_tensor_cores: bool = False,
        paged_kv_indptr_buffer: torch.Tensor | None = None,
        paged_kv_indices_buffer: torch.Tensor | None = None,
        paged_kv_last_page_len_buffer: torch.Tensor | None = None,
    ) -> None:
        assert kv_layout == "NHD"
        self.use_cuda_graph = use_cuda_graph
        self.use_tensor_cores = use_tensor_cores
        if use_cuda_graph:
            assert paged_kv_indptr_buffer is not None and paged_kv_indices_buffer is not None
            assert paged_kv_last_page_len_buffer is not None
            assert len(paged_kv_indptr_buffer) == len(paged_kv_last_page_len_buffer) + 1
        self.indptr_buf = paged_kv_indptr_buffer
        self.indices_buf = paged_kv_indices_buffer
        self.last_buf = paged_kv_last_page_len_buffer
        self.p: dict[str, Any] = {}

    def plan(self, *args: Any, **kw: Any) -> None:
        type(self).plans += 1
        if len(args) == 7:  # decode: indptr, indices, last_page_len, nh, nkv, d, page_size
            indptr, indices, last, *_ = args
            qo = torch.arange(len(last) + 1, dtype=torch.int32)
        else:
            qo, indptr, indices, last, *_ = args
        if self.use_cuda_graph:
            assert self.indptr_buf is not None and self.indices_buf is not None and self.last_buf is not None
            assert len(last) == len(self.last_buf), "graph mode: the batch size is fixed per wrapper"
            assert len(indices) <= len(self.indices_buf), "graph mode: indices must fit the buffer"
            self.indptr_buf.copy_(indptr)
            self.last_buf.copy_(last)
            self.indices_buf[: len(indices)].copy_(indices)
            indptr, indices, last = self.indptr_buf, self.indices_buf, self.last_buf  # run reads the buffers
        self.p = dict(qo=qo.cpu(), indptr=indptr, indices=indices, last=last, page=args[-1], **kw)

    def run(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        p, (k_cache, v_cache) = self.p, kv
        if self.use_cuda_graph:
            assert q.shape[0] == len(p["last"]), "graph mode: one query per request of the fixed batch"
        for i in range(len(p["last"])):
            pages = p["indices"][int(p["indptr"][i]) : int(p["indptr"][i + 1])].long()
            kv_len = (len(pages) - 1) * p["page"] + int(p["last"][i])
            k = k_cache[pages].flatten(0, 1)[:kv_len].float()
            v = v_cache[pages].flatten(0, 1)[:kv_len].float()
            q0, q1 = int(p["qo"][i]), int(p["qo"][i + 1])
            group = q.shape[1] // k.shape[1]
            logits = (
                torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k.repeat_interleave(group, 1)) * p["sm_scale"]
            )
            if p["logits_soft_cap"]:
                logits = p["logits_soft_cap"] * torch.tanh(logits / p["logits_soft_cap"])
            q_pos = torch.arange(kv_len - (q1 - q0), kv_len)[:, None]
            k_pos = torch.arange(kv_len)[None, :]
            ok = k_pos <= q_pos if p.get("causal", True) else torch.ones_like(k_pos <= q_pos)
            if p["window_left"] >= 0:
                ok &= k_pos >= q_pos - p["window_left"]
            probs = torch.softmax(logits.masked_fill(~ok, float("-inf")), -1)
            out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, 1)).to(out.dtype)
        return out


def fake_flashinfer() -> types.SimpleNamespace:
    """A module-like object with both wrapper classes (monkeypatch ``_import_flashinfer`` to return it)."""
    return types.SimpleNamespace(
        BatchDecodeWithPagedKVCacheWrapper=FakeWrapper, BatchPrefillWithPagedKVCacheWrapper=FakeWrapper
    )
