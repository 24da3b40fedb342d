"""Choosing an attention backend by name or by platform.

``None`` / ``"auto"`` picks per device: CUDA -> ``triton``, anything else -> ``torch``. The CUDA default is measured
(H200, Llama-3.1-8B heads, bf16, both replayed from CUDA graphs; benchmarks/results/attention-h200-911d150.json):
Triton's decode is 1.4-2.0x faster than FlashInfer's graph-mode decode at batch 1/64/256 and 1k/4k context (4.2-4.3
against 2.8-3.0 TB/s of KV read at batch 256), and 2.6x faster on a mixed prefill + decode step; FlashInfer's
prefill is 1.9x faster (430 against 223 TFLOP/s at 4 x 2048), but attention is a few percent of a prefill step's
FLOPs. FlashInfer stays available with ``--attention-backend flashinfer``. Backend modules are imported only when chosen, so asking for ``torch`` never
imports triton and ``flashinfer`` fails with an install hint only when requested.
"""

from __future__ import annotations

import importlib
import logging

import torch

from treadle_kernels.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)

# name -> (module, class); modules are imported lazily
_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("treadle_kernels.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("treadle_kernels.attention.triton_backend", "TritonAttentionBackend"),
    "flashinfer": ("treadle_kernels.attention.flashinfer_backend", "FlashInferAttentionBackend"),
}


def available_backend_names() -> list[str]:
    return list(_BACKENDS)


def default_backend_name(device: torch.device | str) -> str:
    return "triton" if torch.device(device).type == "cuda" else "torch"


def get_attn_backend(name: str | None, device: torch.device | str) -> type[AttentionBackend]:
    """The backend class called ``name`` (``None`` or ``"auto"``: the platform default for ``device``)."""
    device = torch.device(device)
    chosen = default_backend_name(device) if name in (None, "auto") else str(name).lower()
    if chosen not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; valid choices: {', '.join(['auto', *_BACKENDS])} "
            "(set --attention-backend to one of them)."
        )
    if chosen == "flashinfer" and device.type != "cuda":
        raise ValueError(
            f"attention backend 'flashinfer' needs a CUDA device, got {device}; use 'torch' on {device.type}."
        )
    if chosen == "triton" and device.type != "cuda":
        logger.warning("attention backend 'triton' on %s runs only under TRITON_INTERPRET=1 (slow)", device)
    module_name, class_name = _BACKENDS[chosen]
    backend: type[AttentionBackend] = getattr(importlib.import_module(module_name), class_name)
    logger.info("attention backend: %s (device %s)", backend.name, device)
    return backend
