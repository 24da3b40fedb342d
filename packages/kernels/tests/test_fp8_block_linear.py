"""The block-wise fp8 providers (ops/fp8_block_linear.py) against the IR specs (treadle_ir.ops.fp8_block) on fresh
random inputs.

CPU: Triton's interpreter runs the group quantization kernel, the one-row kernel, the GEMM quantizing its own
activations (2-64 rows) and the GEMM after the quantization kernel (beyond 64 rows), at ragged sizes (n and k not
multiples of the blocks or the tiles; block_n not a multiple of the GEMM's BLOCK_N, block_k not a power of two),
with and without bias. GPU (``-m gpu``): Llama-3.1-8B's projections with 128 x 128 blocks at 1 to 4096 rows.
The quantization must equal the spec bit for bit (same IEEE division, same rounding); the linear may differ only by
its fp32 summation order (each K block summed, then scaled), i.e. by one rounding of the output (under the
interpreter, which truncates to bf16, one bf16 step; on the GPU, Hopper's fp8 MMA adds within a K block in reduced
precision: still far below a bf16 step).
"""

from __future__ import annotations

import pytest
import torch
from test_fp8_linear import _close
from test_ir_providers import DEVICE, _gen, _randn, _triton, gpu, needs_cuda

import treadle_kernels  # noqa: F401  (registers the triton providers)
from treadle_ir import ops
from treadle_ir.ops.fp8_block import quantize_fp8_blocks
from treadle_kernels.ops import fp8_block_linear as provider

pytest.importorskip("triton")


def _inputs(
    rows: int, n: int, k: int, block: tuple[int, int], dtype: torch.dtype, bias: bool, seed: int
) -> tuple:
    """(x, weight, weight_scale, bias, block_n, block_k): a weight quantized per tile, an outlier group in x."""
    gen = _gen(seed)
    x = _randn(gen, rows, k, dtype=dtype)
    x[0, : min(k, 3)] *= 40.0  # an outlier in row 0's first group: the other groups keep their own scales
    weight = _randn(gen, n, k, dtype=torch.float32) * k**-0.5
    weight[: min(n, 2)] *= 30.0  # tiles of differing scales
    w_fp8, w_scale = quantize_fp8_blocks(weight, *block)
    b = _randn(gen, n, dtype=dtype) if bias else None
    return x, w_fp8, w_scale, b, *block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "group"), [((1, 100), 16), ((3, 37), 16), ((17, 64), 32), ((5, 200), 128),
                                              ((2, 3, 50), 24)])  # fmt: skip
def test_quantize_groups_equals_spec(shape: tuple[int, ...], group: int, dtype: torch.dtype) -> None:
    gen = _gen(sum(shape) + group)
    x = _randn(gen, *shape, dtype=torch.float32) * torch.logspace(-4, 3, shape[-1], device=DEVICE)
    x = x.to(dtype)
    x.view(-1, shape[-1])[-1, :group] = 0.0  # a zero group: scale 1
    expected = ops.quantize_fp8_groups.native(x, group)
    with _triton(ops.quantize_fp8_groups, x, group):
        q, scale = ops.quantize_fp8_groups(x, group)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == expected[1].shape
    assert torch.equal(scale, expected[1])
    assert torch.equal(q.view(torch.uint8), expected[0].view(torch.uint8))


SHAPES = [(45, 70, (16, 32)), (33, 130, (24, 16)), (64, 64, (16, 16)), (20, 100, (16, 20))]  # n, k, block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 70])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}-b{b[0]}x{b[1]}" for n, k, b in SHAPES])
def test_block_linear_matches_spec(
    shape: tuple[int, int, tuple[int, int]], rows: int, bias: bool, dtype: torch.dtype
) -> None:
    """1 row: the one-row kernel; 5: the GEMM quantizing in the kernel; 70: quantization kernel + GEMM."""
    n, k, block = shape
    args = _inputs(rows, n, k, block, dtype, bias, seed=n + k + rows)
    expected = ops.fp8_block_linear.native(*args)
    with _triton(ops.fp8_block_linear, *args):
        got = ops.fp8_block_linear(*args)
    _close(got, expected)


def test_leading_dims_and_strided_rows() -> None:
    """x as [2, 3, k] and as a column slice of a wider buffer (rows strided), through both GEMM paths."""
    x, w, s, b, bn, bk = _inputs(6, 24, 40, (16, 16), torch.float32, True, seed=5)
    x3 = x.view(2, 3, 40)
    with _triton(ops.fp8_block_linear, x3, w, s, b, bn, bk):
        got = ops.fp8_block_linear(x3, w, s, b, bn, bk)
    _close(got, ops.fp8_block_linear.native(x3, w, s, b, bn, bk))
    for rows in (3, 80):
        xs = _randn(_gen(rows), rows, 100, dtype=torch.float32)[:, :40]
        with _triton(ops.fp8_block_linear, xs, w, s, None, bn, bk):
            got = ops.fp8_block_linear(xs, w, s, None, bn, bk)
        _close(got, ops.fp8_block_linear.native(xs, w, s, None, bn, bk))


def test_declines_what_it_cannot_read() -> None:
    x = torch.randn(2, 64, device=DEVICE)
    w, s = quantize_fp8_blocks(torch.randn(24, 64, device=DEVICE), 16, 16)
    for args, why in (
        ((x, w.float(), s, None, 16, 16), "weight dtype"),
        ((x, w, s.double(), None, 16, 16), "weight_scale dtype"),
        ((x, w, s, None, 16, 32), "one per tile"),
        ((x, w, s[:, :2], None, 16, 16), "one per tile"),
        ((x, w, s, None, 16, 512), "block_k from 1 to 256"),
        ((x, w.t().contiguous().t(), s, None, 16, 16), "strided"),
        ((x, w, s, torch.ones(23, device=DEVICE), 16, 16), "bias"),
    ):
        with ops.fp8_block_linear.priority(["triton"]):
            chosen, skipped = ops.fp8_block_linear.explain(*args)
        assert chosen.name == "native" and why in skipped["triton"], skipped


def test_gemm_tiles_follow_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row: the streaming kernel; BLOCK_M follows M; a small M takes the widest BLOCK_N that still gives each
    of 132 SMs a program; beyond 64 rows the activations are quantized by their own kernel first."""
    monkeypatch.setattr(provider, "num_sms", lambda index: 132)
    cuda = torch.device("cuda", 0)

    def gemm(m: int, n: int) -> provider.GemmConfig:
        config = provider.kernel_config(m, n, cuda)
        assert isinstance(config, provider.GemmConfig)
        return config

    assert isinstance(provider.kernel_config(1, 4096, cuda), provider.GemvConfig)
    assert [gemm(m, 4096).block_m for m in (2, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
    assert [gemm(m, 4096).quant_a for m in (2, 64, 65)] == [True, True, False]
    assert gemm(16, 4096).block_n == 32  # 64 programs at 64 wide: fewer than the SMs
    assert gemm(16, 14336).block_n == 64  # 112 programs at 128 wide, 224 at 64
    assert gemm(16, 28672).block_n == 128  # 224 programs at 128 wide
    big = gemm(4096, 4096)
    assert (big.block_m, big.block_n, big.num_warps) == (128, 128, 8)


LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (n, k): qkv, o, gate_up, down


@gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 16, 64, 256, 1024, 4096])
@pytest.mark.parametrize("shape", LLAMA_8B)
def test_fp8_block_linear_gpu(shape: tuple[int, int], rows: int) -> None:
    """bf16, Llama-3.1-8B's projections with 128 x 128 blocks: each path of the provider against the spec in fp32,
    and the group quantization against the spec computed on the CPU (IEEE division, round-to-nearest-even)."""
    n, k = shape
    args = _inputs(rows, n, k, (128, 128), torch.bfloat16, bias=n == 6144, seed=n + k + rows)
    expected = ops.fp8_block_linear.native(*args)
    with _triton(ops.fp8_block_linear, *args):
        got = ops.fp8_block_linear(*args)
    _close(got, expected)
    x = args[0]
    with _triton(ops.quantize_fp8_groups, x, 128):
        q, scale = ops.quantize_fp8_groups(x, 128)
    q_ref, scale_ref = ops.quantize_fp8_groups.native(x.cpu(), 128)
    assert torch.equal(scale.cpu(), scale_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
