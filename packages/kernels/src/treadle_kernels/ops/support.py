"""When a Triton provider may run: the static platform check and the shared per-call argument checks.

Static: Triton must be importable, and either the platform is CUDA or Triton's interpreter is on (CPU tests).
Per call (cheap, attribute reads only): tensors on CUDA (or on CPU under the interpreter), a supported
dtype, unit stride in the last dim. Each check returns ``True`` or a reason string for the dispatch report.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from treadle_ir import Platform

from .. import envs

__all__ = ["FLOAT_DTYPES", "check_tensor", "next_pow2", "rows_view", "triton_supported"]

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def interpreter_on() -> bool:
    return envs.TRITON_INTERPRET()


def triton_supported(platform: Platform) -> bool | str:
    if not _triton_installed():
        return "triton is not installed (pip install triton)"
    if platform.is_cuda:
        if not platform.has_capability(7, 0):
            return f"Triton kernels need compute capability >= 7.0, device has {platform.capability}"
        return True
    if interpreter_on():
        return True
    return f"{platform.kind} platform: Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests)"


def check_tensor(t: torch.Tensor, name: str, dtypes: frozenset[torch.dtype] = FLOAT_DTYPES) -> str | None:
    """``None`` when Triton can read ``t``, else the reason."""
    if not t.is_cuda and not (t.device.type == "cpu" and interpreter_on()):
        return f"{name} is on {t.device}, Triton needs CUDA tensors"
    if t.dtype not in dtypes:
        return f"{name} dtype {t.dtype} not supported"
    if t.dim() > 0 and t.stride(-1) != 1:
        return f"{name} last dim is strided ({t.stride(-1)})"
    return None


def rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a 2-D [rows, last] view without copying, or ``None`` when its layout does not allow it."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
