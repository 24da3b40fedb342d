"""When a Triton provider may run: the static platform check and the shared per-call argument checks.

Static: Triton must be importable, and either the platform is CUDA or Triton's interpreter is on (CPU tests).
Per call (cheap, attribute reads only): tensors on CUDA (or on CPU under the interpreter), a supported
dtype, unit stride in the last dim. Each check returns ``True`` or a reason string for the dispatch report.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

from treadle_ir import Platform

from .. import envs

__all__ = [
    "FLOAT_DTYPES", "check_tensor", "compile_ahead", "next_pow2", "num_sms", "pdl_enabled", "rows_view",
    "triton_supported",
]  # fmt: skip

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def interpreter_on() -> bool:
    return envs.TRITON_INTERPRET()


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device `device_index`."""
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch: asked for (``TREADLE_PDL``) and the device is Hopper or newer."""
    return device.type == "cuda" and envs.PDL() and torch.cuda.get_device_capability(device)[0] >= 9


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


def row_count(x: torch.Tensor) -> int:
    """How many rows of its last dimension ``x`` holds (0 for an empty last dimension)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


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


def compile_ahead(
    fn: Any,
    constexprs: dict[str, Any],
    pointers: dict[str, str],
    floats: tuple[str, ...] = (),
    default_pointer: str = "*bf16",
    target: tuple[str, int, int] = ("cuda", 90, 32),
    divisible_by_16: tuple[str, ...] = (),
    options: dict[str, Any] | None = None,
) -> Any:
    """Compile the Triton kernel ``fn`` for ``target`` (backend, arch, warp size) without a GPU: the front end
    and ptxas run as on the device, so a kernel the interpreter accepts but the compiler rejects fails here.
    The signature comes from parameter names: ``*_ptr`` are pointers (``pointers[name]``, else
    ``default_pointer``), ``constexprs`` are given (constexpr parameters not given keep their defaults),
    ``floats`` are fp32 scalars, everything else is i32. ``divisible_by_16`` names the arguments a launch would
    specialise as multiples of 16 (pointers and strides, as Triton does on the device: the generated code
    depends on it); ``options`` are compile options (``num_warps``, ``num_stages``). Returns the compiled
    kernel (``.asm["cubin"]``, ``.metadata``)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    sig = {}
    params = inspect.signature(fn.fn).parameters
    constexpr = {n: p.default for n, p in params.items() if "constexpr" in str(p.annotation)}
    defaults = {n: d for n, d in constexpr.items() if d is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}
    for name in params:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, default_pointer)
        else:
            sig[name] = "fp32" if name in floats else "i32"
    names = list(params)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16}
    source = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget(*target), options=options)
