"""Workspace manager: scratch buffers reused across MoE layers and steps.

The expert GEMMs need large temporaries (M * top_k rows of N or K columns). Allocating them per layer per step
churns the caching allocator and breaks CUDA-graph capture, so every modular kernel borrows them from one
manager: a named byte buffer per (name, device) that only ever grows, viewed with the requested dtype and
shape. Invariants: a view is valid until the next `get` of the same name (layers run one after another, so a
layer's scratch is dead before the next layer asks); different names never alias; a buffer never shrinks, so
warming up with the largest batch before CUDA-graph capture means capture allocates nothing. A buffer that grows
is replaced but kept alive (`retired`): a CUDA graph captured earlier still reads and writes the old one at every
replay (decode graphs and piecewise graphs are captured at different sizes, in either order), and freeing it would
hand that memory to other tensors. Never return a workspace view to the caller of a layer.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)


class WorkspaceManager:
    """Grow-only named scratch buffers, one set per device."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}  # (name, device) -> uint8 storage
        self.retired: list[torch.Tensor] = []  # outgrown buffers, kept for the CUDA graphs captured on them

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A `shape`/`dtype` view of buffer `name` on `device`, growing the buffer if it is too small."""
        device = torch.device(device)
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        key = (name, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            logger.debug("workspace %r on %s grows to %d bytes", name, device, nbytes)
            if buffer is not None:
                self.retired.append(buffer)
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._buffers[key] = buffer
        return buffer[:nbytes].view(dtype).view(shape)

    @property
    def num_bytes(self) -> int:
        """Bytes held across all buffers and devices (outgrown ones included)."""
        return sum(buffer.numel() for buffer in (*self._buffers.values(), *self.retired))

    def clear(self) -> None:
        self._buffers.clear()
        self.retired.clear()


_default_manager = WorkspaceManager()


def default_workspace_manager() -> WorkspaceManager:
    """The process-wide manager every FusedMoE layer shares unless given its own."""
    return _default_manager
