"""FlashInfer's XQA decode kernel (TensorRT-LLM's) for the decode-only steps of the ``triton`` backend.

It serves decode-only steps over an e4m3 cache (``--kv-cache-dtype fp8``) on a Hopper GPU (sm_90), where FlashInfer
runs XQA's fp8 kernel (``mha_sm90.cu``: TMA page loads, warp-group MMAs in fp8, so the query and the softmax weights
are rounded to e4m3, as FA3's fp8 path does). Everything else (prefill, chunked prefill, mixed steps, sliding
windows, soft-caps, attention sinks, the fused small-batch decode kernel's batches, 16-bit caches) stays on the
unified Triton kernel.
``TREADLE_ATTN_XQA``: unset, on where it applies when flashinfer-python is installed; ``0`` off; ``1`` on (an
error without flashinfer); ``2`` also 16-bit caches (XQA's generic kernel; slower than Triton's, for measurement).
Unset, a first call that fails (FlashInfer builds XQA with nvcc on first use; a machine may have the package but not
the toolkit) logs a warning and turns XQA off for the process: that step and every later one run on Triton.

The call reads the step's metadata as the Triton kernel does: the decode graph's padding requests (one token of
context on the null block) are attended like real ones and their rows never read; ``seq_lens`` is read as uint32
(values are non-negative), the block table row-wise (page size 16, 32, 64 or 128), and the cache as the two NHD
halves of our ``(2, num_blocks, block_size, nkv, d)`` tensor. The host-side launch depends only on the batch size
and the block table's width (XQA derives its split count from them), so a decode graph captured for a batch size
stays valid as contexts grow. XQA's split reduction counts on semaphores that start at zero and are reset by the
last split: the workspace is allocated zeroed once per metadata builder, before any capture. PDL stays off (the
kernels around it do not use it).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from treadle_kernels.attention.metadata import AttentionMetadata

# semaphores (the first 8 MiB, FlashInfer's split) + scratch for the split partials (~2.4 MiB at 12 splits x 8
# KV heads x 12 sequences, the most XQA splits a batch into on a 132-SM GPU)
WORKSPACE_BYTES = 40 * 1024 * 1024
_PAGE_SIZES = (16, 32, 64, 128)
logger = logging.getLogger(__name__)
_failure: str | None = None  # why XQA was turned off for this process (unset mode, first call failed)


class Unavailable(RuntimeError):
    """XQA could not run this call (unset mode): the caller runs the Triton kernel instead."""


def mode() -> int | None:
    """``TREADLE_ATTN_XQA``: None (unset: where flashinfer is installed), 0 off, 1 e4m3 caches on sm_90, 2 also
    16-bit caches."""
    raw = os.environ.get("TREADLE_ATTN_XQA")
    if raw is None:
        return None
    if raw not in ("0", "1", "2"):
        raise ValueError(
            f"TREADLE_ATTN_XQA={raw!r}: expected 0 (off), 1 (fp8 e4m3 caches) or 2 (every cache)"
        )
    return int(raw)


@functools.cache
def _flashinfer_decode() -> Any:
    try:
        from flashinfer import decode
    except ImportError as exc:
        raise ImportError(
            "TREADLE_ATTN_XQA needs the flashinfer-python package (treadle-kernels[flashinfer]); unset it or "
            "install flashinfer-python."
        ) from exc
    return decode


def _installed() -> bool:
    try:
        _flashinfer_decode()
    except ImportError:
        return False
    return True


def new_workspace(device: torch.device) -> torch.Tensor | None:
    """The zeroed XQA workspace of one metadata builder, or None where XQA never runs (off, not CUDA, or unset
    and either not a Hopper GPU or without flashinfer)."""
    selected = mode()
    if device.type != "cuda" or selected == 0:
        return None
    if selected is None:
        if torch.cuda.get_device_capability(device)[0] != 9 or not _installed():
            return None
    else:
        _flashinfer_decode()  # asked for: fail at start-up, not at the first decode step
    return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def applies(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    workspace: torch.Tensor | None,
) -> bool:
    """Whether XQA serves this call (module docstring)."""
    if (
        workspace is None
        or _failure is not None
        or md.max_query_len != 1
        or not md.causal
        or md.num_actual_tokens != md.num_reqs
    ):
        return False
    if sliding_window is not None or logits_soft_cap is not None or kv_cache.shape[2] not in _PAGE_SIZES:
        return False
    if query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] not in (64, 128, 256):
        return False
    if kv_cache.dtype == torch.float8_e4m3fn:
        return torch.cuda.get_device_capability(query.device)[0] == 9
    return mode() == 2 and kv_cache.dtype == query.dtype


def decode(
    query: torch.Tensor,  # [T, nh, d], T = num_reqs (one token each)
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, nkv, d]
    md: AttentionMetadata,
    output: torch.Tensor,  # [T, nh, d]
    scale: float,
    workspace: torch.Tensor,
) -> torch.Tensor:
    """Attend each request's one query token over its paged cache (new K/V already written) with XQA; raises
    ``Unavailable`` (unset mode) when XQA fails, having turned it off for the process (module docstring)."""
    global _failure
    n = md.num_reqs
    if n == 0:
        return output
    out = output[:n]
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    try:
        _flashinfer_decode().xqa_batch_decode_with_kv_cache(
            query[:n].contiguous(),  # XQA indexes the query densely; ours is a strided view of the qkv buffer
            (kv_cache[0], kv_cache[1]),
            workspace,
            md.block_table[:n],
            md.seq_lens[:n].view(torch.uint32),
            md.block_table.shape[1] * kv_cache.shape[2],
            bmm1_scale=scale,
            bmm2_scale=1.0,
            out=target,
            kv_layout="NHD",
            enable_pdl=False,
        )
    except Exception as exc:
        if mode() is not None:  # asked for explicitly: fail
            raise
        _failure = f"{type(exc).__name__}: {exc}"
        logger.warning("FlashInfer's XQA decode failed (%s); decoding with the Triton kernel from now on "
                       "(TREADLE_ATTN_XQA=0 skips XQA)", _failure)  # fmt: skip
        raise Unavailable(_failure) from exc
    if target is not out:
        out.copy_(target)
    return output
