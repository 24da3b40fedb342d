"""Choosing an attention backend by name or by platform.

``None`` / ``"auto"`` picks per device: CUDA -> ``triton`` (FlashInfer is opt-in until measurements say
otherwise), anything else -> ``torch``. Backend modules are imported only when chosen, so asking for ``torch`` never
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
