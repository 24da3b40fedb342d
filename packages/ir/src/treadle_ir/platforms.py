"""The platform dispatch runs on: device kind, name and compute capability.

``treadle_ir.platform`` is the process-wide instance. It is detected lazily, on first attribute access, so
importing treadle_ir never initialises CUDA (engine processes fork after import). Providers' ``supported``
checks receive a :class:`Platform`; tests build fake ones (``Platform(kind="cuda", capability=(9, 0))``) to
exercise those checks without hardware.

Invariant: ``kind`` is one of :data:`PLATFORM_KINDS`; ``capability`` is ``None`` on CPU.
"""

from __future__ import annotations

import platform as _py_platform
from functools import cached_property

import torch

__all__ = ["DEFAULT_PRIORITY", "PLATFORM_KINDS", "Platform", "current_platform"]

PLATFORM_KINDS = ("cpu", "cuda")

# Default provider priority per platform kind; ``native`` is appended when missing. On CPU, where treadle-kernels
# registers them, ``onednn`` (oneDNN's matmul on packed weights) serves the linear ops and ``cpu`` (the specs in
# fewer torch calls, no graph capture needed) the KV-cache write and the in-place rotary; every other op is native.
DEFAULT_PRIORITY: dict[str, tuple[str, ...]] = {
    "cpu": ("onednn", "cpu", "native"),
    "cuda": ("triton", "native"),
}


class Platform:
    """What dispatch needs to know about the machine. Fields given to ``__init__`` override detection."""

    def __init__(
        self,
        kind: str | None = None,
        device_name: str | None = None,
        capability: tuple[int, int] | None = None,
    ) -> None:
        if kind is not None and kind not in PLATFORM_KINDS:
            raise ValueError(f"unknown platform kind {kind!r}; valid kinds: {', '.join(PLATFORM_KINDS)}")
        self._kind = kind
        self._device_name = device_name
        self._capability = capability

    @cached_property
    def kind(self) -> str:
        """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
        if self._kind is not None:
            return self._kind
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    @cached_property
    def device_name(self) -> str:
        """Marketing name of device 0 (``"NVIDIA H100 80GB HBM3"``) or the CPU's processor string."""
        if self._device_name is not None:
            return self._device_name
        if self.kind == "cuda" and self._kind is None:
            return torch.cuda.get_device_name(0)
        return _py_platform.processor() or _py_platform.machine() or "cpu"

    @cached_property
    def capability(self) -> tuple[int, int] | None:
        """CUDA compute capability of device 0, e.g. ``(9, 0)`` for Hopper; ``None`` on CPU."""
        if self._capability is not None:
            return self._capability
        if self.kind == "cuda" and self._kind is None:
            major, minor = torch.cuda.get_device_capability(0)
            return (major, minor)
        return None

    @property
    def device(self) -> torch.device:
        """The torch device tensors of this platform live on."""
        return torch.device("cuda" if self.kind == "cuda" else "cpu")

    def has_capability(self, major: int, minor: int = 0) -> bool:
        """True on CUDA devices of at least compute capability ``major.minor``."""
        return self.capability is not None and self.capability >= (major, minor)

    @property
    def default_priority(self) -> tuple[str, ...]:
        return DEFAULT_PRIORITY[self.kind]

    def __repr__(self) -> str:
        return f"Platform(kind={self.kind!r}, device_name={self.device_name!r}, capability={self.capability})"


_CURRENT = Platform()


def current_platform() -> Platform:
    """The process-wide platform (same object as ``treadle_ir.platform``)."""
    return _CURRENT
