"""The persistent one-row linear kernel (linear_stream_kernels) against the fused linear ops' native specs.

CPU: Triton's interpreter at tiny, ragged sizes: n not a multiple of BLOCK_N (a partial last output tile), k not
a multiple of BLOCK_K (a partial last k tile), and fewer, as many and more programs than output tiles (several
tiles per program, one each, idle programs). Every prologue, with and without bias; tolerances as
test_ir_providers_linear (the same rounding as the existing kernel). And the point of the kernel, on CPU too:
compiled for sm_90, its loop is software-pipelined (the weight tiles are copied ahead with cp.async).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_ir_providers import _poison_allocator
from test_ir_providers_linear import _close, _inputs

from treadle_ir import ops

pytest.importorskip("triton")

from treadle_kernels.ops.linear_stream_kernels import launch_stream  # imports triton

BLOCK_N, BLOCK_K = 8, 64
_PLAIN, _NORM, _SILU, _GELU_TANH = 0, 1, 2, 3
DTYPES = [torch.float32, torch.bfloat16]


def _native(prologue: int, t: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = t["weight"], t["bias"]
    if prologue == _PLAIN:
        return F.linear(t["x"], w, b), None
    if prologue == _NORM:
        return ops.add_rms_norm_linear.native(t["x"], t["residual"], t["norm_weight"], 1e-6, w, b)
    native = ops.silu_and_mul_linear.native if prologue == _SILU else ops.gelu_tanh_and_mul_linear.native
    return native(t["gated"], w, b), None


def _stream(prologue: int, t: dict, k: int, num_programs: int, peel: bool = False) -> tuple:
    _poison_allocator()
    x = t["gated"] if prologue in (_SILU, _GELU_TANH) else t["x"]
    norm = {"residual": t["residual"], "norm_weight": t["norm_weight"], "epsilon": 1e-6}
    return launch_stream(
        prologue, x, k, t["weight"], t["bias"], BLOCK_N, BLOCK_K, 4, 3, num_programs,
        **(norm if prologue == _NORM else {}), peel=peel,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("prologue", [_PLAIN, _NORM, _SILU, _GELU_TANH])
@pytest.mark.parametrize("num_programs", [2, 5, 9])  # n = 37: 5 output tiles of BLOCK_N = 8
@pytest.mark.parametrize("peel", [False, True])  # the first tile before the loop, as the PDL launch runs it
def test_stream_matches_native(
    prologue: int, bias: bool, dtype: torch.dtype, num_programs: int, peel: bool
) -> None:
    n, k = 37, 150  # 150 = 2 full k tiles of 64 and a partial one
    t = _inputs((1,), n, k, dtype, bias, seed=100 * prologue + 10 * num_programs + int(bias))
    got, residual_out = _stream(prologue, t, k, num_programs, peel)
    expected, expected_residual = _native(prologue, t)
    assert got.shape == (1, n)
    _close(got, expected, dtype)
    if prologue == _NORM:
        assert residual_out is not None and expected_residual is not None
        _close(residual_out, expected_residual, dtype)  # x + residual, stored once by program 0
    else:
        assert residual_out is None


def test_one_k_tile_and_leading_dims() -> None:
    """k below one BLOCK_K (every tile is its own last k tile) and x with leading dims [1, 1, k]."""
    n, k = 19, 40
    t = _inputs((1, 1), n, k, torch.bfloat16, True, seed=3)
    for prologue in (_PLAIN, _NORM, _SILU):
        got, _ = _stream(prologue, t, k, num_programs=2)
        assert got.shape == (1, 1, n)
        _close(got, _native(prologue, t)[0], torch.bfloat16)


def test_rejects_several_rows() -> None:
    t = _inputs((2,), 8, 64, torch.float32, False, seed=0)
    with pytest.raises(ValueError, match="one row"):
        launch_stream(_PLAIN, t["x"], 64, t["weight"], None, BLOCK_N, BLOCK_K, 4, 3, 2)


def test_zero_rows() -> None:
    t = _inputs((0,), 8, 64, torch.float32, False, seed=0)
    out, _ = launch_stream(_PLAIN, t["x"], 64, t["weight"], None, BLOCK_N, BLOCK_K, 4, 3, 2)
    assert out.shape == (0, 8)


_SM90 = """
import inspect, triton
from triton.backends.compiler import GPUTarget
from treadle_kernels.ops.linear_stream_kernels import stream_linear_kernel as fn
names = list(inspect.signature(fn.fn).parameters)
import sys
constexprs = {"PROLOGUE": 1, "HAS_BIAS": True, "BLOCK_N": 8, "BLOCK_K": 2048, "NUM_STAGES": 3,
              "USE_PDL": sys.argv[1] == "pdl", "PEEL": sys.argv[1] == "pdl"}
sig = {p: "constexpr" if p in constexprs else "*bf16" if p.endswith("_ptr") else "fp32" if p == "epsilon"
       else "i32" for p in names}
div16 = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(names) if p.endswith("_ptr") or p == "k"}
src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=div16)
asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm
print(asm["ttgir"])
print(*(line for line in asm["ptx"].splitlines() if "griddepcontrol" in line))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's compiler ships for Linux")
@pytest.mark.parametrize("pdl", ["pdl", "plain"])
def test_weight_loads_are_pipelined_on_sm90(pdl: str) -> None:
    """Compiled for Hopper without a GPU (outside the interpreter, k divisible by 16 as the JIT specialises
    4096): the [BLOCK_N, BLOCK_K] weight tile is an async copy to shared memory, issued ahead of the loop and in
    it. Without ``tl.range(num_stages=...)`` Triton would leave this loop (no dot) unpipelined. With PDL too
    (the first tile requested before the wait, outside the loop)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _SM90, pdl], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("griddepcontrol" in proc.stdout) == (pdl == "pdl"), (
        "the PDL wait / trigger must be there iff asked"
    )
    copies = [line for line in proc.stdout.splitlines() if "async_copy_global_to_local" in line]
    weight_copies = [line for line in copies if "tensor<8x2048x!tt.ptr<bf16>" in line]
    assert len(weight_copies) >= 2, f"weight tile not pipelined; async copies: {copies}"
